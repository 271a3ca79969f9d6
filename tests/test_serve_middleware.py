"""The API-server middleware (sentinel_vllm.serving.api.middleware) on a fake vLLM app: no model.

The fake app behaves like vLLM's OpenAI server for what the middleware touches:
it reads ``vllm_xargs``, "generates" a fixed trajectory per choice, parks the
worker statistics under the sentinel id it received, and answers with a JSON
completion or an SSE stream ending in ``data: [DONE]``.
"""

import asyncio
import json

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
prometheus_client = pytest.importorskip("prometheus_client")
starlette = pytest.importorskip("starlette")

from starlette.applications import Starlette  # noqa: E402
from starlette.responses import JSONResponse, StreamingResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

from sentinel_vllm.features import compute_features  # noqa: E402
from sentinel_vllm.serving.api.metrics import SentinelMetrics  # noqa: E402
from sentinel_vllm.serving.api.middleware import SentinelMiddleware, ServerConfig  # noqa: E402
from serving_helpers import make_tiny_sentinel, reference_p  # noqa: E402


def traj(child, n_tokens):
    return [0.3 + 0.4 * child + 0.1 * i for i in range(n_tokens)]


class FakeEngine:
    def __init__(self):
        self.parked, self.calls, self.seen_xargs = {}, [], []
        self.model_config = type("MC", (), {"served_model_name": "fake-model",
                                            "get_vocab_size": lambda self: 1000})()

    async def collective_rpc(self, method, args=()):
        self.calls.append((method, args))
        if method == "sentinel_fetch":
            return [{sid: self.parked.pop(sid) for sid in args[0] if sid in self.parked}, {}]
        if method == "sentinel_discard":
            for sid in args[0]:
                self.parked.pop(sid, None)
            return [None, None]
        if method == "sentinel_stats":
            return [{"active": 0, "parked": len(self.parked)}, {}]
        raise AssertionError(method)


def make_app(engine, sentinel, metrics_reg):
    async def chat(request):
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error": "invalid JSON"}, status_code=400)
        xa = body.get("vllm_xargs") or {}
        engine.seen_xargs.append(xa)
        n, T = body.get("n", 1), body.get("max_tokens", 4)
        if body.get("status") == 400:
            return JSONResponse({"error": "bad"}, status_code=400)
        if "sentinel_id" in xa:
            engine.parked[xa["sentinel_id"]] = [
                {"child": c, "n_steps": T, "nan_steps": 0, "truncated": False,
                 "features": {"full": compute_features(traj(c, T)).tolist()}} for c in range(n)]
        if body.get("stream"):
            def chunk(**kw):
                return "data: " + json.dumps({"id": "cmpl-1", "object": "chat.completion.chunk",
                                              "created": 1, "model": "fake-model", **kw}) + "\n\n"

            async def gen():  # as vLLM: content chunks, one finish chunk per choice, usage
                for c in range(n):
                    yield chunk(choices=[{"index": c, "delta": {"content": "x"}, "finish_reason": None}])
                if body.get("abort"):
                    return  # vLLM ends the stream without [DONE] when the client goes away
                for c in range(n):
                    yield chunk(choices=[{"index": c, "delta": {"content": "y"}, "finish_reason": "length"}])
                if (body.get("stream_options") or {}).get("include_usage"):
                    yield chunk(choices=[], usage={"completion_tokens": T * n})
                yield "data: [DONE]\n\n"
            return StreamingResponse(gen(), media_type="text/event-stream")
        return JSONResponse({"id": "cmpl-1", "object": "chat.completion", "model": "fake-model",
                             "choices": [{"index": c, "message": {"content": "x"}} for c in range(n)],
                             "usage": {"completion_tokens": T * n}})

    async def other(request):  # /v1/responses, /v1/messages, generate: the worker parks any id
        body = await request.json()
        xa = body.get("vllm_xargs") or (body.get("sampling_params") or {}).get("extra_args") or {}
        engine.seen_xargs.append(xa)
        if "sentinel_id" in xa:
            engine.parked[xa["sentinel_id"]] = [
                {"child": 0, "n_steps": 3, "nan_steps": 0, "truncated": False,
                 "features": {"full": compute_features(traj(0, 3)).tolist()}}]
        return JSONResponse({"id": "resp-1", "object": "response", "status": "completed",
                             "output": [{"type": "message", "content": [
                                 {"type": "output_text", "text": "x"}]}],
                             "usage": {"output_tokens": 3}})

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]),
                            Route("/v1/completions", chat, methods=["POST"]),
                            *(Route(p, other, methods=["POST"]) for p in
                              ("/v1/responses", "/v1/messages", "/inference/v1/generate"))])
    app.state.engine_client = engine

    def factory(**kw):
        return SentinelMetrics(registry=metrics_reg, **kw)

    app.add_middleware(SentinelMiddleware, metrics_factory=factory,
                       config=ServerConfig(sentinel=str(sentinel), batch_delay_s=0.05,
                                           fetch_timeout_s=0.5, slices=["gsm8k"],
                                           replica="r0"))
    return app


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("sent") / "s.onnx"
    return path, make_tiny_sentinel(path)


