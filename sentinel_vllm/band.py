"""The band: a 95% interval for a slice's TRUE accuracy, fitted on held-out units.

The Poisson-binomial interval of :mod:`sentinel_vllm.aggregate` (``1.96 * se``,
``se = sqrt(sum p(1-p)) / n``) is the sampling noise of a perfectly calibrated
sentinel; on a benchmark or temperature the sentinel was not trained on, its
estimate is also biased, and that part does not shrink with traffic. The band adds
it, measured where it arises: on the held-out (benchmark, temperature) units of the
leave-one-benchmark-out protocol (:func:`sentinel_vllm.protocol.lobo`).

Model. For a unit u with estimate ``A_hat``, true accuracy ``A`` and sampling
standard error ``se``, the conformity score is the error beyond the sampling part:

``s_u = |A_hat - A| - 1.96 * se``                      (method ``conformal-linear``)

and ``q`` is the conformal quantile of the N unit scores: the ``k``-th smallest with
``k = ceil((N + 1) * 0.95)``, capped at ``N`` (with fewer than 19 units no finite
quantile reaches 0.95; the cap makes ``q`` the largest score, a level of
``N / (N + 1)``). A new slice of ``n`` responses then gets

``A_hat +- (max(q, 0) + 1.96 * se)``, clipped to [0, 1]

which covers its true accuracy with probability >= 0.95 (split conformal prediction)
if the slice is exchangeable with the units, i.e. as unlike the training benchmarks
as the held-out benchmarks were. The score subtracts the unit's own sampling part, so
the band stays valid at any slice size; it shrinks toward ``q``, not zero, with traffic.
Other scores (``conformal-quadrature``: ``sqrt(max(err^2 - (1.96 se)^2, 0))``, shown
``sqrt(q^2 + (1.96 se)^2)``; ``conformal-abs``: ``err``, shown ``q``; ``normal-units``:
a random effect of variance ``tau^2 = mean(err^2 - se^2)``, shown
``1.96 sqrt(tau^2 + se^2)``) are measured beside it by :func:`nested_coverage`;
benchmarks/RESULTS.md ("Bands that tell the truth") says why the product uses linear.

Nested judgement (:func:`nested_units`): the band shown for a unit of benchmark b uses
a ``q`` fitted on an inner leave-one-benchmark-out run over the traces WITHOUT b (every
temperature), so no unit is judged by a band it helped fit. Fits are memoised by their
training data: the inner runs mostly retrain the outer folds' classifiers.
"""

from __future__ import annotations

import hashlib
import math
from typing import Sequence

import numpy as np

from sentinel_vllm.aggregate import BAND_METHOD, Z_95, band_halfwidth

__all__ = ["LEVEL", "METHODS", "conformal_quantile", "fit_band", "halfwidth", "memo_factory",
           "nested_coverage", "nested_units", "unit_score"]

LEVEL = 0.95
#: the product's method first; the others are measured beside it
METHODS = (BAND_METHOD, "conformal-quadrature", "conformal-abs", "normal-units", "sampling")


def unit_score(err: float, se: float, method: str = BAND_METHOD) -> float:
    """Conformity score of one held-out unit (absolute error ``err``, sampling se ``se``)."""
    if method == "conformal-linear":
        return err - Z_95 * se
    if method == "conformal-quadrature":
        return math.sqrt(max(err * err - (Z_95 * se) ** 2, 0.0))
    if method == "conformal-abs":
        return err
    raise ValueError(f"method {method!r} has no conformity score; known: {METHODS}")


def halfwidth(se: float, q: float, method: str = BAND_METHOD) -> float:
    """Half-width of the interval shown for a slice of sampling se ``se`` under ``q``."""
    if method == BAND_METHOD:
        return band_halfwidth(se, {"method": method, "q": q})
    if method == "conformal-quadrature":
        return math.hypot(q, Z_95 * se)
    if method == "conformal-abs":
        return q
    if method == "normal-units":
        return Z_95 * math.hypot(q, se)
    if method == "sampling":
        return Z_95 * se
    raise ValueError(f"unknown band method {method!r}; known: {METHODS}")


def conformal_quantile(scores: Sequence[float], level: float = LEVEL) -> tuple[float, int]:
    """The ``k``-th smallest score, ``k = min(ceil((N + 1) * level), N)``; returns ``(q, k)``.

    Raises
    ------
    ValueError
        Without scores, or a level outside (0, 1).
    """
    s = np.sort(np.asarray(scores, dtype=np.float64))
    if s.size == 0:
        raise ValueError("a conformal quantile needs at least one held-out unit")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    k = min(math.ceil((s.size + 1) * level - 1e-12), s.size)
    return float(s[k - 1]), int(k)


