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
accuracy should fall in IF the sentinel is calibrated on this slice. On a
benchmark or temperature it was not trained on it is not: its own estimation
error does not shrink with traffic. The *band* adds it: a sentinel file's
``band`` metadata (fitted by ``sentinel-vllm train`` on held-out units, see
:mod:`sentinel_vllm.band`) holds ``q``, and the interval shown is

``A_hat +- (q + 1.96 * se)``, clipped to [0, 1]       (``interval = "band"``)

Without band metadata (older files, or a sentinel trained on one benchmark) the
interval is the sampling part alone and says so (``interval = "sampling"``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np

__all__ = ["BAND_METHOD", "SliceEstimate", "band_halfwidth", "check_band", "estimate_accuracy",
           "estimate_slices", "interval_kind", "interval_note", "summary", "Z_95"]

Z_95 = 1.959963984540054
#: The band every shown interval uses (sentinel_vllm/band.py; the recording rules hard-code it).
BAND_METHOD = "conformal-linear"


def check_band(band) -> dict:
    """Validate a sentinel file's ``band`` metadata; returns it.

    Raises
    ------
    ValueError
        Not a dict, another method than :data:`BAND_METHOD`, or ``q`` not a finite
        number >= 0.
    """
    if not isinstance(band, dict):
        raise ValueError(f"band metadata must be a JSON object, got {type(band).__name__}")
    if band.get("method") != BAND_METHOD:
        raise ValueError(f"band method {band.get('method')!r}; this sentinel-vllm shows "
                         f"{BAND_METHOD!r} bands (retrain or upgrade)")
    q = band.get("q")
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not math.isfinite(q) or q < 0:
        raise ValueError(f"band q must be a finite number >= 0, got {q!r}")
    return band


def interval_kind(band) -> str:
    """``"band"`` with band metadata, ``"sampling"`` without."""
    return "sampling" if band is None else "band"


def interval_note(band) -> str:
    """One line saying what the shown 95% interval is."""
    if band is None:
        return ("95% interval: sampling noise only (this sentinel file has no band; the "
                "sentinel's own error on unseen benchmarks and temperatures is not included)")
    nested = band.get("nested") or {}
    cov = nested.get("coverage")
    judged = (f"; covered {cov:.0%} of {nested.get('n_units')} held-out units, nested"
              if isinstance(cov, (int, float)) else "")
    return (f"95% interval: band = estimate +- ({band['q']:.3f} + 1.96 se), the sentinel's own "
            f"error on {band.get('n_units', '?')} held-out (benchmark, temperature) units plus "
            f"sampling noise{judged}; with audit labels `sentinel-vllm audit` gives PPI++")


def band_halfwidth(se: float, band=None) -> float:
    """Half-width of the 95% interval shown for a slice: ``q + 1.96 * se`` (``q = 0``
    without a band, the sampling interval)."""
    q = 0.0 if band is None else float(band["q"])
    return q + Z_95 * float(se)


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
        95% interval of the slice's true accuracy, clipped to [0, 1]: the band
        (``interval == "band"``) or the sampling part alone (``"sampling"``).
    true : float or None
        Observed accuracy over the labelled responses, when labels exist.
    aee : float or None
        ``|estimate - true|`` when labels exist.
    n_labelled : int
        Number of responses with a label.
    interval : str
        ``"band"`` or ``"sampling"`` (see the module notes).
    sampling_halfwidth : float
        ``1.96 * sqrt(sum p(1-p)) / n`` (NaN when ``n == 0``).
    shift_halfwidth : float
        The band's ``q`` (0 for a sampling interval).
    """

    n: int
    estimate: float
    ci_low: float
    ci_high: float
    true: float | None = None
    aee: float | None = None
    n_labelled: int = 0
    interval: str = "sampling"
    sampling_halfwidth: float = float("nan")
    shift_halfwidth: float = 0.0

    def as_dict(self) -> dict:
        """Plain dict, for JSON."""
        return asdict(self)


def estimate_accuracy(p_correct, correct=None, band=None) -> SliceEstimate:
    """Estimate a slice's accuracy from per-response probabilities.

    Parameters
    ----------
    p_correct : array-like of float, shape (n,)
        Calibrated P(correct) per response, each in [0, 1].
    correct : array-like of {bool, None}, shape (n,), optional
        Labels; ``None`` entries are unlabelled and ignored for ``true``/``aee``.
    band : dict, optional
        A sentinel's ``band`` metadata (:func:`check_band`); None: sampling interval.

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
    shift = 0.0 if band is None else float(check_band(band)["q"])
    if n == 0:
        est, lo, hi, samp = float("nan"), float("nan"), float("nan"), float("nan")
    else:
        est = float(p.mean())
        se = float(np.sqrt(np.sum(p * (1.0 - p)))) / n
        h, samp = band_halfwidth(se, band), Z_95 * se
        lo, hi = max(0.0, est - h), min(1.0, est + h)
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
    return SliceEstimate(n, est, lo, hi, true, aee, n_lab, interval_kind(band), samp, shift)


def estimate_slices(
    slices: Sequence[str], p_correct, correct: Iterable | None = None, band=None
) -> dict[str, SliceEstimate]:
    """Per-slice estimates, slices in first-appearance order.

    Parameters
    ----------
    slices : sequence of str, length n
        Slice label of each response.
    p_correct : array-like of float, shape (n,)
    correct : iterable of {bool, None}, length n, optional
    band : dict, optional
        As in :func:`estimate_accuracy`.

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
        s: estimate_accuracy(p[idx], None if labels is None else [labels[i] for i in idx], band)
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