@pytest.fixture
def env(tiny):
    engine, reg = FakeEngine(), prometheus_client.CollectorRegistry()
    app = make_app(engine, tiny[0], reg)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
    return engine, reg, client, tiny[1]


def run(coro):
    return asyncio.run(coro)


def test_json_n1_block_and_client_id_overwritten(env):
    engine, reg, client, parts = env
    req = {"messages": [], "max_tokens": 5,
           "vllm_xargs": {"sentinel_id": "someone-elses", "sentinel_slice": "gsm8k"}}
    r = run(client.post("/v1/chat/completions", json=req))
    assert r.status_code == 200
    out = r.json()
    sid = engine.seen_xargs[0]["sentinel_id"]
    assert sid != "someone-elses" and sid.startswith("snt-")
    b = out["sentinel"]
    assert b["n_steps"] == out["usage"]["completion_tokens"] == 5
    assert b["p_correct"] == pytest.approx(reference_p(parts, [compute_features(traj(0, 5))])[0])
    assert b["features"]["sum"] == pytest.approx(sum(traj(0, 5)))
    assert (b["slice"], b["entropy"], b["k"], b["model"]) == ("gsm8k", "full", 1000, parts[0])
    assert int(r.headers["content-length"]) == len(r.content)
    assert reg.get_sample_value("sentinel_requests_scored_total", {
        "model": "fake-model", "sentinel": parts[0], "replica": "r0", "slice": "gsm8k"}) == 1
    assert engine.parked == {}


@pytest.mark.parametrize("usage", [False, True])
def test_stream_blocks_ride_on_finish_chunks(env, usage):
    # issue 11 item 3: an extra chunk with "choices": [] broke `chunk.choices[0]`,
    # and n = 2 repeated each choice with finish_reason null after its real finish.
    engine, reg, client, parts = env
    for n in (1, 2):
        req = {"messages": [], "max_tokens": 3, "n": n, "stream": True,
               "stream_options": {"include_usage": usage}, "vllm_xargs": {"sentinel_slice": "nope"}}
        r = run(client.post("/v1/chat/completions", json=req))
        events = [e for e in r.text.split("\n\n") if e]
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
        assert len(chunks) == 2 * n + usage  # nothing added
        assert all(c["choices"] for c in chunks[: 2 * n])  # choices[0] exists in every chunk
        if usage:
            assert chunks[-1]["choices"] == [] and "sentinel" not in chunks[-1]
        last = {}  # a client keeping the last finish_reason per choice
        for ch in chunks:
            for c in ch["choices"]:
                last[c["index"]] = c["finish_reason"]
        assert last == {i: "length" for i in range(n)}
        finish = [ch for ch in chunks if ch["choices"] and ch["choices"][0]["finish_reason"]]
        assert len(finish) == n
        for ch in finish:
            c = ch["choices"][0]
            b = ch["sentinel"] if n == 1 else c["sentinel"]
            assert (n == 1) == ("sentinel" in ch) and (n == 1) == ("sentinel" not in c)
            assert b["slice"] == "other" and b["n_steps"] == 3
            assert b["features"]["mean"] == pytest.approx(np.mean(traj(c["index"], 3)))
        assert engine.seen_xargs[-1]["sentinel_n"] == n
    assert engine.parked == {}


