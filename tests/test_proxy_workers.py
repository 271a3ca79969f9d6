"""``sentinel-vllm proxy --workers 2``: two processes on one port, blocks as with one, metrics merged.

The CLI runs as a subprocess in front of the fake upstream; 48 requests (JSON and stream,
each on its own connection, 8 at a time) reach both processes. Every block equals the
client helper's; ``/metrics``, whichever process answers it, counts all 48; the
per-process files of ``PROMETHEUS_MULTIPROC_DIR`` show both processes scored some.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
prometheus_client = pytest.importorskip("prometheus_client")

from fake_upstream import FakeUpstream, free_port, steps_for  # noqa: E402
from openai_fixtures import chat_response  # noqa: E402
from serving_helpers import make_tiny_sentinel  # noqa: E402

from sentinel_vllm.blackbox.client import TopLogprobsScorer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
N = 48


def _scored(directory: Path) -> float:
    """``sentinel_requests_scored_total`` summed over the prometheus files in ``directory``."""
    from prometheus_client import CollectorRegistry, multiprocess

    reg = CollectorRegistry()
    multiprocess.MultiProcessCollector(reg, path=str(directory))
    return sum(s.value for m in reg.collect() for s in m.samples
               if s.name == "sentinel_requests_scored_total")


def _one(url, i):
    body = {"model": "ok", "messages": [{"role": "user", "content": "x"}],
            "vllm_xargs": {"sentinel_slice": "a"}}
    with httpx.Client(timeout=30) as c:  # a connection of its own: the kernel picks the process
        if i % 2 == 0:
            return c.post(url + "/v1/chat/completions", json=body).json()["sentinel"]
        with c.stream("POST", url + "/v1/chat/completions", json=dict(body, stream=True)) as r:
            fin = [json.loads(ln[6:]) for ln in r.iter_lines()
                   if ln.startswith("data: {") and '"sentinel"' in ln]
        return fin[0]["sentinel"]


def test_two_workers_blocks_and_merged_metrics(tmp_path):
    sentinel = tmp_path / "top20.onnx"
    make_tiny_sentinel(sentinel, entropy="topk", k=20)
    prom = tmp_path / "prom"
    prom.mkdir()
    up = FakeUpstream()
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), PROMETHEUS_MULTIPROC_DIR=str(prom))
    with open(tmp_path / "proxy.log", "wb") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", "sentinel_vllm", "proxy", "--upstream", up.url, "--sentinel",
             str(sentinel), "--port", str(port), "--workers", "2", "--log-level", "warning",
             "--sentinel-slices", "a", "--model-label", "fake"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (tmp_path / "proxy.log").read_text()
            assert time.monotonic() < deadline, "proxy did not start"
            try:
                httpx.get(url + "/metrics", timeout=2)
                break
            except httpx.HTTPError:
                time.sleep(0.3)
        with ThreadPoolExecutor(8) as pool:
            blocks = list(pool.map(lambda i: _one(url, i), range(N)))
        want = TopLogprobsScorer(sentinel).blocks(chat_response([steps_for(0, 20)]), "a")[0]
        for got in blocks:
            assert got["p_correct"] == pytest.approx(want["p_correct"], abs=1e-12)
            assert got["features"] == pytest.approx(want["features"], rel=1e-12)
            assert got["n_steps"] == want["n_steps"] == 9 and got["slice"] == "a"
        for _ in range(6):  # whichever process answers: the sum of both
            text = httpx.get(url + "/metrics").text
            line = [ln for ln in text.splitlines()
                    if ln.startswith("sentinel_requests_scored_total{")]
            assert len(line) == 1 and 'slice="a"' in line[0] and line[0].endswith(f" {N}.0")
        per_pid = {}
        for f in prom.glob("counter_*.db"):
            one = tmp_path / f"one_{f.stem}"
            one.mkdir()
            shutil.copy(f, one / f.name)
            per_pid[f.stem] = _scored(one)
        assert sum(per_pid.values()) == N
        assert sum(v > 0 for v in per_pid.values()) == 2, per_pid  # both processes served
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(30)
        up.stop()
