"""The wire contract between the two sides of serving.

``sentinel_vllm.serving`` runs in two kinds of process that never import each
other: the **worker side** (:mod:`sentinel_vllm.serving.worker`, inside vLLM's
worker: processors, slot tracker, RPC extension) and the **API side**
(:mod:`sentinel_vllm.serving.api`, in each API-server or offline ``LLM``
process: middleware, fetch, scoring, metrics). Everything both sides must agree
on lives here, and only here:

* the per-request keys in ``SamplingParams.extra_args`` (``vllm_xargs`` over HTTP);
* the RPC names reached through ``collective_rpc`` and the shape of their answers;
* the keys of ``sentinel_stats``;
* the class paths handed to vLLM, and the environment variables that carry
  settings from the launcher to both sides.

Data flows one way: worker -> contract <- API side. See docs/serving.md.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "XARG_ID", "XARG_OPT", "XARG_CHILD", "XARG_N", "XARG_SLICE", "XARG_FAULT", "CLIENT_KEYS",
    "RPC_FETCH", "RPC_DISCARD", "RPC_TRAJECTORIES", "RPC_STATS", "STATS_KEYS",
    "PROCESSOR", "V1_PROCESSOR", "MRV2_PROCESSOR", "WORKER_EXTENSION", "MIDDLEWARE",
    "CONFIG_ENV", "SENTINEL_ENV", "SERIES_ENV", "ADDITIONAL_CONFIG_KEY", "DEFAULT_SERIES",
    "processor_fqcn", "vllm_launch_kwargs", "first_answer", "merge_answers",
]

# --------------------------------------------------------------- request keys
#: Unique per request, set by the server (never by a client). Untracked without it.
XARG_ID = "sentinel_id"
#: ``False`` opts a request out.
XARG_OPT = "sentinel"
#: Choice index of one child of an ``n > 1`` request (set in the frontend process).
XARG_CHILD = "sentinel_child"
#: The parent's ``n`` (absent means 1).
XARG_N = "sentinel_n"
#: The client's slice label (read by the API side only; never forwarded to the engine).
XARG_SLICE = "sentinel_slice"
#: Tests only: fault injection switch (read by the API side only).
XARG_FAULT = "sentinel_fault"
#: Every key a client might send; the API side strips them all before the engine sees the request.
CLIENT_KEYS = (XARG_ID, XARG_SLICE, XARG_OPT, XARG_CHILD, XARG_N, XARG_FAULT)

# ------------------------------------------------------------------------ RPCs
#: ``(ids: list[str]) -> {id: [Sample, ...]}``; Sample = ``{"child": int, "n_steps": int,
#: "nan_steps": int, "truncated": bool, "features": {series: [11 floats]},
#: "sampling": {"temperature": float, "top_p": float}}``, samples sorted by child, features
#: in :data:`sentinel_vllm.features.FEATURE_NAMES` order (nats); ``sampling`` holds the
#: request's own ``SamplingParams`` values (after the server's defaults), absent when the
#: worker did not see them.
#: Releases the state of the ids it answers for.
RPC_FETCH = "sentinel_fetch"
#: ``(ids: list[str]) -> int`` samples dropped (aborted requests).
RPC_DISCARD = "sentinel_discard"
#: ``(ids: list[str]) -> {id: [{"child", "n_steps", "series": {name: [floats]}}]}``; frees nothing.
RPC_TRAJECTORIES = "sentinel_trajectories"
#: ``() -> {key: int}`` with the keys of :data:`STATS_KEYS` plus ``trackers`` and ``rank_active``.
RPC_STATS = "sentinel_stats"
#: Counters summed over a worker's trackers by ``sentinel_stats``.
STATS_KEYS = (
    "active", "released_active", "parked", "free_slots", "num_slots", "untracked_pool_full",
    "untracked_lost", "evicted_timeout", "evicted_lru", "failed",
)

# ---------------------------------------------------------------- class paths
#: The processor handed to vLLM: accepted by both model runners, it becomes the V1 or
#: the MRV2 implementation when the runner vLLM chose builds it (see
#: :mod:`sentinel_vllm.serving.worker.processor_any`).
PROCESSOR = "sentinel_vllm.serving.worker.processor_any:SentinelLogitsProcessorAny"
#: The runner-specific classes (for code that knows its runner, e.g. unit tests).
V1_PROCESSOR = "sentinel_vllm.serving.worker.processor:SentinelLogitsProcessor"
MRV2_PROCESSOR = "sentinel_vllm.serving.worker.processor:SentinelLogitsProcessorMRV2"
WORKER_EXTENSION = "sentinel_vllm.serving.worker.extension.SentinelWorkerExtension"
MIDDLEWARE = "sentinel_vllm.serving.api.middleware.SentinelMiddleware"

# ------------------------------------------------------------------- settings
#: JSON of the API side's ``ServerConfig`` (set by ``sentinel-vllm serve``).
CONFIG_ENV = "SENTINEL_VLLM_CONFIG"
#: Shortcut for self-launched servers: just the sentinel file's path.
SENTINEL_ENV = "SENTINEL_VLLM_SENTINEL"
#: Comma list of entropy series the worker records (the sentinel's series must be among them).
SERIES_ENV = "SENTINEL_SERIES"
#: Key of the worker's settings in ``--additional-config``.
ADDITIONAL_CONFIG_KEY = "sentinel"
#: Series recorded when nothing else is asked: full-vocabulary and the paper's top-20 entropy.
DEFAULT_SERIES: tuple[str, ...] = ("full", "top20")


def processor_fqcn(vllm_config=None, *, use_v2: bool | None = None) -> str:
    """Class path (``module:Class``) of a sentinel processor.

    Parameters
    ----------
    vllm_config : vllm.config.VllmConfig, optional
        Its ``use_v2_model_runner`` picks the runner's own class.
    use_v2 : bool, optional
        Picks the runner's own class.

    Returns
    -------
    str
        :data:`PROCESSOR` (both runners) when neither is given, else
        :data:`MRV2_PROCESSOR` or :data:`V1_PROCESSOR`.
    """
    if use_v2 is None and vllm_config is None:
        return PROCESSOR
    if use_v2 is None:
        use_v2 = bool(getattr(vllm_config, "use_v2_model_runner", False))
    return MRV2_PROCESSOR if use_v2 else V1_PROCESSOR


def vllm_launch_kwargs(needed_series: Iterable[str] = (), *, series: Iterable[str] | None = None,
                       logits_processors: Iterable[str] | None = None,
                       additional_config: Mapping | str | None = None,
                       worker_extension_cls: str | None = None,
                       environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The vLLM engine settings that wire the sentinel in, merged with the user's.

    The one place that decides them: ``sentinel-vllm serve`` (as CLI options),
    ``sentinel_vllm.LLM`` and ``collect`` (as ``vllm.LLM`` keyword arguments) all
    call it. The processor is :data:`PROCESSOR` whatever the runner (vLLM
    decides that inside the engine); the worker's settings travel in
    ``additional_config["sentinel"]``, the same way in every path.

    Parameters
    ----------
    needed_series : iterable of str
        Series the caller will score (e.g. the sentinel's ``top20``); the recorded
        series must include them.
    series : iterable of str, optional
        Series to record when the user does not choose (default
        :data:`DEFAULT_SERIES` plus ``needed_series``).
    logits_processors : iterable of str, optional
        The user's own processors; kept, after ours.
    additional_config : mapping or JSON str, optional
        The user's ``additional_config``; kept. Its ``["sentinel"]["series"]`` (str
        or list) overrides the series, then ``$SENTINEL_SERIES``.
    worker_extension_cls : str, optional
        The user's; refused unless it is ours (vLLM takes one).
    environ : mapping, optional
        Read for ``$SENTINEL_SERIES`` (default ``os.environ``).

    Returns
    -------
    dict
        ``logits_processors`` (list), ``worker_extension_cls`` (str) and
        ``additional_config`` (dict with ``"sentinel": {"series": "a,b"}``).

    Raises
    ------
    ValueError
        Another worker extension, an ``additional_config`` that is not a JSON
        object, a bad series name, or user series without a needed one.
    """
    import json
    import os

    from sentinel_vllm.series import is_series, split_series

    if worker_extension_cls not in (None, WORKER_EXTENSION):
        raise ValueError(f"--worker-extension-cls / worker_extension_cls is the sentinel's "
                         f"({WORKER_EXTENSION}); vLLM takes only one worker extension, so "
                         f"{worker_extension_cls!r} cannot be combined with it")
    extra = additional_config if additional_config is not None else {}
    if isinstance(extra, str):
        try:
            extra = json.loads(extra)
        except json.JSONDecodeError as exc:
            raise ValueError(f"additional_config is not valid JSON: {exc}") from exc
    if not isinstance(extra, Mapping):
        raise ValueError(f"additional_config must be a JSON object, got {type(extra).__name__}")
    mine = extra.get(ADDITIONAL_CONFIG_KEY, {})
    if not isinstance(mine, Mapping):
        raise ValueError(f'additional_config["{ADDITIONAL_CONFIG_KEY}"] must be an object')
    env = os.environ if environ is None else environ
    needed = list(dict.fromkeys(needed_series))
    user = mine.get("series") or env.get(SERIES_ENV) or None
    if user is not None:
        where = (f'additional_config["{ADDITIONAL_CONFIG_KEY}"]["series"]' if mine.get("series")
                 else f"${SERIES_ENV}")
        chosen = list(split_series(user))
        missing = [s for s in needed if s not in chosen]
        if missing:
            raise ValueError(f"{where}={user!r} does not record {', '.join(missing)}, "
                             "the series the sentinel scores")
    else:
        chosen = list(split_series(series)) if series is not None else list(DEFAULT_SERIES)
        chosen += [s for s in needed if s not in chosen]
    bad = [s for s in chosen if not is_series(s)]
    if bad:
        raise ValueError(f"unknown entropy series {', '.join(map(repr, bad))} (full, topK, "
                         "topK_renorm)")
    procs = [PROCESSOR] + [p for p in (logits_processors or ()) if p not in
                           (PROCESSOR, V1_PROCESSOR, MRV2_PROCESSOR)]
    merged = {**extra, ADDITIONAL_CONFIG_KEY: {**mine, "series": ",".join(chosen)}}
    return {"logits_processors": procs, "worker_extension_cls": WORKER_EXTENSION,
            "additional_config": merged}


