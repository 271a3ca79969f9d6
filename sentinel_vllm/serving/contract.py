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
    "PLUGIN_NAME", "PLUGIN_PROCESSOR", "ENDPOINT_PLUGIN", "GENERAL_PLUGIN", "RUN_ENV",
    "WORKER_SETTINGS", "sentinel_settings", "offline_additional_config", "OFFLINE_PARK_TIMEOUT_S",
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

# -------------------------------------------------------------- vLLM plugins
#: Name of the sentinel's entry points in every vLLM plugin group: what ``VLLM_PLUGINS`` names.
PLUGIN_NAME = "sentinel"
#: ``vllm.logits_processors`` entry point: loaded by every engine, both runners; it does
#: the work only where ``additional_config`` has the :data:`ADDITIONAL_CONFIG_KEY` key.
PLUGIN_PROCESSOR = "sentinel_vllm.serving.worker.plugin:SentinelPluginProcessor"
#: ``vllm.endpoint_plugins`` entry point (API server; allowlisted through ``VLLM_PLUGINS``).
ENDPOINT_PLUGIN = "sentinel_vllm.serving.api.plugin:SentinelEndpointPlugin"
#: ``vllm.general_plugins`` entry point (every vLLM process): names the run's folder.
GENERAL_PLUGIN = "sentinel_vllm.serving.api.plugin:name_run"
#: The run's folder (the shared audit store of several API servers), set by :data:`GENERAL_PLUGIN`
#: in vLLM's first process and inherited by the processes it starts.
RUN_ENV = "SENTINEL_VLLM_RUN"

# ------------------------------------------------------------------- settings
#: JSON of the API side's ``ServerConfig``, for the explicit ``--middleware`` wiring.
CONFIG_ENV = "SENTINEL_VLLM_CONFIG"
#: Shortcut for self-launched servers: just the sentinel file's path.
SENTINEL_ENV = "SENTINEL_VLLM_SENTINEL"
#: Comma list of entropy series the worker records (the sentinel's series must be among them).
SERIES_ENV = "SENTINEL_SERIES"
#: Key of the worker's settings in ``--additional-config``.
ADDITIONAL_CONFIG_KEY = "sentinel"
#: Series recorded when nothing else is asked: full-vocabulary and the paper's top-20 entropy.
DEFAULT_SERIES: tuple[str, ...] = ("full", "top20")
#: Keys of ``additional_config["sentinel"]`` read by the worker side
#: (:func:`sentinel_vllm.serving.worker.tracker_setup.tracker_config`); the API side reads the rest.
WORKER_SETTINGS = ("series", "max_steps", "num_slots", "park_timeout_s", "backend")


def sentinel_settings(additional_config: Mapping | str | None) -> dict | None:
    """The sentinel's settings in vLLM's ``additional_config``, or None when it has none.

    The one test of "is the sentinel on" that the plugins make: without the
    :data:`ADDITIONAL_CONFIG_KEY` key every plugin does nothing.

    Parameters
    ----------
    additional_config : mapping, JSON str or None
        ``VllmConfig.additional_config`` / ``--additional-config``.

    Returns
    -------
    dict or None

    Raises
    ------
    ValueError
        ``additional_config`` is not a JSON object, or its sentinel entry is not one.
    """

    if additional_config is None or additional_config == "":
        return None
    extra = _config_object(additional_config, "--additional-config")
    if ADDITIONAL_CONFIG_KEY not in extra:
        return None
    mine = extra[ADDITIONAL_CONFIG_KEY]
    if not isinstance(mine, Mapping):
        raise ValueError(f'--additional-config "{ADDITIONAL_CONFIG_KEY}" must be a JSON object '
                         f'(e.g. {{"{ADDITIONAL_CONFIG_KEY}": {{"file": "default"}}}}), '
                         f"got {mine!r}")
    return dict(mine)


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


def _config_object(value: Mapping | str, what: str) -> Mapping:
    """``additional_config`` as a mapping (a JSON string is parsed); ``what`` names it in errors."""
    import json

    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(value, Mapping):
        raise ValueError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def vllm_launch_kwargs(needed_series: Iterable[str] = (), *, series: Iterable[str] | None = None,
                       logits_processors: Iterable[str] | None = None,
                       additional_config: Mapping | str | None = None,
                       worker_extension_cls: str | None = None,
                       environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The vLLM engine settings that wire the sentinel in, merged with the user's.

    The one place that decides them: ``sentinel_vllm.LLM`` and ``collect`` (as
    ``vllm.LLM`` keyword arguments) call it, and ``sentinel-vllm serve`` for the series it
    writes into ``--additional-config`` (it uses the plugins, not these class paths). The processor is :data:`PROCESSOR` whatever the runner (vLLM
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
    import os

    from sentinel_vllm.series import is_series, split_series

    if worker_extension_cls not in (None, WORKER_EXTENSION):
        raise ValueError(f"--worker-extension-cls / worker_extension_cls is the sentinel's "
                         f"({WORKER_EXTENSION}); vLLM takes only one worker extension, so "
                         f"{worker_extension_cls!r} cannot be combined with it")
    extra = _config_object(additional_config if additional_config is not None else {},
                           "additional_config")
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


# An offline engine (``collect``, ``sentinel_vllm.LLM``) fetches every request's trajectory after
# its ``generate`` call returns, however long the batch took: its parked trajectories must not
# expire after serving's 600 s (a slow CPU batch lost its early finishers). LRU eviction still
# bounds the parked slots.
OFFLINE_PARK_TIMEOUT_S = 30 * 86400.0


def offline_additional_config(additional_config: Mapping | str | None) -> dict:
    """The user's ``additional_config`` with ``park_timeout_s`` for an offline engine.

    A ``park_timeout_s`` the user set under ``"sentinel"`` is kept; a JSON string is parsed
    (errors are left to :func:`vllm_launch_kwargs`, which names them).
    """
    import json

    extra = additional_config if additional_config is not None else {}
    if isinstance(extra, str):
        try:
            extra = json.loads(extra)
        except json.JSONDecodeError:
            return extra  # type: ignore[return-value]
    if not isinstance(extra, Mapping) or not isinstance(extra.get(ADDITIONAL_CONFIG_KEY, {}),
                                                        Mapping):
        return extra  # type: ignore[return-value]
    mine = {"park_timeout_s": OFFLINE_PARK_TIMEOUT_S, **extra.get(ADDITIONAL_CONFIG_KEY, {})}
    return {**extra, ADDITIONAL_CONFIG_KEY: mine}


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
