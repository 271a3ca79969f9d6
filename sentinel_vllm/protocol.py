"""Leave-one-benchmark-out (LOBO): the product's evaluation protocol.

The default sentinel is meant for benchmarks (traffic) it was not trained on, so
it is judged exactly there: for every benchmark ``b``, train on the other
benchmarks, estimate ``b``'s accuracy, and summarise the held-out errors by
their median, mean and WORST absolute estimation error (AEE) and the Spearman
rho between estimated and true accuracy over the held-out benchmarks.

A *benchmark* is a trace's ``slice``. When traces come from several decoding
temperatures (``temperature`` in the record, else ``generation.temperature``),
the held-out benchmark is removed from training at EVERY temperature, training
uses ``train_temperatures`` and each (benchmark, temperature) of
``test_temperatures`` is one held-out unit (``"gsm8k@T0"``): the same run then
measures cross-temperature transfer on unseen benchmarks.

Training compositions (``composition``):

``all``
    every other benchmark (the product recipe);
``extremes``
    the paper's two-benchmark recipe applied inside the protocol: the highest-
    and the lowest-accuracy benchmark among the others.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from sentinel_vllm.traces import Trace

__all__ = [
    "ROW_COLUMNS",
    "SUMMARY_COLUMNS",
    "ProtocolResult",
    "extremes_pair",
    "lobo",
    "summarise",
    "trace_temperature",
]

ROW_COLUMNS = ["recipe", "estimator", "held_out", "temperature", "n", "estimated", "true", "aee",
               "train"]
SUMMARY_COLUMNS = ["recipe", "estimator", "n_units", "median_aee", "mean_aee", "worst_aee",
                   "worst_unit", "spearman_rho"]


def trace_temperature(t: Trace) -> float | None:
    """The sampling temperature of a trace: ``temperature``, else ``generation.temperature``."""
    v = t.extra.get("temperature")
    if v is None and isinstance(t.extra.get("generation"), dict):
        v = t.extra["generation"].get("temperature")
    return None if v is None else float(v)


def _unit(bench: str, temp: float | None, several: bool) -> str:
    return f"{bench}@T{temp:g}" if several and temp is not None else bench


def summarise(rows: Sequence[dict]) -> dict:
    """Median, mean and worst AEE and Spearman rho over held-out units.

    Parameters
    ----------
    rows : sequence of dict
        Each with ``unit``, ``estimated``, ``true`` and ``aee``.

    Returns
    -------
    dict
        ``n_units``, ``median_aee``, ``mean_aee``, ``worst_aee``, ``worst_unit`` and
        ``spearman_rho`` (NaN with fewer than 2 units or a constant side).
    """
    from scipy.stats import spearmanr

    out = {"n_units": len(rows), "median_aee": float("nan"), "mean_aee": float("nan"),
           "worst_aee": float("nan"), "worst_unit": None, "spearman_rho": float("nan")}
    if not rows:
        return out
    aee = np.array([r["aee"] for r in rows], dtype=np.float64)
    out["median_aee"] = float(np.median(aee))
    out["mean_aee"] = float(np.mean(aee))
    j = int(np.argmax(aee))
    out["worst_aee"], out["worst_unit"] = float(aee[j]), rows[j]["unit"]
    est = [r["estimated"] for r in rows]
    tru = [r["true"] for r in rows]
    if len(rows) >= 2 and np.ptp(est) > 0 and np.ptp(tru) > 0:
        out["spearman_rho"] = float(spearmanr(est, tru).statistic)
    return out


@dataclass
class ProtocolResult:
    """Held-out estimates of one recipe and slice estimator.

    Attributes
    ----------
    recipe : str
        ``"<composition>/<feature set>"`` plus the temperatures when given.
    estimator : str
    rows : list of dict
        One per held-out unit: ``unit``, ``held_out``, ``temperature``, ``n``,
        ``estimated``, ``true``, ``aee``, ``se`` (``sqrt(sum p(1-p)) / n``, the sampling
        standard error of :mod:`sentinel_vllm.aggregate`), ``train`` (the training benchmarks),
        ``auroc`` (the held-out AUROC of P(correct) on the unit; NaN with one class).
    summary : dict
        :func:`summarise` of ``rows``.
    """

    recipe: str
    estimator: str
    rows: list = field(default_factory=list)
    summary: dict = field(default_factory=dict)

    def table_rows(self) -> list[list]:
        """Rows in :data:`ROW_COLUMNS` order."""
        return [[self.recipe, self.estimator, r["held_out"], r["temperature"], r["n"],
                 r["estimated"], r["true"], r["aee"], "+".join(r["train"])] for r in self.rows]

    def summary_row(self) -> list:
        """One row in :data:`SUMMARY_COLUMNS` order."""
        s = self.summary
        return [self.recipe, self.estimator, s["n_units"], s["median_aee"], s["mean_aee"],
                s["worst_aee"], s["worst_unit"], s["spearman_rho"]]


def extremes_pair(accuracy: dict[str, float]) -> tuple[str, str]:
    """The highest- and lowest-accuracy benchmarks (ties broken by name).

    Raises
    ------
    ValueError
        With fewer than two benchmarks.
    """
    if len(accuracy) < 2:
        raise ValueError(f"the extremes pair needs two benchmarks; have {sorted(accuracy)}")
    order = sorted(accuracy, key=lambda b: (accuracy[b], b))
    return order[-1], order[0]


def _auroc(y: np.ndarray, p: np.ndarray) -> float:
    """Held-out AUROC of P(correct) on one unit; NaN when the unit has one class only."""
    from sklearn.metrics import roc_auc_score

    return float("nan") if y.min() == y.max() else float(roc_auc_score(y, p))


def _default_factory(random_state: int, params: dict | None):
    from sentinel_vllm.classifier import SentinelClassifier

    return lambda: SentinelClassifier(random_state=random_state, **(params or {}))


def lobo(
    traces: Sequence[Trace],
    *,
    composition: str = "all",
    feature_set: str = "paper",
    estimators: Sequence[str] = ("pcc",),
    entropy: str = "full",
    k: int | None = None,
    train_temperatures: Sequence[float] | None = None,
    test_temperatures: Sequence[float] | None = None,
    benchmarks: Sequence[str] | None = None,
    random_state: int = 0,
    classifier_params: dict | None = None,
    classifier_factory: Callable[[], object] | None = None,
) -> dict[str, ProtocolResult]:
    """Leave-one-benchmark-out estimates for one recipe.

    Parameters
    ----------
    traces : sequence of Trace
        Labelled traces (unlabelled ones are ignored).
    composition : {"all", "extremes"}
        Training benchmarks for each held-out one (see module docstring).
    feature_set : str
        A key of :data:`sentinel_vllm.feature_sets.FEATURE_SETS`.
    estimators : sequence of str
        Slice estimators (:data:`sentinel_vllm.quantify.ESTIMATORS`); ``pcc`` is the paper's.
        Any other needs a classifier exposing ``oof_proba_`` (out-of-fold P(correct)).
    entropy, k : entropy series (``k`` is also the k of a ``topk`` group; default: the
        traces' one k).
    train_temperatures, test_temperatures : sequence of float, optional
        Restrict training / held-out traces to these temperatures (default: all).
    benchmarks : sequence of str, optional
        Benchmarks to hold out (default: every benchmark with test traces).
    random_state : int
    classifier_params : dict, optional
        Keyword arguments of :class:`~sentinel_vllm.classifier.SentinelClassifier`.
    classifier_factory : callable, optional
        Returns an unfitted classifier with ``fit(X, y)`` and ``predict_proba(X)``
        (default: the sentinel's calibrated forest).

    Returns
    -------
    dict[str, ProtocolResult]
        One per estimator.

    Raises
    ------
    ValueError
        Unknown composition, fewer than two benchmarks, no traces at the requested
        temperatures, or a fold whose training data has one class only (the message
        names the held-out benchmark).
    """
    from sentinel_vllm.feature_sets import feature_set_matrix
    from sentinel_vllm.quantify import fit_quantifiers

    if composition not in ("all", "extremes"):
        raise ValueError(f"unknown composition {composition!r}; use 'all' or 'extremes'")
    lab = [t for t in traces if t.correct is not None]
    temps = np.array([trace_temperature(t) for t in lab], dtype=object)
    several = len(set(temps.tolist())) > 1

    def in_temps(allowed):
        if allowed is None:
            return np.ones(len(lab), dtype=bool)
        want = {float(a) for a in allowed}
        return np.array([t is not None and float(t) in want for t in temps])

    tr_ok, te_ok = in_temps(train_temperatures), in_temps(test_temperatures)
    if not tr_ok.any() or not te_ok.any():
        raise ValueError(f"no labelled traces at the requested temperatures; have "
                         f"{sorted({t for t in temps.tolist() if t is not None})}")
    bench = np.array([t.slice for t in lab])
    names = sorted(set(bench.tolist()))
    if len(names) < 2:
        raise ValueError(f"leave-one-benchmark-out needs at least two benchmarks; have {names}")
    held_list = list(benchmarks) if benchmarks else sorted(set(bench[te_ok].tolist()))
    unknown = set(held_list) - set(names)
    if unknown:
        raise ValueError(f"benchmarks not in the traces: {sorted(unknown)}; have {names}")
    X = feature_set_matrix(lab, feature_set, entropy, k, k)  # k also picks the topk group's series
    y = np.array([t.correct for t in lab], dtype=int)
    factory = classifier_factory or _default_factory(random_state, classifier_params)
    tag = feature_set
    if train_temperatures is not None or test_temperatures is not None:
        fmt = lambda ts: "all" if ts is None else ",".join(f"{float(t):g}" for t in ts)
        tag += f" T{fmt(train_temperatures)}->T{fmt(test_temperatures)}"
    results = {e: ProtocolResult(f"{composition}/{tag}", e) for e in estimators}
    for b in held_list:
        others = tr_ok & (bench != b)
        if composition == "extremes":
            acc = {s: float(y[others & (bench == s)].mean()) for s in set(bench[others].tolist())}
            pair = extremes_pair(acc)
            others &= np.isin(bench, pair)
        train_names = sorted(set(bench[others].tolist()))
        if y[others].min(initial=1) == y[others].max(initial=0):
            raise ValueError(f"holding out {b}: training data has one class only")
        clf = factory().fit(X[others], y[others])
        if set(estimators) - {"pcc"}:
            oof = getattr(clf, "oof_proba_", None)
            if oof is None:
                raise ValueError("estimators other than pcc need a calibrated classifier "
                                 "exposing oof_proba_")
            fitted = fit_quantifiers(oof, y[others], estimators, random_state)
        else:
            fitted = fit_quantifiers(np.array([0.0, 1.0]), np.array([0, 1]), ["pcc"])
        test = te_ok & (bench == b)
        for temp in sorted({t for t in temps[test].tolist()}, key=lambda v: (v is None, v)):
            m = test & np.array([t == temp for t in temps])
            p = clf.predict_proba(X[m])[:, 1]
            true = float(y[m].mean())
            se = float(np.sqrt(np.sum(p * (1.0 - p)))) / p.size  # the sampling part (aggregate.py)
            auroc = _auroc(y[m], p)
            for e in estimators:
                est = fitted[e](p)
                results[e].rows.append({"unit": _unit(b, temp, several), "held_out": b,
                                        "temperature": temp, "n": int(m.sum()), "estimated": est,
                                        "true": true, "aee": abs(est - true), "se": se,
                                        "train": train_names, "auroc": auroc})
    for r in results.values():
        r.summary = summarise(r.rows)
    return results


def plot_lobo(results: Sequence[ProtocolResult], path: str) -> str:
    """Estimated versus true accuracy of every held-out unit, one marker per result (PNG).

    Returns
    -------
    str
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    markers = "osD^v<>Px*"
    for i, res in enumerate(results):
        s = res.summary
        ax.scatter([r["true"] for r in res.rows], [r["estimated"] for r in res.rows],
                   marker=markers[i % len(markers)], alpha=0.8,
                   label=f"{res.recipe} {res.estimator}: median {s['median_aee']:.3f}, "
                         f"worst {s['worst_aee']:.3f}")
    if results:
        for r in results[0].rows:
            ax.annotate(r["unit"], (r["true"], r["estimated"]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="true accuracy (held-out benchmark)",
           ylabel="estimated accuracy", title="Leave-one-benchmark-out")
    ax.legend(fontsize=6, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
