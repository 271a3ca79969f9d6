"""Feature sets beyond the paper's 11 statistics (an ablation; ``paper`` is the reference).

A feature set is a named list of feature groups; each group maps a trace to a
few numbers with fixed names. The names are what a sentinel file records in its
``feature_names`` metadata, so a file says which set it uses.

Groups
------
``stats``
    The 11 statistics of the chosen entropy series (:data:`~sentinel_vllm.features.FEATURE_NAMES`).
``length``
    ``log_n_steps = log(1 + T)`` (T = number of generated tokens, the series length) and
    ``truncated`` (1.0 when ``finish_reason == "length"``). Serving has both
    (the worker contract returns ``n_steps`` and ``truncated``).
``tail``
    Mean, population std and max of the entropy of the last :data:`TAIL` steps (where the
    answer is written; the whole trajectory when shorter; zeros when empty).
``logprob``
    Statistics of the sampled token's log-probability (``token_logprob`` in the traces):
    mean, population std, min and the 10% quantile (linear interpolation); zeros when empty.
``topk``
    The 11 statistics of the top-k series (the trace's own ``k``) besides the chosen
    series, names prefixed ``topk_``.

Only ``stats`` and ``length`` can be computed by serving today; the others need more
from the worker (see :data:`SERVABLE`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from sentinel_vllm.features import FEATURE_NAMES, compute_features
from sentinel_vllm.traces import MissingSeriesError, Trace

__all__ = [
    "FEATURE_SETS",
    "SERVABLE",
    "TAIL",
    "feature_names",
    "feature_set_matrix",
    "length_features",
    "logprob_features",
    "tail_features",
]

TAIL = 32

GROUP_NAMES: dict[str, tuple[str, ...]] = {
    "stats": FEATURE_NAMES,
    "length": ("log_n_steps", "truncated"),
    "tail": (f"tail{TAIL}_mean", f"tail{TAIL}_std", f"tail{TAIL}_max"),
    "logprob": ("logprob_mean", "logprob_std", "logprob_min", "logprob_q10"),
    "topk": tuple(f"topk_{n}" for n in FEATURE_NAMES),
}

FEATURE_SETS: dict[str, tuple[str, ...]] = {
    "paper": ("stats",),
    "paper+length": ("stats", "length"),
    "paper+tail": ("stats", "tail"),
    "paper+logprob": ("stats", "logprob"),
    "paper+topk": ("stats", "topk"),
    "all": ("stats", "length", "tail", "logprob", "topk"),
}

# Feature sets serving can compute from the worker contract (11 stats + n_steps + truncated).
SERVABLE = frozenset({"paper", "paper+length"})


def _check_set(name: str) -> tuple[str, ...]:
    if name not in FEATURE_SETS:
        raise ValueError(f"unknown feature set {name!r}; known: {', '.join(FEATURE_SETS)}")
    return FEATURE_SETS[name]


def feature_names(name: str) -> tuple[str, ...]:
    """Column names of feature set ``name``, in matrix order.

    Raises
    ------
    ValueError
        Unknown set.
    """
    return tuple(n for g in _check_set(name) for n in GROUP_NAMES[g])


def length_features(n_steps: int, truncated: bool) -> np.ndarray:
    """``[log(1 + n_steps), 1.0 if truncated else 0.0]``."""
    return np.array([math.log1p(max(int(n_steps), 0)), 1.0 if truncated else 0.0])


def tail_features(series: Sequence[float], tail: int = TAIL) -> np.ndarray:
    """Mean, population std and max of the last ``tail`` values (zeros when empty)."""
    x = np.asarray(series, dtype=np.float64)[-tail:] if len(series) else np.zeros(0)
    if x.size == 0:
        return np.zeros(3)
    return np.array([x.mean(), x.std(), x.max()])


def logprob_features(logprobs: Sequence[float | None]) -> np.ndarray:
    """Mean, population std, min and 10% quantile of the sampled tokens' logprobs.

    ``None`` entries (steps without a logprob) are dropped; zeros when none is left.
    """
    x = np.asarray([v for v in logprobs if v is not None], dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return np.zeros(4)
    return np.array([x.mean(), x.std(), x.min(), np.quantile(x, 0.10)])


def _truncated(t: Trace) -> bool:
    fr = t.extra.get("finish_reason")
    if fr is not None:
        return fr == "length"
    if "truncated" in t.extra:
        return bool(t.extra["truncated"])
    raise MissingSeriesError(f"trace {t.id!r} has neither finish_reason nor truncated "
                             "(needed by the length features)")


def _group(t: Trace, group: str, entropy: str, k: int | None) -> np.ndarray:
    s = t.series(entropy, k)
    if group in ("stats", "length", "tail") and s is None:
        raise MissingSeriesError(f"trace {t.id!r} lacks the {entropy} entropy series")
    if group == "stats":
        return compute_features(s)
    if group == "length":
        return length_features(len(s), _truncated(t))
    if group == "tail":
        return tail_features(s)
    if group == "logprob":
        lp = t.extra.get("token_logprob")
        if lp is None:
            raise MissingSeriesError(f"trace {t.id!r} has no token_logprob (needed by the logprob features)")
        return logprob_features(lp)
    if group == "topk":
        tk = t.series("topk")
        if tk is None:
            raise MissingSeriesError(f"trace {t.id!r} lacks the topk entropy series")
        return compute_features(tk)
    raise ValueError(f"unknown feature group {group!r}")


def feature_set_matrix(traces: Sequence[Trace], name: str = "paper", entropy: str = "full",
                       k: int | None = None) -> np.ndarray:
    """Feature matrix of feature set ``name``.

    Parameters
    ----------
    traces : sequence of Trace
    name : str, default "paper"
        A key of :data:`FEATURE_SETS`.
    entropy, k : the series the ``stats``, ``length`` and ``tail`` groups read.

    Returns
    -------
    ndarray of float64, shape (n_traces, len(feature_names(name)))

    Raises
    ------
    ValueError
        Unknown set; :class:`~sentinel_vllm.traces.MissingSeriesError` when a trace lacks
        what a group needs (the message names the trace).
    """
    groups = _check_set(name)
    width = len(feature_names(name))
    rows = [np.concatenate([_group(t, g, entropy, k) for g in groups]) for t in traces]
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), width)
