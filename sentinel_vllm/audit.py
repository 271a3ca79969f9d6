"""A small human audit with valid intervals: prediction-powered inference per slice.

Given a slice's responses, all scored by the sentinel (P(correct)) and a few of
them labelled by a person, the slice's accuracy is estimated with PPI++
(prediction-powered inference with power tuning; Angelopoulos et al. 2023,
the ``ppi-python`` package): the sentinel's mean over the UNLABELLED responses,
corrected by the labelled responses' residuals ``y - lam * P``, with ``lam``
chosen to minimise the variance. The 95% interval is valid whatever the
sentinel's bias on this slice (the labels absorb it), and with ``lam`` tuned it
is about as narrow as the labels-only interval when the sentinel is useless and
narrower when it is informative. The interval inverts PPI++'s variance like
Wilson's score interval (see :func:`ppi_interval`): ppi-python's Wald form
under-covers badly on slices with accuracy near 0 at n = 25-100
(benchmarks/RESULTS.md, audit simulation).

Beside it, per slice: the labels-only estimate with its Wilson interval and the
unlabelled estimate (mean P with the Poisson-binomial interval of
:mod:`sentinel_vllm.aggregate`, which does not include the sentinel's bias).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

__all__ = [
    "MIN_LABELS",
    "AuditEstimate",
    "audit_slice",
    "audit_slices",
    "labels_from",
    "parse_label",
    "ppi_interval",
    "read_labels",
    "wilson_interval",
]

ALPHA = 0.05
MIN_LABELS = 2


@dataclass(frozen=True)
class AuditEstimate:
    """Audited accuracy of one slice.

    Attributes
    ----------
    slice : str
    n : int
        Responses in the slice.
    n_labelled : int
        Responses with a human label.
    estimate, ci_low, ci_high : float
        PPI++ estimate and 95% interval (NaN with fewer than :data:`MIN_LABELS` labels).
    labels_only, labels_ci_low, labels_ci_high : float
        Labelled accuracy and its 95% Wilson interval (NaN without labels).
    unlabelled, unlabelled_ci_low, unlabelled_ci_high : float
        Mean P(correct) over all the slice's responses and its 95% interval: the sentinel
        file's band, or the Poisson-binomial (sampling) interval without one.
    lam : float
        The power-tuning weight used (0: labels only; 1: plain PPI).
    interval, unlabelled_interval : str
        What the intervals are: ``"ppi++"`` (the estimate's) and ``"band"`` or
        ``"sampling"`` (the unlabelled one's; :func:`sentinel_vllm.aggregate.interval_kind`).
    """

    slice: str
    n: int
    n_labelled: int
    estimate: float
    ci_low: float
    ci_high: float
    labels_only: float
    labels_ci_low: float
    labels_ci_high: float
    unlabelled: float
    unlabelled_ci_low: float
    unlabelled_ci_high: float
    lam: float
    interval: str = "ppi++"
    unlabelled_interval: str = "sampling"

    def as_dict(self) -> dict:
        """Plain dict with NaN as None (strict JSON)."""
        return {k: (None if isinstance(v, float) and math.isnan(v) else v)
                for k, v in asdict(self).items()}


def wilson_interval(k: int, n: int, alpha: float = ALPHA) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (scipy's ``binomtest``).

    Returns ``(nan, nan)`` when ``n == 0``.
    """
    if n == 0:
        return float("nan"), float("nan")
    from scipy.stats import binomtest

    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=1 - alpha, method="wilson")
    return float(ci.low), float(ci.high)


def ppi_interval(y_lab, p_lab, p_unlab, alpha: float = ALPHA,
                 method: str = "score") -> tuple[float, float, float, float]:
    """PPI++ (power-tuned) estimate and interval of a mean of 0/1 labels.

    Parameters
    ----------
    y_lab : array-like of {0, 1}, shape (n,)
        Human labels.
    p_lab : array-like of float, shape (n,)
        The sentinel's P(correct) on the same responses.
    p_unlab : array-like of float, shape (N,)
        The sentinel's P(correct) on the unlabelled responses.
    alpha : float, default 0.05
    method : {"score", "wald"}
        ``"wald"``: ``ppi_py.ppi_mean_ci`` as is (estimate +- z * se). ``"score"``
        (default): the same estimate and variance decomposition, inverted like
        Wilson's score interval: the set of ``theta`` with
        ``(est - theta)^2 <= z^2 (r * theta (1 - theta) / n + lam^2 var(P_unlab) / N)``,
        where ``r = var(y - lam P_lab) / var(y)`` is the variance reduction the
        sentinel buys (``r = 1`` when the labels are all equal). With ``lam = 0`` it is
        exactly the Wilson interval; for large n it equals the Wald form. It keeps
        its coverage on rare outcomes (accuracy near 0 or 1) where the Wald form,
        whose variance is estimated from a handful of positives, does not.

    Returns
    -------
    (estimate, ci_low, ci_high, lam)
        Clipped to [0, 1].

    Raises
    ------
    ValueError
        Fewer than :data:`MIN_LABELS` labels, no unlabelled responses, lengths that
        differ, or an unknown method.
    """
    from ppi_py import ppi_mean_ci, ppi_mean_pointestimate

    y = np.asarray(y_lab, dtype=np.float64).ravel()
    pl = np.asarray(p_lab, dtype=np.float64).ravel()
    pu = np.asarray(p_unlab, dtype=np.float64).ravel()
    if y.size != pl.size:
        raise ValueError(f"{y.size} labels but {pl.size} predictions for them")
    if y.size < MIN_LABELS:
        raise ValueError(f"PPI needs at least {MIN_LABELS} labels; got {y.size}")
    if pu.size == 0:
        raise ValueError("PPI needs unlabelled responses besides the labelled ones")
    if method not in ("score", "wald"):
        raise ValueError(f"unknown interval method {method!r}; use 'score' or 'wald'")
    lam = _tuned_lam(y, pl, pu)
    est = float(np.atleast_1d(ppi_mean_pointestimate(y, pl, pu, lam=lam))[0])
    clip = lambda v: min(1.0, max(0.0, v))
    if method == "wald":
        lo, hi = ppi_mean_ci(y, pl, pu, alpha=alpha, lam=lam)
        return clip(est), clip(float(np.atleast_1d(lo)[0])), clip(float(np.atleast_1d(hi)[0])), lam
    from scipy.stats import norm

    z = float(norm.ppf(1 - alpha / 2))
    n, N = y.size, pu.size
    var_y = float(np.var(y))
    r = float(np.var(y - lam * pl)) / var_y if var_y > 0 else 1.0
    a = r / n
    c = lam**2 * float(np.var(pu)) / N
    t = clip(est)
    # (t - theta)^2 <= z^2 (a theta (1 - theta) + c): a quadratic in theta
    qa, qb, qc = 1 + z**2 * a, -(2 * t + z**2 * a), t**2 - z**2 * c
    disc = max(qb * qb - 4 * qa * qc, 0.0)
    lo, hi = (-qb - math.sqrt(disc)) / (2 * qa), (-qb + math.sqrt(disc)) / (2 * qa)
    return t, clip(lo), clip(hi), lam


def _tuned_lam(y, pl, pu) -> float:
    """PPI++'s variance-minimising ``lam`` for a mean, computed exactly as
    ``ppi_py.ppi_mean_ci(..., lam=None)`` does (so it can be reported), in [0, 1]."""
    from ppi_py import ppi_mean_pointestimate
    from ppi_py.ppi import _calc_lam_glm

    if np.ptp(np.concatenate([pl, pu])) == 0:
        return 0.0                      # constant predictions carry no information
    pe = np.atleast_1d(ppi_mean_pointestimate(y, pl, pu, lam=1)).reshape(1, -1)
    lam = _calc_lam_glm(y.reshape(-1, 1) - pe, pl.reshape(-1, 1) - pe, pu.reshape(-1, 1) - pe,
                        np.eye(1), coord=None, clip=True)
    lam = float(np.atleast_1d(lam)[0])
    return min(1.0, max(0.0, lam)) if math.isfinite(lam) else 0.0


def audit_slice(name: str, p, labels: Sequence[bool | None], band=None) -> AuditEstimate:
    """Audit one slice: ``p`` for every response, ``labels`` (None where unlabelled);
    ``band``: the sentinel file's band metadata (the unlabelled estimate's interval).

    Raises
    ------
    ValueError
        ``p`` and ``labels`` of different lengths.
    """
    from sentinel_vllm.aggregate import estimate_accuracy

    p = np.asarray(p, dtype=np.float64).ravel()
    if len(labels) != p.size:
        raise ValueError(f"{p.size} scores but {len(labels)} labels")
    has = np.array([v is not None for v in labels], dtype=bool)
    y = np.array([bool(v) for v, h in zip(labels, has) if h], dtype=np.float64)
    un = estimate_accuracy(p, band=band)
    k, n_lab = int(y.sum()), int(has.sum())
    w_lo, w_hi = wilson_interval(k, n_lab)
    nan = float("nan")
    est = lo = hi = lam = nan
    if n_lab >= MIN_LABELS and (~has).any():
        est, lo, hi, lam = ppi_interval(y, p[has], p[~has])
    elif n_lab >= MIN_LABELS:          # everything labelled: the labels are the answer
        est, lo, hi, lam = k / n_lab, w_lo, w_hi, 0.0
    return AuditEstimate(name, int(p.size), n_lab, est, lo, hi,
                         k / n_lab if n_lab else nan, w_lo, w_hi,
                         un.estimate, un.ci_low, un.ci_high, lam, "ppi++", un.interval)


def audit_slices(slices: Sequence[str], p, ids: Sequence[str],
                 labels: Mapping[str, bool], band=None) -> list[AuditEstimate]:
    """:func:`audit_slice` for every slice, labels looked up by response id.

    Parameters
    ----------
    slices : sequence of str, shape (n,)
    p : array-like of float, shape (n,)
    ids : sequence of str, shape (n,)
    labels : mapping id -> bool
    band : dict, optional
        The sentinel file's band metadata (see :func:`audit_slice`).

    Returns
    -------
    list of AuditEstimate, in order of first appearance of each slice.

    Raises
    ------
    ValueError
        A label whose id is not among ``ids`` (the message counts and names the first),
        or one whose id several responses share (it would label all of them).
    """
    from collections import Counter

    counts = Counter(ids)
    unknown = [i for i in labels if i not in counts]
    if unknown:
        raise ValueError(f"{len(unknown)} labelled id(s) not in the traffic (first: {unknown[0]!r})")
    shared = [i for i in labels if counts[i] > 1]
    if shared:
        raise ValueError(f"labelled id {shared[0]!r} matches {counts[shared[0]]} responses in the "
                         f"traffic ({len(shared)} labelled id(s) are not unique); ids must name "
                         "one response (trace files with repeated ids: audit them one at a time)")
    p = np.asarray(p, dtype=np.float64)
    sl = np.asarray(slices)
    out = []
    for s in dict.fromkeys(sl.tolist()):
        m = sl == s
        out.append(audit_slice(s, p[m], [labels.get(i) for i, mm in zip(ids, m) if mm], band))
    return out


def parse_label(obj, where: str) -> tuple[str, bool]:
    """One label record ``{"id": ..., "correct": true|false}`` as ``(id, correct)``.

    The one definition of a label, for ``sentinel-vllm audit --labels`` files and
    ``POST /sentinel/labels`` bodies. Other keys are ignored.

    Raises
    ------
    ValueError
        ``where: reason`` for a record that is not an object with ``id`` (a non-empty
        string or an integer) and a boolean ``correct``.
    """
    if not isinstance(obj, dict) or "id" not in obj or "correct" not in obj:
        raise ValueError(f"{where}: a label needs 'id' and 'correct'")
    if not isinstance(obj["correct"], bool):
        raise ValueError(  # noqa: TRY004  (bad input: callers report ValueError)
            f"{where}: 'correct' must be true or false, got {_short(obj['correct'])}")
    ident = obj["id"]
    if isinstance(ident, bool) or not isinstance(ident, (str, int)) or ident == "":
        raise ValueError(f"{where}: 'id' must be a non-empty string, got {_short(ident)}")
    return str(ident), obj["correct"]


def labels_from(records) -> dict[str, bool]:
    """``{id: correct}`` from ``(where, record)`` pairs, each checked by :func:`parse_label`.

    Raises
    ------
    ValueError
        The first bad record (``where: reason``), or an id labelled both true and false.
    """
    out: dict[str, bool] = {}
    for where, obj in records:
        key, value = parse_label(obj, where)
        if key in out and out[key] != value:
            raise ValueError(f"{where}: id {key!r} labelled both true and false")
        out[key] = value
    return out


def _short(v, limit: int = 80) -> str:
    r = repr(v)
    return r if len(r) <= limit else r[:limit] + "..."


def read_labels(path: str) -> dict[str, bool]:
    """Read ``{"id": ..., "correct": true|false}`` JSON lines (:func:`parse_label`).

    Raises
    ------
    ValueError
        ``file:line: reason`` for bad JSON, a missing key, a non-boolean ``correct``
        an id labelled twice with different values, or a file without labels.
    """
    import gzip

    opener = gzip.open if str(path).endswith(".gz") else open

    def records(fh):
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{i}", json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not JSON ({e.msg})") from None

    with opener(path, "rt", encoding="utf-8") as fh:
        out = labels_from(records(fh))
    if not out:
        raise ValueError(f"{path}: no labels")
    return out
