"""Batched result channel of the API server: fetch finished requests' statistics, score them.

Finished requests are collected for a few milliseconds; then ONE
``collective_rpc("sentinel_fetch")`` fetches all of them from the worker
(:mod:`sentinel_vllm.serving.worker.extension`) of every engine (with data parallelism
each engine answers for the requests it served; with tensor parallelism rank 0
answers and the other ranks return empty), the ONNX sentinel scores the batch in a thread (never
on the event loop), the metrics are updated, and each waiting response gets its
blocks. Requests whose statistics do not arrive in time get an error block and
their worker state is discarded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from sentinel_vllm.serving.api.audit_store import audit_id
from sentinel_vllm.serving.api.scoring import SentinelScorer, error_block
from sentinel_vllm.serving.contract import RPC_DISCARD, RPC_FETCH, RPC_TRAJECTORIES, merge_answers

__all__ = ["BatchFetcher", "engine_rpc"]

log = logging.getLogger("sentinel_vllm.serving")


def engine_rpc(engine_client):
    """``async rpc(method, args) -> list``: a worker RPC answered by EVERY engine of this client.

    With ``--data-parallel-size N`` the API server's client drives several engine
    processes, each holding the state of the requests it served; vLLM's
    ``collective_rpc`` reaches one of them (vLLM 0.32 ``core_client.py``:
    ``AsyncMPClient.call_utility_async`` -> ``self.core_engine``;
    ``DPLBAsyncMPClient`` asks all and keeps the first answer). So with several
    engines the RPC goes through ``call_utility_all_async("collective_rpc", ...)``
    (one answer list per engine) and the lists are joined: one answer per worker
    of every engine, for :func:`~sentinel_vllm.serving.contract.merge_answers`.
    With one engine (or a client without that method) it is ``collective_rpc``.

    Parameters
    ----------
    engine_client : vllm.v1.engine.async_llm.AsyncLLM
        ``app.state.engine_client``.
    """
    core = getattr(engine_client, "engine_core", None)
    call_all = getattr(core, "call_utility_all_async", None)
    engines = getattr(core, "core_engines", None)

    async def one(method, args):
        return await engine_client.collective_rpc(method, args=args)

    async def every(method, args):
        if len(getattr(core, "core_engines", ()) or ()) <= 1:
            return await one(method, args)
        per_engine = await call_all("collective_rpc", method, None, tuple(args), None)
        return [answer for answers in per_engine for answer in (answers or ())]

    return every if call_all is not None and engines is not None else one


class BatchFetcher:
    """Collect finished requests for a few ms, fetch their statistics in one RPC, score them.

    Parameters
    ----------
    rpc : async callable ``(method: str, args: tuple) -> list``
        One result per worker, of every engine (:func:`engine_rpc`); the answers
        are merged (:func:`~sentinel_vllm.serving.contract.merge_answers`).
    scorer : SentinelScorer
    metrics : SentinelMetrics or None
    batch_delay_s, timeout_s : float
        Collection delay and give-up time (seconds).
    executor : concurrent.futures.Executor, optional
        Where ONNX scoring runs (default: one dedicated thread).
    return_trajectory : bool
        Also fetch per-step series (``sentinel_trajectories``) into the blocks.
    audit : ServingAudit or None
        Records every scored choice (its block's ``id``, slice, P(correct)) before the
        blocks are handed back (:mod:`sentinel_vllm.serving.api.audit_store`).
    """

    def __init__(self, rpc, scorer: SentinelScorer, metrics=None, *, batch_delay_s=0.005,
                 timeout_s=10.0, executor=None, return_trajectory=False, audit=None):
        self.rpc, self.scorer, self.metrics, self.audit = rpc, scorer, metrics, audit
        self.return_trajectory = return_trajectory
        self.batch_delay_s, self.timeout_s = batch_delay_s, timeout_s
        self.executor = executor or ThreadPoolExecutor(1, thread_name_prefix="sentinel-score")
        self._pending: dict[str, dict] = {}
        self._task: asyncio.Task | None = None
        self.rpc_calls = 0

    async def blocks(self, sentinel_id: str, n: int, slice_label: str, *,
                     fault: bool = False, finish_reasons: dict | None = None) -> dict[int, dict]:
        """Blocks per choice index for a finished request (never raises).

        ``finish_reasons``: ``{choice index: finish_reason}`` (the ``length`` features
        of a sentinel's feature set need it). ``fault=True`` (tests) makes the ONNX
        call of this request's batch raise.
        """
        fut = asyncio.get_running_loop().create_future()
        self._pending[sentinel_id] = {"fut": fut, "n": n, "slice": slice_label, "got": {},
                                      "finish": dict(finish_reasons or {}),
                                      "traj": {}, "fault": fault,
                                      "deadline": time.monotonic() + self.timeout_s}
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
        return await fut

    async def discard(self, sentinel_ids: list[str]) -> None:
        """Free worker state of aborted requests (errors are logged, not raised)."""
        try:
            await self.rpc(RPC_DISCARD, (list(sentinel_ids),))
        except Exception as exc:  # noqa: BLE001
            log.warning("sentinel_discard failed: %s", exc)

    async def _run(self) -> None:
        while self._pending:
            await asyncio.sleep(self.batch_delay_s)
            ids = list(self._pending)
            try:
                if self.return_trajectory:  # before fetch: fetch releases the state
                    self.rpc_calls += 1
                    tr = merge_answers(await self.rpc(RPC_TRAJECTORIES, (ids,))) or {}
                    for sid in ids:
                        for t in tr.get(sid) or ():
                            series = (t.get("series") or {}).get(self.scorer.series)
                            self._pending[sid]["traj"][int(t.get("child", 0))] = series
                self.rpc_calls += 1
                res = merge_answers(await self.rpc(RPC_FETCH, (ids,))) or {}
            except Exception as exc:  # noqa: BLE001
                self._fail(ids, f"sentinel fetch failed: {type(exc).__name__}: {exc}", "rpc")
                continue
            now, ready = time.monotonic(), []
            for sid in ids:
                entry = self._pending[sid]
                for sample in res.get(sid) or ():
                    entry["got"][int(sample.get("child", 0))] = sample
                if len(entry["got"]) >= entry["n"] or now > entry["deadline"]:
                    ready.append(sid)
            if ready:
                await self._score(ready)
            if self._pending and not ready:
                await asyncio.sleep(0.02)  # results not there yet: poll gently

    async def _score(self, ids: list[str]) -> None:
        entries = [self._pending.pop(sid) for sid in ids]
        samples, slices, finish, owner = [], [], [], []
        for sid, e in zip(ids, entries):
            for child in range(e["n"]):
                samples.append(e["got"].get(child))
                slices.append(e["slice"])
                finish.append(e["finish"].get(child))
                owner.append((sid, child))
        loop = asyncio.get_running_loop()
        scorer = self.scorer
        if any(e["fault"] for e in entries):
            scorer = SentinelScorer(_FaultySentinel(scorer.sentinel), vocab_size=scorer.vocab_size)
        try:
            scored = await loop.run_in_executor(self.executor, scorer.score, samples, slices, finish)
        except Exception as exc:  # noqa: BLE001 (score() should not raise; belt and braces)
            for sid, e in zip(ids, entries):
                self._resolve(e, {c: error_block(str(exc), "internal", e["slice"]) for c in range(e["n"])})
            return
        out: dict[str, dict[int, dict]] = {sid: {} for sid in ids}
        timed_out, audited = [], []
        traj = {sid: e["traj"] for sid, e in zip(ids, entries)}
        n_of = {sid: e["n"] for sid, e in zip(ids, entries)}
        for (sid, child), s in zip(owner, scored):
            if s.reason is None:  # the audit id first: labels are posted for it
                s.block = {"id": audit_id(sid, child, n_of[sid]), **s.block}
                audited.append((s.block["id"], s.block["slice"], s.p_correct))
                if traj[sid].get(child) is not None:
                    s.block["trajectory"] = traj[sid][child]
            out[sid][child] = s.block
            if self.metrics is not None:
                if s.reason is None:
                    self.metrics.observe(s.block["slice"], s.p_correct, s.mean_entropy)
                else:
                    self.metrics.error(s.reason)
            if s.reason == "fetch_timeout":
                timed_out.append(sid)
        if self.audit is not None and audited:  # before the answer: a label may follow at once
            await self.audit.record(audited)
        for sid, e in zip(ids, entries):
            self._resolve(e, out[sid])
        if timed_out:
            await self.discard(sorted(set(timed_out)))

    def _fail(self, ids, message, reason) -> None:
        for sid in ids:
            e = self._pending.pop(sid)
            if self.metrics is not None:
                for _ in range(e["n"]):
                    self.metrics.error(reason)
            self._resolve(e, {c: error_block(message, reason, e["slice"]) for c in range(e["n"])})

    @staticmethod
    def _resolve(entry, blocks) -> None:
        if not entry["fut"].done():
            entry["fut"].set_result(blocks)


class _FaultySentinel:
    """A sentinel whose ONNX call raises (fault injection for tests)."""

    def __init__(self, sentinel):
        self.id, self.metadata = sentinel.id, sentinel.metadata

    def p_correct(self, X):
        raise RuntimeError("injected scoring fault (ServerConfig.fault_injection)")