def test_concurrent_requests_share_fetch_rpcs(env):
    engine, reg, client, parts = env

    async def many():
        reqs = [client.post("/v1/chat/completions", json={"messages": [], "max_tokens": 2 + i})
                for i in range(8)]
        return await asyncio.gather(*reqs)

    rs = run(many())
    assert [r.json()["sentinel"]["n_steps"] for r in rs] == [2 + i for i in range(8)]
    fetches = [c for c in engine.calls if c[0] == "sentinel_fetch"]
    assert len(fetches) < 8 and sum(len(c[1][0]) for c in fetches) >= 8


def test_scoring_failure_still_serves_with_error(env, monkeypatch):
    engine, reg, client, parts = env
    r0 = run(client.post("/v1/chat/completions", json={"messages": []}))
    assert "p_correct" in r0.json()["sentinel"]
    mw = _middleware(client)

    def boom(X):
        raise RuntimeError("ort failure")

    monkeypatch.setattr(mw.scorer.sentinel, "p_correct", boom)
    r = run(client.post("/v1/chat/completions", json={"messages": [], "max_tokens": 2}))
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "x"
    assert "ort failure" in r.json()["sentinel"]["error"]
    assert reg.get_sample_value("sentinel_errors_total", {
        "model": "fake-model", "sentinel": parts[0], "replica": "r0", "reason": "scoring"}) == 1


def test_missing_results_time_out_into_error_and_discard(env):
    engine, reg, client, parts = env
    orig = engine.collective_rpc

    async def forgetful(method, args=()):
        if method == "sentinel_fetch":
            engine.calls.append((method, args))
            return [{}, {}]
        return await orig(method, args)

    engine.collective_rpc = forgetful
    r = run(client.post("/v1/chat/completions", json={"messages": []}))
    assert r.json()["sentinel"]["reason"] == "fetch_timeout"
    assert engine.calls[-1][0] == "sentinel_discard"


def test_aborted_stream_discards_state(env):
    engine, reg, client, parts = env
    r = run(client.post("/v1/chat/completions",
                        json={"messages": [], "stream": True, "abort": True}))
    assert "[DONE]" not in r.text and "sentinel" not in r.text
    sid = engine.seen_xargs[0]["sentinel_id"]
    assert ("sentinel_discard", ([sid],)) in engine.calls
    assert engine.parked == {}
    assert run(client.get("/sentinel/stats")).json()["api"] == {"discarded": 1}


def test_opt_out_errors_and_passthrough(env):
    engine, reg, client, parts = env
    r = run(client.post("/v1/chat/completions",
                        json={"messages": [], "vllm_xargs": {"sentinel": False}}))
    assert "sentinel" not in r.json() and engine.seen_xargs[-1] == {}
    r = run(client.post("/v1/chat/completions", json={"messages": [], "status": 400}))
    assert r.status_code == 400 and r.json() == {"error": "bad"}
    r = run(client.post("/v1/completions", json={"prompt": ["a", "b"], "n": 2}))
    assert "sentinel_id" not in (engine.seen_xargs[-1] or {})
    assert len(r.json()["choices"]) == 2  # the fake answers n choices (vLLM: 2 prompts x n = 4)
    assert all("one prompt" in c["sentinel"]["error"] for c in r.json()["choices"])
    r = run(client.post("/v1/chat/completions", content=b"{not json",
                        headers={"content-type": "application/json"}))
    assert r.status_code == 400 and r.json() == {"error": "invalid JSON"}  # the app's own error


