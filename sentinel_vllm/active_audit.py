"""Active labelling: which responses to label, and the audit valid for that choice.

Active statistical inference (Zrnic & Candes 2024) with a fixed number of labels:
per slice, ``n`` responses are drawn WITH replacement, response ``i`` with
probability

    q_i = (1 - eta) * sqrt(p_i (1 - p_i)) / sum_k sqrt(p_k (1 - p_k)) + eta / N

(``p`` the sentinel's P(correct), ``N`` the slice's responses, ``eta`` =
:data:`ETA`): the responses the sentinel is least sure of are drawn more often,
and every response keeps ``q_i >= eta / N`` (no response is out of reach, and no
weight exceeds ``1 / eta``). A response drawn twice is labelled once and counts
twice. The slice's accuracy is the power-tuned Hansen-Hurwitz estimate

    theta = lam * mean(p) + (1/n) sum_j w_j (y_j - lam * p_j),   w_j = 1 / (N q_j),

unbiased for the slice's accuracy whatever ``lam`` and the sentinel's bias (the
draws are iid, ``E[w (y - lam p)] = mean(y - lam p)``), with variance
``var(w (y - lam p)) / n + lam^2 var(p) / N``; ``lam`` minimises it. ppi-python's
sample weights (``ppi_mean_ci(..., w=w)``) are the same formulas except that it rescales
``w`` to mean 1 (a ratio estimator, biased for a fixed design), so they are computed
here; with weights of mean 1 the two agree (tests). The interval inverts it like
Wilson's score interval (as :func:`sentinel_vllm.audit.ppi_interval` does for random
labels): ``(theta - t)^2 <= z^2 (r t (1 - t) / n + c)`` with ``r`` the variance of
``w (y - lam p)`` relative to a Bernoulli draw at the labels' weighted mean (when all
labels are equal: ``lam = 0`` and ``r`` = Kish's design effect ``mean(w^2) /
mean(w)^2``), ``c = lam^2 var(p) / N``. With ``eta = 1`` (uniform draws) it is the
random-label audit.

A *plan* records the design so that the estimate uses the same probabilities
later, whatever happens to the traces or the sentinel: per slice the population's
ids, their ``p`` and ``q`` and the drawn ids, with the sentinel's id and the seed
(:func:`make_plan`, :func:`check_plan`).
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from sentinel_vllm.audit import ALPHA, MIN_LABELS, AuditEstimate

__all__ = [
    "ETA",
    "PLAN_FORMAT",
    "SliceDesign",
    "active_interval",
    "audit_design",
    "check_plan",
    "draw_probabilities",
    "make_plan",
    "plan_labels",
    "read_plan",
    "suggest",
    "write_plan",
]

#: Share of the uniform design in the mix: no weight above 1 / ETA = 2, whatever the sentinel
#: says (robust when its uncertainty is wrong on a slice); benchmarks/RESULTS.md shows 0.2 beside it.
ETA = 0.5
PLAN_FORMAT = "sentinel-vllm active-labelling plan"
METHOD = "hansen-hurwitz: n iid draws, q = (1 - eta) sqrt(p(1-p)) / sum + eta / N"


def draw_probabilities(p, eta: float = ETA) -> np.ndarray:
    """The design's per-draw probabilities ``q`` (sum 1) for P(correct) ``p``.

    Raises
    ------
    ValueError
        No responses, ``p`` outside [0, 1] or not finite, or ``eta`` outside (0, 1].
    """
    p = np.asarray(p, dtype=np.float64).ravel()
    if p.size == 0:
        raise ValueError("no responses to draw from")
    if not np.all(np.isfinite(p)) or p.min() < 0 or p.max() > 1:
        raise ValueError("P(correct) must be finite and in [0, 1]")
    if not 0 < eta <= 1:
        raise ValueError(f"eta must be in (0, 1], got {eta}")
    unc = np.sqrt(p * (1 - p))
    total = float(unc.sum())
    if total == 0:  # every p is 0 or 1: nothing to prefer
        return np.full(p.size, 1.0 / p.size)
    return (1 - eta) * unc / total + eta / p.size


@dataclass(frozen=True)
class SliceDesign:
    """One slice's design and what was drawn (the part of a plan an estimate needs).

    Attributes
    ----------
    population : int
        Responses the draws came from (``N``).
    p_sum, p_sum2 : float
        Sum of their P(correct) and of its square (the mean and variance of ``p``).
    draws : list of (id, q, p)
        The drawn responses in draw order, with their draw probability and P(correct);
        an id drawn twice is listed twice.
    """

    population: int
    p_sum: float
    p_sum2: float
    draws: list

    @classmethod
    def of(cls, p_population, draws) -> SliceDesign:
        p = np.asarray(p_population, dtype=np.float64)
        return cls(int(p.size), float(p.sum()), float((p * p).sum()),
                   [(str(i), float(q), float(pp)) for i, q, pp in draws])


def suggest(ids: Sequence[str], p, n: int, rng, eta: float = ETA) -> tuple[np.ndarray, list[int]]:
    """Draw ``n`` responses (with replacement); ``(q, drawn indices)``.

    Raises
    ------
    ValueError
        ``n < 1``, or :func:`draw_probabilities`'s errors.
    """
    if int(n) < 1:
        raise ValueError(f"the number of labels to suggest must be at least 1, got {n}")
    q = draw_probabilities(p, eta)
    if len(ids) != q.size:
        raise ValueError(f"{len(ids)} ids but {q.size} scores")
    return q, [int(i) for i in rng.choice(q.size, size=int(n), replace=True, p=q)]


def active_interval(y, p_lab, w, population: int, p_sum: float, p_sum2: float, alpha: float = ALPHA,
                    lam: float | None = None, method: str = "score") -> tuple[float, float, float, float]:
    """Power-tuned Hansen-Hurwitz estimate and score interval (module docstring).

    Parameters
    ----------
    y, p_lab, w : array-like, shape (n,)
        Labels (0/1), P(correct) and weight ``1 / (N q)`` of each labelled draw.
    population, p_sum, p_sum2 : int, float, float
        ``N`` and the sums of ``p`` and ``p^2`` over the population.
    lam : float, optional
        Fixed weight (0: labels only); None tunes it.
    method : {"score", "wald"}
        ``"wald"``: estimate +- z * se (``ppi_py.ppi_mean_ci(y, p_lab, p_all, lam=lam, w=w)``
        when ``w`` has mean 1); ``"score"`` (default): inverted like Wilson's interval.

    Returns
    -------
    (estimate, ci_low, ci_high, lam), clipped to [0, 1].

    Raises
    ------
    ValueError
        Fewer than :data:`MIN_LABELS` draws, lengths that differ, weights not positive, or
        an unknown method.
    """
    y, pl, w = (np.asarray(v, dtype=np.float64).ravel() for v in (y, p_lab, w))
    if not y.size == pl.size == w.size:
        raise ValueError(f"{y.size} labels, {pl.size} predictions and {w.size} weights")
    if y.size < MIN_LABELS:
        raise ValueError(f"the audit needs at least {MIN_LABELS} labels; got {y.size}")
    if not np.all(w > 0):
        raise ValueError("design weights must be positive")
    if method not in ("score", "wald"):
        raise ValueError(f"unknown interval method {method!r}; use 'score' or 'wald'")
    n, N = y.size, int(population)
    p_mean = p_sum / N
    p_var = max(p_sum2 / N - p_mean**2, 0.0)
    wy, wf = w * y, w * pl
    equal = bool(np.ptp(y) == 0)
    if lam is None:
        denom = float(np.var(wf)) + n / N * p_var
        lam = 0.0 if equal or denom <= 0 else float(np.cov(wy, wf, ddof=0)[0, 1]) / denom
        lam = min(1.0, max(0.0, lam)) if math.isfinite(lam) else 0.0
    z_terms = wy - lam * wf
    est = lam * p_mean + float(z_terms.mean())
    hajek = float(wy.sum() / w.sum())
    if equal or not 0 < hajek < 1:
        r = float(np.mean(w * w) / np.mean(w) ** 2)  # Kish's design effect
    else:
        r = float(np.var(z_terms)) / (hajek * (1 - hajek))
    zq = _z(alpha)
    if method == "wald":
        half = zq * math.sqrt(float(np.var(z_terms)) / n + lam**2 * p_var / N)
        clip = lambda v: min(1.0, max(0.0, v))
        return clip(est), clip(est - half), clip(est + half), lam
    return (*_score_bounds(est, r / n, lam**2 * p_var / N, zq), lam)


@functools.lru_cache(maxsize=8)
def _z(alpha: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(1 - alpha / 2))


def _score_bounds(est: float, a: float, c: float, z: float) -> tuple[float, float, float]:
    """``t`` and the roots of ``(t - theta)^2 = z^2 (a theta (1 - theta) + c)``, clipped."""
    clip = lambda v: min(1.0, max(0.0, v))
    t = clip(est)
    qa, qb, qc = 1 + z**2 * a, -(2 * t + z**2 * a), t**2 - z**2 * c
    disc = max(qb * qb - 4 * qa * qc, 0.0)
    return t, clip((-qb - math.sqrt(disc)) / (2 * qa)), clip((-qb + math.sqrt(disc)) / (2 * qa))


def audit_design(name: str, design: SliceDesign, labels: Mapping[str, bool],
                 band=None) -> AuditEstimate:
    """The slice's :class:`~sentinel_vllm.audit.AuditEstimate` under an active design.

    ``n`` is the design's population; ``n_labelled`` the labelled draws (an id drawn
    twice counts twice; unlabelled draws are left out). ``labels_only`` is the same
    estimator with ``lam = 0`` (the labels reweighted by the design, without the
    sentinel's scores); ``unlabelled`` the population's mean P(correct) with the interval
    :func:`sentinel_vllm.aggregate.estimate_accuracy` gives it (``band``: the sentinel
    file's band metadata, None: sampling noise), from the design's sums
    (``sum p(1-p) = p_sum - p_sum2``).
    """
    from sentinel_vllm.aggregate import band_halfwidth, interval_kind

    nan = float("nan")
    got = [(labels[i], q, p) for i, q, p in design.draws if i in labels]
    N = design.population
    est = lo = hi = lam = lab = lab_lo = lab_hi = nan
    if len(got) >= MIN_LABELS:
        y = np.array([float(v) for v, _, _ in got])
        pl = np.array([p for _, _, p in got])
        w = 1.0 / (N * np.array([q for _, q, _ in got]))
        sums = (N, design.p_sum, design.p_sum2)
        est, lo, hi, lam = active_interval(y, pl, w, *sums)
        lab, lab_lo, lab_hi, _ = active_interval(y, pl, w, *sums, lam=0.0)
    un = un_lo = un_hi = nan
    if N:
        un = design.p_sum / N
        h = band_halfwidth(math.sqrt(max(design.p_sum - design.p_sum2, 0.0)) / N, band)
        un_lo, un_hi = max(0.0, un - h), min(1.0, un + h)
    return AuditEstimate(name, N, len(got), est, lo, hi, lab, lab_lo, lab_hi,
                         un, un_lo, un_hi, lam, "ppi++", interval_kind(band))


# ---- plan files --------------------------------------------------------------------------

def make_plan(sentinel_id: str, slices: Sequence[str], ids: Sequence[str], p, n: int,
              seed: int, traces: Sequence[str] = (), eta: float = ETA) -> dict:
    """Draw ``n`` ids per slice; the plan (a JSON-able dict).

    Raises
    ------
    ValueError
        Ids that are not unique (a label must name one response), or :func:`suggest`'s errors.
    """
    from collections import Counter

    dup = [i for i, c in Counter(ids).items() if c > 1]
    if dup:
        raise ValueError(f"id {dup[0]!r} names {Counter(ids)[dup[0]]} responses ({len(dup)} ids "
                         "are not unique); a plan needs one response per id")
    rng = np.random.default_rng(seed)
    p = np.asarray(p, dtype=np.float64)
    sl = np.asarray(slices)
    out = {}
    for s in dict.fromkeys(sl.tolist()):
        idx = np.flatnonzero(sl == s)
        sid = [str(ids[i]) for i in idx]
        q, drawn = suggest(sid, p[idx], n, rng, eta)
        out[s] = {"ids": sid, "p": p[idx].tolist(), "q": q.tolist(),
                  "draws": [sid[j] for j in drawn]}
    return {"format": PLAN_FORMAT, "version": 1, "method": METHOD, "eta": eta, "n": int(n),
            "seed": int(seed), "sentinel": sentinel_id, "traces": [str(t) for t in traces],
            "slices": out}


def write_plan(path: str, plan: dict) -> None:
    """Write a new plan file; an existing file is never replaced (FileExistsError)."""
    with open(path, "x", encoding="utf-8") as fh:
        json.dump(plan, fh)
        fh.write("\n")


def read_plan(path: str) -> dict:
    """Read and check a plan file (:func:`check_plan`).

    Raises
    ------
    ValueError
        Not JSON, not a plan, or an inconsistent one (the reason named).
    """
    try:
        with open(path, encoding="utf-8") as fh:
            plan = json.load(fh)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e.msg})") from None
    return check_plan(plan, os.fspath(path))


def check_plan(plan, where: str = "plan") -> dict:
    """The plan, or ValueError naming what is wrong with it."""
    if not isinstance(plan, dict) or plan.get("format") != PLAN_FORMAT:
        raise ValueError(f"{where}: not an active-labelling plan (made by `sentinel-vllm audit "
                         "--suggest N --plan FILE`)")
    if plan.get("version") != 1:
        raise ValueError(f"{where}: plan version {plan.get('version')!r}; this install reads 1")
    if not isinstance(plan.get("slices"), dict) or not isinstance(plan.get("sentinel"), str):
        raise ValueError(f"{where}: the plan has no 'slices' or no 'sentinel'")  # noqa: TRY004
    for s, d in plan["slices"].items():
        ok = isinstance(d, dict) and all(isinstance(d.get(k), list) for k in ("ids", "p", "q", "draws"))
        if not ok or not len(d["ids"]) == len(d["p"]) == len(d["q"]) or not d["ids"]:
            raise ValueError(f"{where}: slice {s!r}: needs lists 'ids', 'p', 'q' of one length and 'draws'")
        q = np.asarray(d["q"], dtype=np.float64)
        if not np.all(q > 0) or abs(q.sum() - 1) > 1e-6:
            raise ValueError(f"{where}: slice {s!r}: draw probabilities must be positive and sum to 1")
        missing = set(d["draws"]) - set(d["ids"])
        if missing:
            raise ValueError(f"{where}: slice {s!r}: drawn id {min(missing)!r} is not in its population")
    return plan


def plan_designs(plan: dict) -> dict[str, SliceDesign]:
    """``{slice: SliceDesign}`` of a checked plan."""
    out = {}
    for s, d in plan["slices"].items():
        at = {i: k for k, i in enumerate(d["ids"])}
        out[s] = SliceDesign.of(d["p"], [(i, d["q"][at[i]], d["p"][at[i]]) for i in d["draws"]])
    return out


def plan_labels(plan: dict, labels: Mapping[str, bool]) -> list[str]:
    """Check labels against a plan; the drawn ids left unlabelled.

    Raises
    ------
    ValueError
        Labels for ids the plan did not draw (counted, the first named): the design says
        nothing about them, and they would bias the estimate.
    """
    drawn = {i for d in plan["slices"].values() for i in d["draws"]}
    extra = [i for i in labels if i not in drawn]
    if extra:
        raise ValueError(f"{len(extra)} labelled id(s) were not drawn by the plan (first: {extra[0]!r}); "
                         "label the ids `--suggest` printed, or audit without --plan")
    return sorted(drawn - set(labels))
