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

from typing import Any

__all__ = [
    "XARG_ID", "XARG_OPT", "XARG_CHILD", "XARG_N", "XARG_SLICE", "XARG_FAULT", "CLIENT_KEYS",
    "RPC_FETCH", "RPC_DISCARD", "RPC_TRAJECTORIES", "RPC_STATS", "STATS_KEYS",
    "V1_PROCESSOR", "MRV2_PROCESSOR", "WORKER_EXTENSION", "MIDDLEWARE",
    "CONFIG_ENV", "SENTINEL_ENV", "SERIES_ENV", "ADDITIONAL_CONFIG_KEY", "DEFAULT_SERIES",
    "processor_fqcn", "first_answer",
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
#: "nan_steps": int, "truncated": bool, "features": {series: [11 floats]}}``, samples
#: sorted by child, features in :data:`sentinel_vllm.features.FEATURE_NAMES` order (nats).
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
    """Class path (``module:Class``) of the processor for the model runner in use.

    Parameters
    ----------
    vllm_config : vllm.config.VllmConfig, optional
        Its ``use_v2_model_runner`` decides, unless ``use_v2`` is given.
    use_v2 : bool, optional

    Returns
    -------
    str
        :data:`MRV2_PROCESSOR` or :data:`V1_PROCESSOR`.
    """
    if use_v2 is None:
        use_v2 = bool(getattr(vllm_config, "use_v2_model_runner", False))
    return MRV2_PROCESSOR if use_v2 else V1_PROCESSOR


def first_answer(answers: list) -> Any:
    """Rank 0's answer from a ``collective_rpc`` result list (first non-empty).

    Non-zero tensor-parallel ranks answer empty (``{}``/``0``).
    """
    for a in answers:
        if a:
            return a
    return answers[0] if answers else {}