def fit_band(rows: Sequence[dict], method: str = BAND_METHOD, level: float = LEVEL) -> dict:
    """Fit the band's ``q`` on held-out unit rows (``estimated``, ``true``, ``se``, ``unit``).

    Returns
    -------
    dict
        ``method``, ``level``, ``q``, ``n_units``, ``rank`` (the ``k`` above; None for
        ``normal-units`` and ``sampling``) and ``units`` (unit -> error, se, score).
    """
    err = [abs(r["estimated"] - r["true"]) for r in rows]
    se = [r["se"] for r in rows]
    units = {r["unit"]: {"error": e, "se": s} for r, e, s in zip(rows, err, se)}
    out = {"method": method, "level": level, "n_units": len(rows), "rank": None, "units": units}
    if method == "sampling":
        return {**out, "q": 0.0}
    if method == "normal-units":
        if not rows:
            raise ValueError("the band needs at least one held-out unit")
        tau2 = float(np.mean([e * e - s * s for e, s in zip(err, se)]))
        return {**out, "q": math.sqrt(max(tau2, 0.0))}
    scores = [unit_score(e, s, method) for e, s in zip(err, se)]
    for u, sc in zip(units.values(), scores):
        u["score"] = sc
    q, k = conformal_quantile(scores, level)
    return {**out, "q": max(q, 0.0), "rank": k}


class _MemoFactory:
    """A classifier factory whose ``fit`` returns a cached classifier for repeated data."""

    def __init__(self, factory):
        self.factory, self.fits = factory, {}

    def __call__(self):
        return self

    def fit(self, X, y):
        key = hashlib.sha256(np.ascontiguousarray(X).tobytes() + repr(X.shape).encode()
                             + np.ascontiguousarray(y).tobytes()).hexdigest()
        if key not in self.fits:
            self.fits[key] = self.factory().fit(X, y)
        return self.fits[key]


def memo_factory(random_state: int = 0, classifier_params: dict | None = None) -> _MemoFactory:
    """The sentinel's classifier factory, memoised by training data (pass to ``lobo`` and
    :func:`nested_units` so repeated folds are fitted once)."""
    from sentinel_vllm.protocol import _default_factory

    return _MemoFactory(_default_factory(random_state, classifier_params))


def nested_units(traces, *, random_state: int = 0, classifier_params: dict | None = None,
                 classifier_factory=None, **lobo_kwargs) -> tuple[list[dict], dict]:
    """Outer leave-one-benchmark-out rows and, per held-out benchmark, the inner rows.

    Parameters
    ----------
    traces : sequence of Trace
    **lobo_kwargs
        The recipe, as :func:`sentinel_vllm.protocol.lobo` takes it (composition,
        feature_set, entropy, k, train_temperatures, test_temperatures); estimator pcc.

    Returns
    -------
    (outer, inner)
        ``outer``: the pcc rows of every held-out unit; ``inner[b]``: the pcc rows of the
        same protocol run on the traces without benchmark ``b`` (empty when fewer than
        two benchmarks remain).
    """
    from sentinel_vllm.protocol import _default_factory, lobo

    memo = _MemoFactory(classifier_factory or _default_factory(random_state, classifier_params))
    kw = {**lobo_kwargs, "estimators": ("pcc",), "random_state": random_state,
          "classifier_factory": memo}
    outer = lobo(traces, **kw)["pcc"].rows
    inner = {}
    for b in dict.fromkeys(r["held_out"] for r in outer):
        rest = [t for t in traces if t.slice != b]
        try:
            inner[b] = lobo(rest, **kw)["pcc"].rows
        except ValueError:  # fewer than two benchmarks, or no test traces left
            inner[b] = []
    return outer, inner


def nested_coverage(outer: Sequence[dict], inner: dict, method: str = BAND_METHOD,
                    level: float = LEVEL) -> dict:
    """Coverage of the band on every outer unit, ``q`` fitted on that unit's inner rows.

    Returns
    -------
    dict
        ``method``, ``coverage`` (share of units whose true accuracy lies in the clipped
        interval), ``mean_halfwidth`` (unclipped), ``n_units``, ``misses`` (unit names) and
        ``rows`` (per unit: ``unit``, ``estimated``, ``true``, ``se``, ``q``, ``halfwidth``,
        ``low``, ``high``, ``covered``). A unit without inner rows gets ``q = inf``.
    """
    rows = []
    for r in outer:
        inn = inner.get(r["held_out"], [])
        q = fit_band(inn, method, level)["q"] if inn else math.inf
        h = halfwidth(r["se"], q, method)
        lo, hi = max(0.0, r["estimated"] - h), min(1.0, r["estimated"] + h)
        rows.append({"unit": r["unit"], "estimated": r["estimated"], "true": r["true"],
                     "se": r["se"], "q": q, "halfwidth": h, "low": lo, "high": hi,
                     "covered": bool(lo - 1e-12 <= r["true"] <= hi + 1e-12)})
    cov = float(np.mean([r["covered"] for r in rows])) if rows else float("nan")
    width = float(np.mean([r["halfwidth"] for r in rows])) if rows else float("nan")
    return {"method": method, "coverage": cov, "mean_halfwidth": width, "n_units": len(rows),
            "misses": [r["unit"] for r in rows if not r["covered"]], "rows": rows}