def first_answer(answers: list) -> Any:
    """Rank 0's answer from a ``collective_rpc`` result list (first non-empty).

    Non-zero tensor-parallel ranks answer empty (``{}``/``0``).
    """
    for a in answers:
        if a:
            return a
    return answers[0] if answers else {}


def merge_answers(answers: list) -> Any:
    """All workers' answers to one RPC merged into one (data parallel: several engines).

    With ``--data-parallel-size N`` each engine's workers hold the state of the
    requests that engine served, so the answers are combined, not picked:
    dicts are joined key by key (lists concatenated, numbers summed, nested
    dicts merged the same way), numbers are summed. Empty answers (non-zero
    tensor-parallel ranks) add nothing.

    Parameters
    ----------
    answers : list
        One answer per worker, e.g. flattened over engines.

    Returns
    -------
    dict, int or float, or None
        None when every answer is empty and none is a number.
    """
    out: Any = None
    for a in answers:
        out = _merge(out, a)
    return out


def _merge(a: Any, b: Any) -> Any:
    if b is None or (isinstance(b, dict) and not b):
        return a if a is not None else b
    if a is None or (isinstance(a, dict) and not a):
        return b
    if isinstance(a, dict) and isinstance(b, dict):
        out = dict(a)
        for k, v in b.items():
            out[k] = _merge(out.get(k), v) if k in out else v
        return out
    if isinstance(a, list) and isinstance(b, list):
        return a + b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) \
            and not isinstance(a, bool) and not isinstance(b, bool):
        return a + b
    return a
