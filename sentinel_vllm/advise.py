"""Composition advice: rank candidate training compositions from their traces alone.

A composition is a set of benchmarks (slices) to train the sentinel on. The
advice needs no model fit; it scores each candidate by

``accuracy_spread``
    max - min accuracy of its benchmarks: the paper's rule (train on the easiest
    and the hardest benchmark) generalised;
``entropy_coverage``
    share of ALL benchmarks whose mean per-step entropy (full, nats) lies inside
    the candidate's range of mean entropies: a sentinel extrapolates worst on
    entropy profiles it has never seen.

Candidates are ranked by ``accuracy_spread`` (the ``score``), ties broken by
``entropy_coverage``, best first. (Ranking by the sum of both was tried first and
lost on the project's traces: its first choice, MAWPS + OCW, came 7th of 21 under
:func:`check_advice`, the spread's first choice 3rd; the spread rule is also what
wins leave-one-benchmark-out, benchmarks/RESULTS.md.) :func:`check_advice`
measures each candidate (train on the candidate's traces, estimate every other
benchmark) so the advice can be judged by where its first choice lands.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from sentinel_vllm.traces import Trace

__all__ = ["ADVICE_COLUMNS", "advise", "check_advice"]

ADVICE_COLUMNS = ["rank", "composition", "accuracy_spread", "entropy_coverage", "score"]


def _profiles(traces: Sequence[Trace]) -> tuple[dict, dict]:
    acc, ent = {}, {}
    for s in dict.fromkeys(t.slice for t in traces):
        ts = [t for t in traces if t.slice == s]
        acc[s] = float(np.mean([t.correct for t in ts]))
        means = [float(np.mean(t.series("full"))) for t in ts if t.series("full")]
        ent[s] = float(np.mean(means)) if means else float("nan")
    return acc, ent


def advise(traces: Sequence[Trace], size: int = 2) -> list[dict]:
    """Rank every composition of ``size`` benchmarks, best first.

    Parameters
    ----------
    traces : sequence of Trace
        Labelled traces (unlabelled ones are ignored); the ``full`` series is read.
    size : int, default 2

    Returns
    -------
    list of dict
        Keys :data:`ADVICE_COLUMNS` (``composition`` is a tuple of slice names).

    Raises
    ------
    ValueError
        Fewer than ``size`` labelled benchmarks.
    """
    lab = [t for t in traces if t.correct is not None]
    acc, ent = _profiles(lab)
    if len(acc) < size:
        raise ValueError(f"need at least {size} labelled benchmarks; have {sorted(acc)}")
    all_ent = np.array([ent[s] for s in acc])
    rows = []
    for comp in itertools.combinations(sorted(acc), size):
        a = [acc[s] for s in comp]
        e = [ent[s] for s in comp]
        spread = max(a) - min(a)
        cover = float(np.mean((all_ent >= min(e)) & (all_ent <= max(e))))
        rows.append({"composition": comp, "accuracy_spread": spread, "entropy_coverage": cover,
                     "score": spread})
    rows.sort(key=lambda r: (-r["score"], -r["entropy_coverage"], r["composition"]))
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    return rows


def check_advice(traces: Sequence[Trace], advice: Sequence[dict], *, random_state: int = 0,
                 classifier_factory=None) -> list[dict]:
    """Measure each advised composition: train on all its traces, estimate every other benchmark.

    Returns
    -------
    list of dict
        Per candidate, in ``advice`` order: ``composition``, ``rank`` (advice),
        ``median_aee``, ``mean_aee``, ``worst_aee`` over the unseen benchmarks and
        ``protocol_rank`` (1 = lowest worst AEE, ties by mean AEE).
    """
    from sentinel_vllm.feature_sets import feature_set_matrix
    from sentinel_vllm.protocol import summarise

    lab = [t for t in traces if t.correct is not None]
    X = feature_set_matrix(lab, "paper")
    y = np.array([t.correct for t in lab], dtype=int)
    sl = np.array([t.slice for t in lab])
    if classifier_factory is None:
        from sentinel_vllm.classifier import SentinelClassifier

        def classifier_factory():
            return SentinelClassifier(random_state=random_state)

    out = []
    for a in advice:
        m = np.isin(sl, a["composition"])
        clf = classifier_factory().fit(X[m], y[m])
        rows = []
        for s in dict.fromkeys(sl[~m].tolist()):
            ms = sl == s
            est = float(np.mean(clf.predict_proba(X[ms])[:, 1]))
            rows.append({"unit": s, "estimated": est, "true": float(y[ms].mean()),
                         "aee": abs(est - float(y[ms].mean()))})
        s = summarise(rows)
        out.append({"composition": a["composition"], "rank": a["rank"], "median_aee": s["median_aee"],
                    "mean_aee": s["mean_aee"], "worst_aee": s["worst_aee"]})
    order = sorted(range(len(out)), key=lambda i: (out[i]["worst_aee"], out[i]["mean_aee"]))
    for r, i in enumerate(order, 1):
        out[i]["protocol_rank"] = r
    return out
