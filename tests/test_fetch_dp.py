"""Data parallel: the API side's worker RPCs reach every engine and the answers are merged.

The fake client below has the shape of vLLM 0.32's ``DPLBAsyncMPClient``
(``core_engines``, ``call_utility_all_async`` returning one ``collective_rpc``
answer list per engine); each fake engine holds only the requests it served.
The real thing runs in ``test_e2e_dp.py``.
"""

from __future__ import annotations

import asyncio

import pytest
from serving_helpers import make_tiny_sentinel

from sentinel_vllm.serving.api.fetch import BatchFetcher, engine_rpc
from sentinel_vllm.serving.api.scoring import SentinelScorer
from sentinel_vllm.serving.contract import RPC_FETCH


@pytest.fixture
def tiny_sentinel_path(tmp_path):
    make_tiny_sentinel(tmp_path / "s.onnx")
    return tmp_path / "s.onnx"


class FakeEngine:
    """One engine with two TP workers (rank 1 answers empty, as the extension does)."""

    def __init__(self, held):
        self.held = dict(held)

    def collective_rpc(self, method, args):
        if method == RPC_FETCH:
            got = {i: self.held.pop(i) for i in args[0] if i in self.held}
            return [got, {}]
        return [0, 0]


class FakeDPClient:
    def __init__(self, engines):
        self.core_engines = list(engines)
        self.calls = []

    async def call_utility_all_async(self, method, *args):
        assert method == "collective_rpc"
        name, _timeout, rpc_args, _kw = args
        self.calls.append(name)
        return [e.collective_rpc(name, rpc_args) for e in self.core_engines]


class FakeAsyncLLM:
    def __init__(self, core):
        self.engine_core = core
        self.single_calls = 0

    async def collective_rpc(self, method, args=()):  # what vLLM does: the first engine only
        self.single_calls += 1
        return self.engine_core.core_engines[0].collective_rpc(method, args)


def sample(child=0, value=0.5):
    return {"child": child, "n_steps": 4, "nan_steps": 0, "truncated": False,
            "features": {"full": [value] * 11, "top20": [value] * 11, "top5": [value] * 11}}


def test_engine_rpc_asks_every_engine_and_fetcher_merges(tiny_sentinel_path):
    a = FakeEngine({"r1": [sample()], "r3": [sample(0), sample(1)]})
    b = FakeEngine({"r2": [sample()]})
    client = FakeAsyncLLM(FakeDPClient([a, b]))
    scorer = SentinelScorer.from_path(tiny_sentinel_path)
    fetcher = BatchFetcher(engine_rpc(client), scorer, timeout_s=2.0)

    async def go():
        return await asyncio.gather(fetcher.blocks("r1", 1, "s"), fetcher.blocks("r2", 1, "s"),
                                    fetcher.blocks("r3", 2, "s"))

    r1, r2, r3 = asyncio.run(go())
    for blocks, n in ((r1, 1), (r2, 1), (r3, 2)):
        assert sorted(blocks) == list(range(n))
        for blk in blocks.values():
            assert "error" not in blk and 0.0 <= blk["p_correct"] <= 1.0
    assert client.single_calls == 0 and client.engine_core.calls == [RPC_FETCH]
    assert not a.held and not b.held  # every engine released what it served


def test_one_engine_uses_collective_rpc(tiny_sentinel_path):
    client = FakeAsyncLLM(FakeDPClient([FakeEngine({"r1": [sample()]})]))
    rpc = engine_rpc(client)
    assert asyncio.run(rpc(RPC_FETCH, (["r1"],))) == [{"r1": [sample()]}, {}]
    assert client.single_calls == 1 and client.engine_core.calls == []
