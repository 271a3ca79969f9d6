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
``sampling``
    ``temperature`` and ``top_p`` the response was sampled with (:func:`sampling_features`:
    the effective values; greedy decoding is temperature 0, an absent ``top_p`` is 1).
    Traces: ``temperature`` / ``top_p`` of the record, else of its ``generation`` block.
``drawn``
    Statistics of the drawn token's surprisal under the raw distribution
    (:func:`drawn_features`): ``drawn_nll_mean``, ``drawn_nll_q90``, ``drawn_nll_max`` of
    ``-q_t`` and ``off_argmax`` (the fraction of steps whose drawn token is not the
    argmax), over every step but the last. ``q_t = max(lp_t, lp_(k),t)``: the drawn
    token's logprob, bounded below by the k-th largest logprob of its row (exact when the
    drawn token is in the row's top-k, which is where serving looks it up).
``topk``
    The 11 statistics of the top-k series ``top<k>`` besides the chosen series, names
    prefixed ``topk_``; k is the one given (``train --k``; a sentinel's ``topk_k``) or the
    traces' own ``k``, which must then be one (:func:`topk_k_of`). Reading the chosen
    series itself (``--entropy topk``) is refused: 11 duplicate columns.

Serving computes a row from what the worker returns per finished sample (the 11
statistics of every recorded series, ``n_steps`` and the request's own ``temperature`` and
``top_p``) and the choice's ``finish_reason``: sets made of ``stats``, ``length``, ``topk``
and ``sampling`` are servable (:data:`SERVABLE`); ``tail`` and ``logprob`` need per-step
data the worker does not return, and ``drawn`` a look-up of each drawn token the worker does
not make yet (the black-box client computes it from a response's logprobs).

One definition of a row
-----------------------
:class:`FeatureSpec` (a set name and the series its groups read) assembles a row with
:meth:`FeatureSpec.row` from per-series statistics, ``n_steps`` and whether the
response stopped at its length limit. :func:`feature_set_matrix` (training, evaluation,
``score`` on traces) and the serving scorer both call it; a sentinel file declares its
set with ``feature_names`` (and ``feature_set``, ``topk_k`` in its metadata), read back
by :func:`spec_from_metadata`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from dataclasses import dataclass
from typing import Mapping

from sentinel_vllm.features import FEATURE_NAMES, compute_features
from sentinel_vllm.series import canonical, parse_series_name, series_name
from sentinel_vllm.traces import MissingSeriesError, Trace, check_series

__all__ = [
    "FEATURE_SETS",
    "SERVABLE",
    "TAIL",
    "FeatureSpec",
    "FeatureInputError",
    "feature_names",
    "feature_set_matrix",
    "length_stop",
    "spec_from_metadata",
    "topk_k_of",
    "unscorable",
    "length_features",
    "logprob_features",
    "sampling_features",
    "drawn_steps",
    "drawn_features",
    "trace_sampling",
    "trace_drawn",
    "ARGMAX_TOL",
    "DRAWN_K",
    "DRAWN_SERIES",
    "tail_features",
]

TAIL = 32

GROUP_NAMES: dict[str, tuple[str, ...]] = {
    "stats": FEATURE_NAMES,
    "length": ("log_n_steps", "truncated"),
    "tail": (f"tail{TAIL}_mean", f"tail{TAIL}_std", f"tail{TAIL}_max"),
    "logprob": ("logprob_mean", "logprob_std", "logprob_min", "logprob_q10"),
    "topk": tuple(f"topk_{n}" for n in FEATURE_NAMES),
    "sampling": ("temperature", "top_p"),
    "drawn": ("drawn_nll_mean", "drawn_nll_q90", "drawn_nll_max", "off_argmax"),
}

FEATURE_SETS: dict[str, tuple[str, ...]] = {
    "paper": ("stats",),
    "paper+length": ("stats", "length"),
    "paper+tail": ("stats", "tail"),
    "paper+logprob": ("stats", "logprob"),
    "paper+topk": ("stats", "topk"),
    "paper+length+temperature": ("stats", "length", "sampling"),
    "paper+length+drawn": ("stats", "length", "drawn"),
    "paper+length+sampling": ("stats", "length", "sampling", "drawn"),
    "all": ("stats", "length", "tail", "logprob", "topk"),
}

#: Groups computable from a worker sample (11 statistics per recorded series, ``n_steps``)
#: and the choice's ``finish_reason``.
SERVABLE_GROUPS = frozenset({"stats", "length", "topk", "sampling"})
#: Feature sets serving can compute (every group in :data:`SERVABLE_GROUPS`).
SERVABLE = frozenset(n for n, g in FEATURE_SETS.items() if set(g) <= SERVABLE_GROUPS)


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


#: ``|-p ln p - top1| < ARGMAX_TOL`` marks a trace step whose drawn token is the argmax
#: (``top1 = -p_1 ln p_1``; traces store both to 7 decimals; the gap is below 4e-6 at
#: temperature 0, and at 0.5 and 1.0 about 2 in 10^4 steps fall between 1e-5 and 1e-4).
ARGMAX_TOL = 1e-4


def sampling_features(temperature, top_p=None) -> np.ndarray:
    """``[temperature, top_p]``: the effective sampling settings of one response.

    ``temperature`` None or below 1e-5 is greedy (vLLM's own cut-off) and reads 0;
    ``top_p`` None (not set) reads 1.

    Raises
    ------
    FeatureInputError
        A negative or non-finite temperature, or ``top_p`` outside ``(0, 1]``.
    """
    t = 0.0 if temperature is None else float(temperature)
    p = 1.0 if top_p is None else float(top_p)
    if not math.isfinite(t) or t < 0:
        raise FeatureInputError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if not (math.isfinite(p) and 0 < p <= 1):
        raise FeatureInputError(f"top_p must lie in (0, 1], got {top_p!r}")
    return np.array([0.0 if t < 1e-5 else t, p])


def drawn_steps(token_logprob: Sequence[float], is_argmax: Sequence[bool],
                kth_logprob: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The per-step series the ``drawn`` group summarises: ``(nll, off)``, last step left out.

    ``nll_t = -max(lp_t, lp_(k),t)`` (the drawn token's surprisal, bounded by the row's
    k-th largest logprob when given; a NaN or None bound is no bound) and ``off_t = 1.0``
    when the drawn token is not the argmax. Serving learns a step's drawn token at the next step and never the last
    one's, so every path drops the last step here.

    Raises
    ------
    FeatureInputError
        Lengths that disagree, or a non-finite logprob.
    """
    lp = np.asarray(token_logprob, dtype=np.float64).reshape(-1)
    am = np.asarray(is_argmax, dtype=bool).reshape(-1)
    if am.shape != lp.shape or (kth_logprob is not None and len(kth_logprob) != lp.size):
        raise FeatureInputError(f"drawn-token series disagree in length: {lp.size} logprobs, "
                                f"{am.size} argmax flags")
    if not np.isfinite(lp).all():
        raise FeatureInputError("a drawn token's logprob is not finite")
    if kth_logprob is not None:
        kth = np.asarray([np.nan if v is None else v for v in kth_logprob], dtype=np.float64)
        lp = np.fmax(lp, kth)
    return -lp[:-1], (~am[:-1]).astype(np.float64)


#: The per-step series the ``drawn`` group reads the statistics of (:func:`drawn_steps`).
DRAWN_SERIES = ("drawn_nll", "off_argmax")
#: k of the bound ``lp_(k)`` of the ``drawn`` group (the kernel's top-k of a row).
DRAWN_K = 20


def drawn_features(nll_stats: Sequence[float], off_stats: Sequence[float]) -> np.ndarray:
    """``[mean, q90, max]`` of the ``drawn_nll`` statistics and the mean of ``off_argmax``.

    Arguments are the 11 statistics (:func:`~sentinel_vllm.features.compute_features`, the
    statistics serving computes for every recorded series) of the two series of
    :func:`drawn_steps`; an empty trajectory gives zeros.
    """
    a, b = np.asarray(nll_stats, dtype=np.float64), np.asarray(off_stats, dtype=np.float64)
    return np.array([a[0], a[7], a[2], b[0]])


def trace_sampling(t: Trace) -> tuple[float | None, float | None]:
    """``(temperature, top_p)`` of a trace: top-level keys, else its ``generation`` block."""
    gen = t.extra.get("generation") if isinstance(t.extra.get("generation"), dict) else {}
    out = []
    for key in ("temperature", "top_p"):
        v = t.extra.get(key)
        out.append(gen.get(key) if v is None else v)
    return out[0], out[1]


def trace_drawn(t: Trace) -> dict[str, np.ndarray]:
    """The statistics of the :data:`DRAWN_SERIES` of a trace, from ``token_logprob`` and ``top1``.

    The argmax flag is ``|-p ln p - top1| < ARGMAX_TOL`` with ``p = exp(token_logprob)``;
    the k-th logprob bound is ``topk_logprob`` when the record has it, else left out (it
    matters only for a drawn token outside the top k).

    Raises
    ------
    MissingSeriesError
        No ``token_logprob`` or ``top1`` series, or lengths that disagree.
    """
    lp, top1 = t.extra.get("token_logprob"), t.series("top1")
    if lp is None or top1 is None:
        raise MissingSeriesError(f"trace {t.id!r} lacks token_logprob or the top1 series "
                                 "(needed by the drawn features)")
    kth = t.extra.get("topk_logprob")
    if len(lp) != len(top1) or (kth is not None and len(kth) != len(lp)):
        raise MissingSeriesError(f"trace {t.id!r}: token_logprob has {len(lp)} values but top1 "
                                 f"has {len(top1)}")
    x = np.asarray(lp, dtype=np.float64)
    is_max = np.abs(-np.exp(x) * x - np.asarray(top1, dtype=np.float64)) < ARGMAX_TOL
    try:
        nll, off = drawn_steps(x, is_max, kth)
    except FeatureInputError as exc:
        raise MissingSeriesError(f"trace {t.id!r}: {exc}") from None
    return {DRAWN_SERIES[0]: compute_features(nll), DRAWN_SERIES[1]: compute_features(off)}


class FeatureInputError(ValueError):
    """A row cannot be assembled: a series, the finish reason or per-step data is missing."""


def length_stop(finish_reason) -> bool | None:
    """Whether a response stopped at its length limit: ``finish_reason == "length"``.

    None when the finish reason is unknown (None).
    """
    return None if finish_reason is None else finish_reason == "length"


@dataclass(frozen=True)
class FeatureSpec:
    """A feature set and the entropy series its groups read: how one row is assembled.

    Attributes
    ----------
    name : str
        A key of :data:`FEATURE_SETS`.
    series : str
        Series of the ``stats``, ``length`` and ``tail`` groups (``"full"``, ``"top20"``, ...).
    topk_series : str or None
        Series of the ``topk`` group (``"top<K>"``); None when the set has no such group.
    """

    name: str
    series: str
    topk_series: str | None = None

    @property
    def groups(self) -> tuple[str, ...]:
        return _check_set(self.name)

    @property
    def names(self) -> tuple[str, ...]:
        """Column names, in row order (what the sentinel file records as ``feature_names``)."""
        return feature_names(self.name)

    @property
    def needed_series(self) -> tuple[str, ...]:
        """Series whose statistics a row needs (the worker must record them)."""
        drawn = DRAWN_SERIES if "drawn" in self.groups else ()
        return tuple(dict.fromkeys(s for s in (self.series, self.topk_series, *drawn) if s))

    @property
    def servable(self) -> bool:
        """True when serving can compute the row (see :data:`SERVABLE`)."""
        return self.name in SERVABLE

    @property
    def needs_finish_reason(self) -> bool:
        return "length" in self.groups

    @property
    def needs_sampling(self) -> bool:
        """True when a row needs the response's temperature and top_p (``sampling`` group)."""
        return "sampling" in self.groups

    def row(self, stats: Mapping[str, Sequence[float]], n_steps: int, stopped_at_length: bool | None = None,
            per_step: Mapping[str, Sequence[float]] | None = None,
            sampling: tuple | None = None) -> np.ndarray:
        """The feature row: the one definition training and serving share.

        Parameters
        ----------
        stats : mapping of series name to 11 floats
            :func:`~sentinel_vllm.features.compute_features` of each series in
            :attr:`needed_series` (the worker's ``features`` of a sample).
        n_steps : int
            Length of the trajectory of :attr:`series` (the worker's ``n_steps``).
        stopped_at_length : bool or None
            ``finish_reason == "length"`` (:func:`length_stop`); needed by ``length``.
        per_step : mapping, optional
            Values of the groups computed from per-step data (``tail``, ``logprob``);
            traces only.
        sampling : (temperature, top_p), optional
            The response's sampling settings (None entries: greedy / not set); needed by
            ``sampling`` (:func:`sampling_features`).

        Returns
        -------
        ndarray of float64, shape (len(names),)

        Raises
        ------
        FeatureInputError
            A needed series, the finish reason, the sampling settings or a per-step group
            is missing.
        """
        parts = []
        for g in self.groups:
            if g == "drawn":
                missing = [n for n in DRAWN_SERIES if n not in stats]
                if missing:
                    raise FeatureInputError(f"feature set {self.name!r} needs the statistics of "
                                            f"series {', '.join(map(repr, missing))}")
                parts.append(drawn_features(*(stats[n] for n in DRAWN_SERIES)))
            elif g == "sampling":
                if sampling is None:
                    raise FeatureInputError(f"feature set {self.name!r} needs the response's "
                                            "temperature and top_p")
                parts.append(sampling_features(*sampling))
            elif g in ("stats", "topk"):
                name = self.series if g == "stats" else self.topk_series
                if name not in stats:
                    raise FeatureInputError(f"feature set {self.name!r} needs the statistics of "
                                            f"series {name!r}")
                parts.append(np.asarray(stats[name], dtype=np.float64).reshape(len(FEATURE_NAMES)))
            elif g == "length":
                if stopped_at_length is None:
                    raise FeatureInputError(f"feature set {self.name!r} needs the response's "
                                            "finish_reason")
                parts.append(length_features(n_steps, stopped_at_length))
            elif per_step is not None and g in per_step:
                parts.append(np.asarray(per_step[g], dtype=np.float64).reshape(len(GROUP_NAMES[g])))
            else:
                raise FeatureInputError(f"feature set {self.name!r}: the {g} features need "
                                        "per-step data")
        return np.concatenate(parts)


def make_spec(name: str, entropy: str = "full", k: int | None = None,
              topk_k: int | None = None) -> FeatureSpec:
    """:class:`FeatureSpec` of set ``name`` on series ``(entropy, k)``; ``topk_k`` for ``topk``.

    Raises
    ------
    ValueError
        Unknown set or series, a ``topk`` group without ``topk_k``, or a ``topk`` group
        reading the series of the statistics (duplicate columns).
    """
    groups = _check_set(name)
    topk = None
    if "topk" in groups:
        if topk_k is None:
            raise ValueError(f"feature set {name!r} needs the k of its top-k series (topk_k)")
        topk = series_name("topk", int(topk_k))
    series = series_name(*canonical(entropy, k))
    if topk is not None and topk == series:
        raise ValueError(f"feature set {name!r} adds the statistics of a top-k series to those of "
                         f"another series, but both would read {series} (11 duplicate columns); "
                         "use another --entropy (e.g. full) or another top-k k")
    return FeatureSpec(name, series, topk)


def spec_from_metadata(meta: Mapping, sentinel: str = "sentinel") -> FeatureSpec:
    """The feature set a sentinel file declares.

    The file's ``feature_names`` must be exactly one set's names (:func:`feature_names`);
    a ``feature_set`` key, when present, must name that set. The ``topk`` group reads
    ``top<topk_k>`` (``topk_k`` in the metadata).

    Raises
    ------
    ValueError
        Names of no known set, a ``feature_set`` that disagrees with them, or a
        ``topk`` set without ``topk_k``. One line, naming the sentinel.
    """
    names = tuple(meta.get("feature_names") or FEATURE_NAMES)
    match = [n for n in FEATURE_SETS if feature_names(n) == names]
    declared = meta.get("feature_set")
    if not match:
        raise ValueError(f"{sentinel} expects features {list(names)}, which are no known feature "
                         f"set ({', '.join(FEATURE_SETS)})")
    if declared is not None and declared != match[0]:
        raise ValueError(f"{sentinel} declares feature set {declared!r} but its feature_names are "
                         f"those of {match[0]!r}")
    try:
        return make_spec(match[0], str(meta.get("entropy", "full")), meta.get("k"),
                         meta.get("topk_k"))
    except ValueError as exc:
        raise ValueError(f"{sentinel}: {exc}") from None


def _truncated(t: Trace) -> bool:
    fr = t.extra.get("finish_reason")
    if fr is not None:
        return fr == "length"
    if "truncated" in t.extra:
        return bool(t.extra["truncated"])
    raise MissingSeriesError(f"trace {t.id!r} has neither finish_reason nor truncated "
                             "(needed by the length features)")


def trace_row(t: Trace, name: str = "paper", entropy: str = "full", k: int | None = None,
              topk_k: int | None = None) -> np.ndarray:
    """One trace's row of feature set ``name``: the worker-style sample, through :meth:`FeatureSpec.row`.

    ``k`` and ``topk_k`` default to the trace's own ``k``.

    Raises
    ------
    MissingSeriesError
        The trace lacks what a group needs (the message names the trace).
    """
    groups = _check_set(name)
    s = t.series(entropy, k)
    if s is None:
        raise MissingSeriesError(f"trace {t.id!r} lacks the {entropy} entropy series")
    kind, kk = parse_series_name(entropy, k)
    tk_k = t.k if topk_k is None else topk_k
    if "topk" in groups and tk_k is None:
        raise MissingSeriesError(f"trace {t.id!r} has no k, so no top-k series for the topk "
                                 f"features of {name!r} (its series: {', '.join(sorted(t.entropy))})")
    spec = make_spec(name, kind, t.k if kk is None and kind != "full" else kk,
                     tk_k if "topk" in groups else None)
    stats = {spec.series: compute_features(s)}
    if spec.topk_series is not None:
        tk = t.series(spec.topk_series)
        if tk is None:
            raise MissingSeriesError(
                f"trace {t.id!r} lacks the {spec.topk_series} entropy series that the topk features "
                f"of {name!r} need (the trace has k={t.k}, series: {', '.join(sorted(t.entropy))})")
        stats[spec.topk_series] = compute_features(tk)
    per_step = {}
    if "tail" in groups:
        per_step["tail"] = tail_features(s)
    if "drawn" in groups:
        stats.update(trace_drawn(t))
    if "logprob" in groups:
        lp = t.extra.get("token_logprob")
        if lp is None:
            raise MissingSeriesError(f"trace {t.id!r} has no token_logprob (needed by the logprob features)")
        if len(lp) != len(s):
            raise MissingSeriesError(f"trace {t.id!r}: token_logprob has {len(lp)} values but its "
                                     f"{entropy} entropy series has {len(s)} steps")
        per_step["logprob"] = logprob_features(lp)
    stop = _truncated(t) if "length" in groups else None
    try:
        return spec.row(stats, len(s), stop, per_step, trace_sampling(t))
    except FeatureInputError as exc:  # a bad temperature / top_p in the record
        raise MissingSeriesError(f"trace {t.id!r}: {exc}") from None


def unscorable(traces: Sequence[Trace], name: str = "paper", entropy: str = "full",
               k: int | None = None, topk_k: int | None = None) -> dict[int, str]:
    """Index -> reason, for each trace :func:`trace_row` cannot make a row of (``--skip-bad``)."""
    out = {}
    for i, t in enumerate(traces):
        try:
            trace_row(t, name, entropy, k, topk_k)
        except MissingSeriesError as exc:
            out[i] = str(exc)
    return out


def topk_k_of(traces: Sequence[Trace], name: str, topk_k: int | None = None) -> int | None:
    """The k of the ``topk`` group's series (``top<k>``): ``topk_k`` when given, else the traces' one k.

    None for a set without the ``topk`` group (or no traces).

    Raises
    ------
    ValueError
        Unknown set, or traces of several k (or none) without ``topk_k``: one matrix
        must not mix top-10 and top-20 columns.
    """
    if "topk" not in _check_set(name):
        return None
    if topk_k is not None:
        return int(topk_k)
    ks = {t.k for t in traces}
    if len(ks) > 1 or ks == {None}:
        raise ValueError(f"feature set {name!r} needs traces of one k (its topk features read each "
                         f"trace's own top-k series); have k={sorted(ks, key=str)}: pass --k to "
                         "choose the top-k series, or split the traces")
    return next(iter(ks), None)


def feature_set_matrix(traces: Sequence[Trace], name: str = "paper", entropy: str = "full",
                       k: int | None = None, topk_k: int | None = None) -> np.ndarray:
    """Feature matrix of feature set ``name`` (rows by :func:`trace_row`).

    Parameters
    ----------
    traces : sequence of Trace
    name : str, default "paper"
        A key of :data:`FEATURE_SETS`.
    entropy, k : the series the ``stats``, ``length`` and ``tail`` groups read.
    topk_k : int, optional
        k of the ``topk`` group's series (default: the traces' own ``k``, which must be
        one, :func:`topk_k_of`).

    Returns
    -------
    ndarray of float64, shape (n_traces, len(feature_names(name)))

    Raises
    ------
    ValueError
        Unknown set, traces of several k for a ``topk`` group without ``topk_k``;
        :class:`~sentinel_vllm.traces.MissingSeriesError` when a trace lacks
        what a group needs (the message names the trace).
    """
    width = len(feature_names(name))
    check_series(traces, entropy, k)
    topk_k = topk_k_of(traces, name, topk_k)
    rows = [trace_row(t, name, entropy, k, topk_k) for t in traces]
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), width)