def test_stats_route(env):
    engine, reg, client, parts = env
    r = run(client.get("/sentinel/stats"))
    assert r.json() == {"sentinel": parts[0], "worker": {"active": 0, "parked": 0},
                        "api": {"discarded": 0}}


def test_bad_sentinel_file_fails_at_build(tmp_path):
    bad = tmp_path / "x.onnx"
    bad.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not an ONNX"):
        SentinelMiddleware(lambda *a: None, config=ServerConfig(sentinel=str(bad)))
    with pytest.raises(ValueError, match="no such sentinel file"):
        SentinelMiddleware(lambda *a: None, config=ServerConfig(sentinel=str(tmp_path / "m")))


def _middleware(client):
    app = client._transport.app
    stack = app.middleware_stack or app.build_middleware_stack()
    app.middleware_stack = stack
    node = stack
    while not isinstance(node, SentinelMiddleware):
        node = node.app
    return node


def test_trajectory_and_injected_fault(tiny):
    engine, reg = FakeEngine(), prometheus_client.CollectorRegistry()

    async def rpc(method, args=()):
        if method == "sentinel_trajectories":
            engine.calls.append((method, args))
            return [{sid: [{"child": s["child"], "n_steps": s["n_steps"],
                            "series": {"full": traj(s["child"], s["n_steps"])}}
                           for s in engine.parked[sid]] for sid in args[0] if sid in engine.parked}]
        return await FakeEngine.collective_rpc(engine, method, args)

    engine.collective_rpc = rpc
    app = make_app(engine, tiny[0], reg)
    mw_cfg = _find_cfg(app)
    mw_cfg.return_trajectory = mw_cfg.fault_injection = True
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
    r = run(client.post("/v1/chat/completions", json={"messages": [], "max_tokens": 4, "n": 2}))
    for c in (0, 1):
        assert r.json()["choices"][c]["sentinel"]["trajectory"] == traj(c, 4)
    r = run(client.post("/v1/chat/completions",
                        json={"messages": [], "vllm_xargs": {"sentinel_fault": "scoring"}}))
    assert "injected scoring fault" in r.json()["sentinel"]["error"]
    assert "sentinel_fault" not in engine.seen_xargs[-1]


def test_fault_key_ignored_without_fault_injection(env):
    engine, reg, client, parts = env
    r = run(client.post("/v1/chat/completions",
                        json={"messages": [], "vllm_xargs": {"sentinel_fault": "scoring"}}))
    assert "p_correct" in r.json()["sentinel"] and "sentinel_fault" not in engine.seen_xargs[-1]


def _find_cfg(app):
    for m in app.user_middleware:
        if m.cls is SentinelMiddleware:
            return m.kwargs["config"]
    raise AssertionError("middleware not installed")


CLIENT_XARGS = {"sentinel_id": "client-chosen", "sentinel_n": 2, "sentinel_child": 1,
                "sentinel_slice": "gsm8k", "sentinel_future_key": 1, "temperature_hint": 1}


@pytest.mark.parametrize("path,body", [
    ("/v1/responses", {"input": "hello"}),
    ("/v1/messages", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}),
    ("/v1/completions", {"prompt": ["a", "b"]}),
    ("/v1/completions", {"prompt": "a"}),
    ("/v1/chat/completions", {"messages": []}),
    ("/inference/v1/generate", {"token_ids": [1, 2], "sampling_params": {
        "max_tokens": 3, "extra_args": dict(CLIENT_XARGS)}}),
])
def test_worker_never_sees_a_client_chosen_id(env, path, body):
    # issue 11 item 1: /v1/responses and /v1/messages reached the worker with the
    # client's sentinel_id; the state was parked and never fetched (a slot leak).
    engine, reg, client, parts = env
    r = run(client.post(path, json=dict(body, vllm_xargs=dict(CLIENT_XARGS))))
    assert r.status_code == 200, r.text
    (seen,) = engine.seen_xargs
    assert not [k for k in seen if k.startswith("sentinel") and k not in ("sentinel_id", "sentinel_n")]
    assert seen.get("temperature_hint") == 1  # other keys pass
    if "sentinel_id" in seen:
        assert seen["sentinel_id"].startswith("snt-") and seen["sentinel_n"] == 1
    assert engine.parked == {}  # nothing left behind in the "worker"
    r = run(client.get("/sentinel/stats"))
    assert r.json()["worker"] == {"active": 0, "parked": 0}



