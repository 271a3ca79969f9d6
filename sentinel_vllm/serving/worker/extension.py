"""Worker-side result channel: a vLLM worker extension reached by ``collective_rpc``.

Launch vLLM with ``--worker-extension-cls
sentinel_vllm.serving.worker.extension.SentinelWorkerExtension`` (``worker_extension_cls=``
for ``vllm.LLM``); vLLM mixes the class into its worker, so the methods below
run in every worker process, between model steps. They reach the processor(s)
of that process through the registry in :mod:`sentinel_vllm.serving.worker.tracker`.

Tensor parallelism: only tensor-parallel rank 0 of the last pipeline stage
creates a tracker (:func:`~sentinel_vllm.serving.worker.tracker_setup.is_sentinel_rank`);
on the other ranks every method answers empty (``sentinel_stats`` says
``"rank_active": False``). ``collective_rpc`` returns one answer per worker in
rank order (per engine with data parallelism); the API side merges them with
:func:`sentinel_vllm.serving.contract.merge_answers`.

Usage from the frontend::

    answers = llm.collective_rpc(contract.RPC_FETCH, args=(["id-1", "id-2"],))
    results = contract.merge_answers(answers)  # {"id-1": [{"child": 0, "n_steps": ..., ...}], ...}
"""

from __future__ import annotations

from typing import Any

from sentinel_vllm.serving.contract import STATS_KEYS
from sentinel_vllm.serving.worker.tracker import live_trackers

__all__ = ["SentinelWorkerExtension"]


def _merge(parts: list[dict]) -> dict:
    out: dict[str, list] = {}
    for part in parts:
        for sid, samples in part.items():
            out.setdefault(sid, []).extend(samples)
    for samples in out.values():
        samples.sort(key=lambda s: s["child"])
    return out


def _ids(sentinel_ids) -> list[str]:
    if isinstance(sentinel_ids, str):
        raise TypeError("sentinel_ids must be a list of str, not a str")
    return [str(s) for s in sentinel_ids]


class SentinelWorkerExtension:
    """Methods added to vLLM's worker; call them with ``collective_rpc``.

    All names start with ``sentinel_`` (vLLM refuses extension attributes that
    clash with the worker's).
    """

    def sentinel_fetch(self, sentinel_ids: list[str]) -> dict[str, list[dict]]:
        """Statistics of the given requests, then release their state.

        Parameters
        ----------
        sentinel_ids : list of str

        Returns
        -------
        dict
            ``{sentinel_id: [{"child": int, "n_steps": int, "nan_steps": int,
            "truncated": bool, "features": {series: [11 floats]}}, ...]}``, one
            dict per sample (``child`` = choice index), features in
            :data:`sentinel_vllm.features.FEATURE_NAMES` order (nats). Requests
            still in the batch are included too (and released when they leave
            it); unknown ids are absent. ``{}`` on non-zero ranks.
        """
        ids = _ids(sentinel_ids)
        return _merge([t.fetch(ids) for t in live_trackers()])

    def sentinel_discard(self, sentinel_ids: list[str]) -> int:
        """Drop the state of the given (aborted) requests; returns samples dropped."""
        ids = _ids(sentinel_ids)
        return sum(t.discard(ids) for t in live_trackers())

    def sentinel_trajectories(self, sentinel_ids: list[str]) -> dict[str, list[dict]]:
        """Per-step entropy series (nats) of the given requests; nothing is released.

        Returns
        -------
        dict
            ``{sentinel_id: [{"child": int, "n_steps": int, "series": {name: [floats]}}]}``.
        """
        ids = _ids(sentinel_ids)
        return _merge([t.trajectories(ids) for t in live_trackers()])

    def sentinel_stats(self) -> dict[str, Any]:
        """Counts over this worker's trackers.

        Returns
        -------
        dict
            ``active``, ``released_active`` (fetched while still in the batch),
            ``parked``, ``free_slots``, ``num_slots``, ``untracked_pool_full``, ``untracked_lost``,
            ``evicted_timeout``, ``evicted_lru``, ``failed``, ``trackers`` and
            ``rank_active`` (False on ranks that do no sentinel work).
        """
        trackers = live_trackers()
        total: dict[str, Any] = dict.fromkeys(STATS_KEYS, 0)
        for t in trackers:
            for k, v in t.stats().items():
                total[k] = total.get(k, 0) + v
        total["trackers"] = len(trackers)
        total["rank_active"] = bool(trackers)
        return total
