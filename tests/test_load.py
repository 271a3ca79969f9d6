"""Load: 1,000 streamed ``n = 2`` requests at concurrency 64 against ``sentinel-vllm serve`` (SmolLM2).

Marked ``slow`` and ``load`` (its own CI stage: ``pytest -m load``; about 10-20
minutes on 2 cores). Each request streams with ``include_usage`` and
``return_token_ids``, ``max_tokens`` drawn from 8..64. Checks: every choice's
finish chunk carries a block (or an error block), ``n_steps`` equals the tokens
of that choice and the blocks' sum equals ``usage.completion_tokens``; the JSON is
standard; afterwards the worker holds no state (``active == parked == 0``, every
slot free) and the server's resident memory (API server + engine, all processes)
grew by at most 10 % + 64 MiB from the first 200 requests to the end.
``SENTINEL_LOAD_REQUESTS`` changes the count (default 1000).
"""

import asyncio
import json
import os
import random
import time

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.load]

pytest.importorskip("vllm")
httpx = pytest.importorskip("httpx")
pytest.importorskip("psutil")

from e2e_helpers import (
    CPU_FLAGS,
    MODEL,
    record,
    require_model,
    rss_bytes,
    sentinel_server,
    stream_chunks,
    worker_stats,
)

require_model()

N_REQUESTS = int(os.environ.get("SENTINEL_LOAD_REQUESTS", "1000"))
CONCURRENCY = 64
WARM = min(200, N_REQUESTS // 5)
RSS_MARGIN = (0.10, 64 << 20)  # relative, absolute


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    extra = [*CPU_FLAGS, "--max-num-seqs", "128", "--sentinel-replica", "load"]
    # vLLM closes a keep-alive connection idle for 5 s; on two busy cores the client can read the
    # end of a stream later than that after the server wrote it and then reuse the closed
    # connection (ECONNRESET): an HTTP client race, not what this test measures.
    env = {**os.environ, "VLLM_HTTP_TIMEOUT_KEEP_ALIVE": "120"}
    with sentinel_server(tmp_path_factory.mktemp("load"), extra=extra, max_model_len=512,
                         env=env) as srv:
        yield srv


def _server_report(server) -> str:
    """Whether the server still runs, and its log's warnings, errors and last lines."""
    rc = server["proc"].poll()
    try:
        lines = server["log"].read_text(errors="replace").splitlines()
    except OSError as exc:
        lines = [f"(no log: {exc})"]
    notable = [ln for ln in lines if " INFO " not in ln][-40:]
    return (("server running; " if rc is None else f"server exited with {rc}; ")
            + "log (non-INFO lines, last 40):\n" + "\n".join(notable)
            + "\nlast 15 lines:\n" + "\n".join(lines[-15:]))


async def _one(client, i, rng):
    body = {"model": str(MODEL), "n": 2, "stream": True, "max_tokens": rng.randint(8, 64),
            "temperature": 0.9, "return_token_ids": True,  # no seed: see test_faults_engine._body
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": f"Tell me fact number {i} about rivers."}],
            "vllm_xargs": {"sentinel_slice": "load"}}
    return await stream_chunks(client, body)


def _check(chunks, sid):
    tokens, blocks = {0: 0, 1: 0}, {}
    for ch in chunks[:-1]:
        assert ch["choices"], "only the usage chunk may have no choices"
        for c in ch["choices"]:
            tokens[c["index"]] += len(c.get("token_ids") or [])
            if c.get("finish_reason") is not None:
                assert c["index"] not in blocks
                blocks[c["index"]] = c["sentinel"]
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and sorted(blocks) == [0, 1]
    errors = 0
    for i, b in blocks.items():
        if "error" in b:
            errors += 1
            continue
        assert b["n_steps"] == tokens[i] and b["model"] == sid and 0.0 <= b["p_correct"] <= 1.0
    if not errors:
        assert sum(b["n_steps"] for b in blocks.values()) == usage["completion_tokens"]
    return errors, usage["completion_tokens"]


def test_load_streams_n2(server):
    base, sid, rng = server["base"], server["sentinel_id"], random.Random(3)
    rss = {}

    async def run():
        # idle connections dropped client-side after 2 s, well before the server's keep-alive
        limits = httpx.Limits(max_connections=CONCURRENCY, keepalive_expiry=2.0)
        async with httpx.AsyncClient(base_url=base, timeout=1800, limits=limits) as c:
            sem, done = asyncio.Semaphore(CONCURRENCY), [0]

            async def one(i):
                async with sem:
                    out = await _one(c, i, rng)
                done[0] += 1
                if done[0] == WARM:
                    rss["warm"] = rss_bytes(server["pid"])
                return out

            return await asyncio.gather(*(one(i) for i in range(N_REQUESTS)))

    t0 = time.perf_counter()
    try:
        results = asyncio.run(run())
    except httpx.TransportError as exc:
        pytest.fail(f"{type(exc).__name__} after {time.perf_counter() - t0:.0f} s: {exc!r}\n"
                    + _server_report(server))
    wall = time.perf_counter() - t0
    errors, tokens = 0, 0
    for chunks in results:
        e, t = _check(chunks, sid)
        errors, tokens = errors + e, tokens + t
    stats = worker_stats(base, timeout_s=60)
    rss["end"] = rss_bytes(server["pid"])
    assert stats["active"] == 0 and stats["parked"] == 0, stats
    assert stats["free_slots"] == stats["num_slots"], stats
    assert errors == 0, f"{errors} error blocks under load"
    growth = rss["end"] - rss["warm"]
    assert growth <= RSS_MARGIN[0] * rss["warm"] + RSS_MARGIN[1], rss
    record("load: streams, n = 2, concurrency 64", requests=N_REQUESTS, faults=0,
           leaked=stats["active"] + stats["parked"], completion_tokens=tokens,
           tokens_per_s=round(tokens / wall, 1), wall_s=round(wall, 1),
           rss_warm_mib=round(rss["warm"] / 2**20), rss_end_mib=round(rss["end"] / 2**20),
           error_blocks=errors)
    print(json.dumps({"requests": N_REQUESTS, "wall_s": wall, "tokens": tokens, **rss}))
