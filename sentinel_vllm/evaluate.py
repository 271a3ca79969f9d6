"""Evaluation protocol and metrics of the paper (arXiv 2601.09001 Sec. 4).

* :func:`statistic_auroc`: AUROC of each single statistic for predicting
  correctness (docs/method.md "Known failure signatures": below 0.6 the signal is weak).
  AUROC is orientation-free here: we report ``max(a, 1 - a)`` together with the
  sign (high entropy usually means wrong).
* :func:`evaluate_composition`: train on 80% of the traces of a set of slices
  (the training composition), estimate every slice (training slices on their
  held-out 20%, all other slices in full), report AEE per slice, median and mean
  AEE and Spearman rho (all slices and unseen slices only), Brier score and ECE.
* :func:`sweep`: the same for every composition of 1 and 2 slices.
* :func:`plot_run`: reliability diagram and estimated-versus-true accuracy (PNG).

ECE: ``sum_b (n_b / n) |acc_b - conf_b|`` on the 10 equal-width bins of
:func:`sklearn.calibration.calibration_curve` (the reliability curve drawn beside it).
Brier: ``mean((p - y)^2)`` (:func:`sklearn.metrics.brier_score_loss`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from sentinel_vllm.aggregate import SliceEstimate, estimate_accuracy, summary
from sentinel_vllm.features import FEATURE_NAMES
from sentinel_vllm.traces import Trace, feature_matrix

__all__ = [
    "statistic_auroc",
    "expected_calibration_error",
    "brier_score",
    "CompositionResult",
    "evaluate_composition",
    "sweep",
    "plot_run",
]


def _labelled(traces: Sequence[Trace]) -> list[Trace]:
    lab = [t for t in traces if t.correct is not None]
    if not lab:
        raise ValueError("no labelled traces (all 'correct' are null)")
    return lab


def statistic_auroc(traces: Sequence[Trace], entropy: str = "full", k: int | None = None) -> dict:
    """AUROC of each of the 11 statistics alone for predicting correctness.

    Parameters
    ----------
    traces : sequence of Trace
        Labelled traces (unlabelled ones are ignored).
    entropy, k : entropy series (see :meth:`Trace.series`).

    Returns
    -------
    dict[str, dict]
        ``{name: {"auroc": max(a, 1-a), "direction": "higher_is_correct" | "lower_is_correct"}}``;
        AUROC is NaN when only one class is present.
    """
    from sklearn.metrics import roc_auc_score

    lab = _labelled(traces)
    X = feature_matrix(lab, entropy, k)
    y = np.array([t.correct for t in lab], dtype=int)
    out = {}
    for j, name in enumerate(FEATURE_NAMES):
        if y.min() == y.max():
            a = float("nan")
        else:
            a = float(roc_auc_score(y, X[:, j]))
        out[name] = {
            "auroc": max(a, 1 - a) if a == a else a,
            "direction": "higher_is_correct" if a >= 0.5 else "lower_is_correct",
        }
    return out


def brier_score(p, y) -> float:
    """Mean squared difference between P(correct) and the 0/1 label.

    :func:`sklearn.metrics.brier_score_loss`; NaN for empty input.
    """
    from sklearn.metrics import brier_score_loss

    p = np.asarray(p, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    return float(brier_score_loss(y, p)) if p.size else float("nan")


def expected_calibration_error(p, y, n_bins: int = 10) -> float:
    """Expected calibration error on the bins of the reliability curve.

    The bins are those of :func:`sklearn.calibration.calibration_curve` with
    ``strategy="uniform"`` (``n_bins`` equal widths on [0, 1]), the curve
    :func:`plot_run` draws, so the number in its legend is read off its points.

    Parameters
    ----------
    p : array-like of float, shape (n,)
    y : array-like of {0, 1}, shape (n,)
    n_bins : int, default 10

    Returns
    -------
    float
        ``sum_b (n_b / n) |mean(y_b) - mean(p_b)|`` over the non-empty bins; NaN for
        empty input.
    """
    from sklearn.calibration import calibration_curve

    p = np.asarray(p, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if p.size == 0:
        return float("nan")
    frac, conf = calibration_curve(y, p, n_bins=n_bins, strategy="uniform")
    # calibration_curve reports only the non-empty bins and not their sizes; its bins are
    # (edge_b, edge_b+1] (the first closed), found by searchsorted on the inner edges.
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    counts = np.bincount(np.searchsorted(edges[1:-1], p), minlength=n_bins)
    counts = counts[counts > 0]
    if counts.shape != frac.shape:  # pragma: no cover - a change of sklearn's binning
        raise RuntimeError("calibration_curve bins do not match the ECE's bin sizes")
    return float(np.sum(counts / p.size * np.abs(frac - conf)))


@dataclass
class CompositionResult:
    """Result of one training composition.

    Attributes
    ----------
    train_slices : tuple of str
    slices : dict[str, SliceEstimate]
        Every slice's estimate (training slices on their held-out part).
    seen : dict[str, bool]
        Whether the slice was in the composition.
    summary, summary_unseen : dict
        ``median_aee``, ``mean_aee``, ``spearman_rho``, ``n_slices``.
    brier, ece : float
        Over all evaluated responses.
    p, y : ndarray
        Evaluated responses' P(correct) and labels (for plots).
    """

    train_slices: tuple[str, ...]
    slices: dict[str, SliceEstimate]
    seen: dict[str, bool]
    summary: dict
    summary_unseen: dict
    brier: float
    ece: float
    p: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    y: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))

    def rows(self) -> list[dict]:
        """One flat dict per slice, for tables."""
        return [
            {"train": "+".join(self.train_slices), "slice": s, "seen": self.seen[s], "n": e.n,
             "estimated": e.estimate, "ci_low": e.ci_low, "ci_high": e.ci_high,
             "interval": e.interval, "true": e.true, "aee": e.aee}
            for s, e in self.slices.items()
        ]


def _split(idx: np.ndarray, y: np.ndarray, frac: float, rng: np.random.Generator):
    """Stratified random split of ``idx`` into (train, held-out)."""
    train, held = [], []
    for cls in (0, 1):
        c = idx[y[idx] == cls]
        c = c[rng.permutation(c.size)]
        n_tr = int(round(frac * c.size))
        train.append(c[:n_tr])
        held.append(c[n_tr:])
    return np.concatenate(train), np.concatenate(held)


def evaluate_composition(
    traces: Sequence[Trace],
    train_slices: Sequence[str],
    *,
    entropy: str = "full",
    k: int | None = None,
    train_fraction: float = 0.8,
    random_state: int = 0,
    classifier_params: dict | None = None,
) -> CompositionResult:
    """Train on a composition of slices and estimate every slice's accuracy.

    Parameters
    ----------
    traces : sequence of Trace
        Labelled traces of all slices (unlabelled ones are ignored).
    train_slices : sequence of str
        The composition.
    entropy, k : entropy series.
    train_fraction : float, default 0.8
        Share of each training slice used for training (stratified by label).
    random_state : int, default 0
        Seed of the split and of the classifier.
    classifier_params : dict, optional
        Keyword arguments for :class:`sentinel_vllm.classifier.SentinelClassifier`.

    Returns
    -------
    CompositionResult

    Raises
    ------
    ValueError
        If a training slice is unknown or the training data has one class only.
    """
    from sentinel_vllm.classifier import SentinelClassifier

    lab = _labelled(traces)
    X = feature_matrix(lab, entropy, k)
    y = np.array([t.correct for t in lab], dtype=int)
    sl = np.array([t.slice for t in lab])
    names = list(dict.fromkeys(sl.tolist()))
    unknown = set(train_slices) - set(names)
    if unknown:
        raise ValueError(f"training slices not in the traces: {sorted(unknown)}; have {names}")
    rng = np.random.default_rng(random_state)
    train_idx, eval_mask = [], np.ones(len(lab), dtype=bool)
    for s in train_slices:
        tr, _ = _split(np.flatnonzero(sl == s), y, train_fraction, rng)
        train_idx.append(tr)
        eval_mask[tr] = False
    train_idx = np.concatenate(train_idx)
    params = {"random_state": random_state, **(classifier_params or {})}
    clf = SentinelClassifier(**params).fit(X[train_idx], y[train_idx])
    ev = np.flatnonzero(eval_mask)
    p = clf.predict_proba(X[ev])[:, 1]
    slices = {
        s: estimate_accuracy(p[sl[ev] == s], y[ev][sl[ev] == s].astype(bool).tolist())
        for s in names
        if (sl[ev] == s).any()
    }
    seen = {s: s in set(train_slices) for s in slices}
    return CompositionResult(
        tuple(train_slices),
        slices,
        seen,
        summary(slices),
        summary({s: e for s, e in slices.items() if not seen[s]}),
        brier_score(p, y[ev]),
        expected_calibration_error(p, y[ev]),
        p,
        y[ev],
    )


def sweep(traces: Sequence[Trace], *, max_size: int = 2, **kwargs) -> list[CompositionResult]:
    """:func:`evaluate_composition` for every composition of 1..``max_size`` slices.

    Returns
    -------
    list[CompositionResult]
        Sorted by median AEE over all slices, best first. Compositions that
        cannot be trained (one class only, too few of the minority class) are
        skipped with a warning naming them.

    Raises
    ------
    ValueError
        If no composition can be trained.
    """
    import warnings

    names = list(dict.fromkeys(t.slice for t in _labelled(traces)))
    results, skipped = [], []
    for r in range(1, max_size + 1):
        for comp in itertools.combinations(names, r):
            try:
                results.append(evaluate_composition(traces, comp, **kwargs))
            except ValueError as exc:
                skipped.append(f"{'+'.join(comp)} ({exc})")
    if skipped:
        warnings.warn(f"skipped {len(skipped)} composition(s) that cannot be trained: "
                      + "; ".join(skipped), stacklevel=2)
    if not results:
        raise ValueError("no composition can be trained: " + "; ".join(skipped))
    return sorted(results, key=lambda c: (np.nan_to_num(c.summary["median_aee"], nan=9.0)))


def plot_run(result: CompositionResult, out_prefix: str) -> list[str]:
    """Reliability diagram and estimated-versus-true accuracy plot (PNG).

    Parameters
    ----------
    result : CompositionResult
    out_prefix : str
        Files are ``{out_prefix}_reliability.png`` and ``{out_prefix}_estimated_vs_true.png``.

    Returns
    -------
    list[str]
        The paths written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.calibration import calibration_curve

    paths = []
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    if result.y.size and result.y.min() != result.y.max():
        frac, conf = calibration_curve(result.y, result.p, n_bins=10, strategy="uniform")
        ax.plot(conf, frac, "o-", label=f"sentinel (ECE {result.ece:.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect")
    ax.set(xlabel="predicted P(correct)", ylabel="observed accuracy",
           title=f"Reliability, trained on {'+'.join(result.train_slices)}")
    ax.legend(loc="upper left")
    paths.append(f"{out_prefix}_reliability.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for s, e in result.slices.items():
        if e.true is None:
            continue
        ax.errorbar(e.true, e.estimate, yerr=[[e.estimate - e.ci_low], [e.ci_high - e.estimate]],
                    fmt="o" if result.seen[s] else "s", capsize=3)
        ax.annotate(s, (e.true, e.estimate), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    rho = result.summary["spearman_rho"]
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="true accuracy", ylabel="estimated accuracy",
           title=f"median AEE {result.summary['median_aee']:.3f}, rho {rho:.2f}")
    paths.append(f"{out_prefix}_estimated_vs_true.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths
