"""Slice-level accuracy estimates from per-response P(correct).

Estimated accuracy of a slice D (docs/method.md "Aggregation"; arXiv 2601.09001 Sec. 3.4):
``A_hat(D) = (1/|D|) sum_{x in D} P_hat(correct | x)`` and the absolute estimation
error ``AEE(D) = |A_hat(D) - A(D)|`` where labels exist.

Interval: the 95% interval is the Poisson-binomial normal approximation. If the
P_hat are calibrated, the number of correct responses in the slice is a sum of
independent Bernoulli(p_i), with variance ``sum p_i (1 - p_i)``; the accuracy
``A = (1/n) sum Bernoulli(p_i)`` then has standard error
``sqrt(sum p_i (1 - p_i)) / n`` around ``A_hat``. The interval
``A_hat +- 1.96 * se``, clipped to [0, 1], is the range the slice's true
accuracy should fall in. It does NOT include the sentinel's own calibration
error on a shifted slice (see AEE in the evaluation); that part shrinks with
better training compositions, not with more traffic.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np

__all__ = ["SliceEstimate", "estimate_accuracy", "estimate_slices", "summary", "Z_95"]

Z_95 = 1.959963984540054


@dataclass(frozen=True)
class SliceEstimate:
    """Estimated accuracy of one slice.

    Attributes
    ----------
    n : int
        Number of responses.
    estimate : float
        Mean P(correct), in [0, 1] (NaN when ``n == 0``).
    ci_low, ci_high : float
        95% Poisson-binomial normal-approximation interval, clipped to [0, 1].
    true : float or None
        Observed accuracy over the labelled responses, when labels exist.
    aee : float or None
        ``|estimate - true|`` when labels exist.
    n_labelled : int
        Number of responses with a label.
    """

    n: int
    estimate: float
    ci_low: float
    ci_high: float
    true: float | None = None
    aee: float | None = None
    n_labelled: int = 0

    def as_dict(self) -> dict:
        """Plain dict, for JSON."""
        return asdict(self)


def estimate_accuracy(p_correct, correct=None) -> SliceEstimate:
    """Estimate a slice's accuracy from per-response probabilities.

    Parameters
    ----------
    p_correct : array-like of float, shape (n,)
        Calibrated P(correct) per response, each in [0, 1].
    correct : array-like of {bool, None}, shape (n,), optional
        Labels; ``None`` entries are unlabelled and ignored for ``true``/``aee``.

    Returns
    -------
    SliceEstimate

    Raises
    ------
    ValueError
        If a probability is outside [0, 1] or NaN, or shapes differ.
    """
    p = np.asarray(p_correct, dtype=np.float64).ravel()
    if p.size and (np.isnan(p).any() or (p < 0).any() or (p > 1).any()):
        raise ValueError("p_correct values must lie in [0, 1]")
    n = int(p.size)
    if n == 0:
        est, lo, hi = float("nan"), float("nan"), float("nan")
    else:
        est = float(p.mean())
        se = float(np.sqrt(np.sum(p * (1.0 - p)))) / n
        lo, hi = max(0.0, est - Z_95 * se), min(1.0, est + Z_95 * se)
    true = aee = None
    n_lab = 0
    if correct is not None:
        labels = list(correct)
        if len(labels) != n:
            raise ValueError(f"correct has {len(labels)} entries, p_correct has {n}")
        lab = np.array([bool(c) for c in labels if c is not None], dtype=np.float64)
        n_lab = int(lab.size)
        if n_lab:
            true = float(lab.mean())
            aee = abs(est - true)
    return SliceEstimate(n, est, lo, hi, true, aee, n_lab)


def estimate_slices(
    slices: Sequence[str], p_correct, correct: Iterable | None = None
) -> dict[str, SliceEstimate]:
    """Per-slice estimates, slices in first-appearance order.

    Parameters
    ----------
    slices : sequence of str, length n
        Slice label of each response.
    p_correct : array-like of float, shape (n,)
    correct : iterable of {bool, None}, length n, optional

    Returns
    -------
    dict[str, SliceEstimate]
    """
    p = np.asarray(p_correct, dtype=np.float64).ravel()
    labels = None if correct is None else list(correct)
    if len(slices) != p.size or (labels is not None and len(labels) != p.size):
        raise ValueError("slices, p_correct and correct must have the same length")
    order: dict[str, list[int]] = {}
    for i, s in enumerate(slices):
        order.setdefault(s, []).append(i)
    return {
        s: estimate_accuracy(p[idx], None if labels is None else [labels[i] for i in idx])
        for s, idx in order.items()
    }


def summary(estimates: Mapping[str, SliceEstimate]) -> dict:
    """Median and mean AEE and Spearman rho over labelled slices.

    Parameters
    ----------
    estimates : mapping slice -> SliceEstimate

    Returns
    -------
    dict with ``median_aee``, ``mean_aee``, ``spearman_rho`` (NaN with fewer
    than 2 labelled slices or a constant side) and ``n_slices``.
    """
    from scipy.stats import spearmanr

    lab = [e for e in estimates.values() if e.true is not None and e.n]
    out = {"n_slices": len(lab), "median_aee": float("nan"), "mean_aee": float("nan"),
           "spearman_rho": float("nan")}
    if lab:
        aee = np.array([e.aee for e in lab])
        out["median_aee"] = float(np.median(aee))
        out["mean_aee"] = float(np.mean(aee))
    if len(lab) >= 2:
        est = [e.estimate for e in lab]
        tru = [e.true for e in lab]
        if np.ptp(est) > 0 and np.ptp(tru) > 0:
            out["spearman_rho"] = float(spearmanr(est, tru).statistic)
    return out
