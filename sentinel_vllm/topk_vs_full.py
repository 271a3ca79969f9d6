"""Top-k versus full-vocabulary entropy: the same protocol on each entropy variant.

The paper's open question 3 (arXiv 2601.09001 Sec. 6; docs/method.md "Open questions"):
what does the full-vocabulary entropy gain over the top-k approximation that a
closed API exposes? From the same responses we build the 11 statistics from

* ``full``: full-vocabulary entropy;
* ``top{k}``: the paper's top-k entropy (full-softmax p over the k largest);
* ``top{k}_renorm``: top-k renormalised;

and run :func:`sentinel_vllm.evaluate.evaluate_composition` with identical
compositions, splits and seeds for each. A variant whose series the traces lack
is reported as unavailable (``available = False``), not an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from sentinel_vllm.evaluate import CompositionResult, evaluate_composition, statistic_auroc
from sentinel_vllm.series import parse_series_name, series_names
from sentinel_vllm.traces import Trace

__all__ = ["VariantResult", "variant_names", "extremes", "compare_variants", "plot_variants"]

COLUMNS = ["variant", "k", "available", "median_aee", "median_aee_unseen", "spearman_rho",
           "mean_auroc", "brier", "ece"]


@dataclass
class VariantResult:
    """Metrics of one entropy variant, averaged over the compositions.

    ``median_aee`` is the median over slices of each composition (training
    slices on their held-out 20%), then the mean over compositions; the same for
    the other metrics. ``mean_auroc`` is the mean AUROC of the 11 single statistics.
    """

    variant: str
    k: int | None
    available: bool
    median_aee: float = float("nan")
    median_aee_unseen: float = float("nan")
    spearman_rho: float = float("nan")
    mean_auroc: float = float("nan")
    brier: float = float("nan")
    ece: float = float("nan")
    compositions: list[CompositionResult] = field(default_factory=list, repr=False)

    def row(self) -> list:
        """Values in :data:`COLUMNS` order."""
        return [getattr(self, c) for c in COLUMNS]


def variant_names(ks: Sequence[int], renorm: bool = True) -> list[tuple[str, int | None]]:
    """``[("full", None), ("top1", 1), ..., ("top1_renorm", 1), ...]``."""
    return [(name, parse_series_name(name)[1]) for name in series_names(ks, renorm=renorm)]


def extremes(traces: Sequence[Trace]) -> tuple[str, str]:
    """The "Extremes" composition: the slices with the highest and lowest true accuracy.

    Raises
    ------
    ValueError
        With fewer than two labelled slices.
    """
    acc: dict[str, list[bool]] = {}
    for t in traces:
        if t.correct is not None:
            acc.setdefault(t.slice, []).append(bool(t.correct))
    if len(acc) < 2:
        raise ValueError("the Extremes composition needs at least two labelled slices")
    order = sorted(acc, key=lambda s: (np.mean(acc[s]), s))
    return order[-1], order[0]


def compare_variants(
    traces: Sequence[Trace],
    ks: Sequence[int] = (1, 5, 10, 20, 50),
    compositions: Sequence[Sequence[str]] | None = None,
    *,
    renorm: bool = True,
    random_state: int = 0,
    classifier_params: dict | None = None,
) -> list[VariantResult]:
    """Evaluate every entropy variant with the identical protocol.

    Parameters
    ----------
    traces : sequence of Trace
        Labelled traces carrying several series (``full``, ``top{k}``, ...).
    ks : sequence of int
        The k values to compare.
    compositions : sequence of sequences of slice names, optional
        Default: ``[extremes(traces)]``.
    renorm : bool, default True
        Also evaluate the renormalised top-k variants.
    random_state : int
        Seed shared by every variant (same splits, same forest seeds).
    classifier_params : dict, optional
        Passed to :class:`sentinel_vllm.classifier.SentinelClassifier`.

    Returns
    -------
    list[VariantResult]
        In :func:`variant_names` order.
    """
    comps = [tuple(c) for c in (compositions or [extremes(traces)])]
    lab = [t for t in traces if t.correct is not None]
    out = []
    for name, k in variant_names(ks, renorm):
        if any(t.series(name) is None for t in lab):
            out.append(VariantResult(name, k, False))
            continue
        results = [evaluate_composition(lab, c, entropy=name, random_state=random_state,
                                        classifier_params=classifier_params) for c in comps]
        auroc = statistic_auroc(lab, name)
        mean = lambda xs: float(np.nanmean(xs)) if np.isfinite(xs).any() else float("nan")  # noqa: E731
        out.append(VariantResult(
            name, k, True,
            median_aee=mean([r.summary["median_aee"] for r in results]),
            median_aee_unseen=mean([r.summary_unseen["median_aee"] for r in results]),
            spearman_rho=mean([r.summary["spearman_rho"] for r in results]),
            mean_auroc=mean([v["auroc"] for v in auroc.values()]),
            brier=mean([r.brier for r in results]),
            ece=mean([r.ece for r in results]),
            compositions=results,
        ))
    return out


def plot_variants(results: Sequence[VariantResult], path: str) -> str:
    """Median AEE and Spearman rho against k, with the full-vocabulary level as a line (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = next((r for r in results if r.variant == "full" and r.available), None)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for ax, metric, label in ((axes[0], "median_aee", "median AEE"), (axes[1], "spearman_rho", "Spearman rho")):
        for suffix, style in (("", "o-"), ("_renorm", "s--")):
            pts = [(r.k, getattr(r, metric)) for r in results
                   if r.available and r.k is not None and r.variant.endswith(suffix)
                   and (suffix or not r.variant.endswith("_renorm"))]
            if pts:
                ax.plot(*zip(*sorted(pts)), style, label=f"top-k{suffix or ' (paper)'}")
        if full is not None:
            ax.axhline(getattr(full, metric), color="k", lw=1, label="full vocabulary")
        ax.set(xscale="log", xlabel="k", ylabel=label)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