def _auth_env(tiny, **cfg):
    """Fake app behind vLLM's real AuthenticationMiddleware (--api-key sk-test), ours outside it."""
    auth = pytest.importorskip("vllm.entrypoints.serve.middleware.authenticate")
    engine, reg = FakeEngine(), prometheus_client.CollectorRegistry()
    app = make_app(engine, tiny[0], reg)
    mw = app.user_middleware.pop(0)  # re-add ours last, as vLLM does with --middleware
    mw.kwargs["config"] = ServerConfig(**dict(
        {"sentinel": str(tiny[0]), "batch_delay_s": 0.05, "fetch_timeout_s": 0.5, "replica": "r0"}, **cfg))
    app.add_middleware(auth.AuthenticationMiddleware, tokens=["sk-test"])
    app.add_middleware(mw.cls, *mw.args, **mw.kwargs)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
    return engine, reg, client


def test_unauthenticated_requests_leave_no_trace(tiny):
    # issue 9 item 5: 401s triggered sentinel_discard RPCs and used up the slice
    # label allowance; /sentinel/stats answered without the key.
    engine, reg, client = _auth_env(tiny, max_slices=1)
    key = {"Authorization": "Bearer sk-test"}
    for i, path in enumerate(["/v1/chat/completions", "/v1/completions", "/v1/responses"] * 2):
        r = run(client.post(path, json={"messages": [], "prompt": "a", "input": "b", "stream": i % 2 == 1,
                                        "vllm_xargs": {"sentinel_slice": f"label{i}"}}))
        assert r.status_code == 401, r.text
    r = run(client.post("/v1/chat/completions", headers={"Authorization": "Bearer wrong"},
                        json={"messages": [], "vllm_xargs": {"sentinel_slice": "wrong-key"}}))
    assert r.status_code == 401
    assert run(client.get("/sentinel/stats")).status_code == 401
    assert engine.calls == [] and engine.seen_xargs == []
    assert "sentinel_requests_scored_total" not in _samples(reg)
    # the single label allowed is still free for an authenticated client
    r = run(client.post("/v1/chat/completions", headers=key,
                        json={"messages": [], "vllm_xargs": {"sentinel_slice": "real"}}))
    assert r.status_code == 200 and r.json()["sentinel"]["slice"] == "real"
    r = run(client.get("/sentinel/stats", headers=key))
    assert r.status_code == 200 and r.json()["worker"] == {"active": 0, "parked": 0}


def test_request_vllm_refuses_claims_no_label_and_makes_no_rpc(tiny):
    engine, reg, client = _auth_env(tiny, max_slices=1)
    key = {"Authorization": "Bearer sk-test"}
    for stream in (False, True):
        r = run(client.post("/v1/chat/completions", headers=key, json={
            "messages": [], "status": 400, "stream": stream, "vllm_xargs": {"sentinel_slice": "bad"}}))
        assert r.status_code == 400
    assert engine.calls == []  # no sentinel_discard for a request the engine never saw
    r = run(client.post("/v1/chat/completions", headers=key,
                        json={"messages": [], "vllm_xargs": {"sentinel_slice": "good"}}))
    assert r.json()["sentinel"]["slice"] == "good"


def _samples(reg):
    return {s.name for m in reg.collect() for s in m.samples}
