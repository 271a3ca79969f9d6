"""The proxy against a local fake upstream (real HTTP both sides, the ``openai`` SDK as client).

Checks: the block (n = 1 top level, n = 2 per choice, streams on the finish chunk)
equals the client helper's on the upstream's answer; logprobs are added upstream
and stripped (or cut) for the client; sentinel keys never reach the upstream;
auth headers pass untouched; chunks are forwarded before the upstream finishes;
metrics count scored responses and errors only for 200 answers; a bad upstream
(down, slow, stalled stream, 500, 401, no logprobs) never hangs the client.
"""

import json
import time

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from fake_upstream import FakeUpstream, ServerThread, free_port, steps_for  # noqa: E402
from openai_fixtures import chat_response  # noqa: E402
from serving_helpers import make_tiny_sentinel  # noqa: E402

from sentinel_vllm.blackbox.client import TopLogprobsScorer  # noqa: E402
from sentinel_vllm.blackbox.proxy import ProxyConfig, build_app  # noqa: E402

TIMEOUT_S = 1.0


def _serve(upstream, sentinel, registry, **options):
    """The proxy of ``upstream`` (test timeouts) on a free port: ``(app, server thread)``."""
    cfg = ProxyConfig(
        upstream=upstream,
        sentinel=str(sentinel),
        timeout_s=TIMEOUT_S,
        connect_timeout_s=TIMEOUT_S,
        **options,
    )
    app = build_app(cfg, registry=registry)
    return app, ServerThread(app).start()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from prometheus_client import CollectorRegistry

    tmp = tmp_path_factory.mktemp("proxy")
    sentinel = tmp / "top20.onnx"
    make_tiny_sentinel(sentinel, entropy="topk", k=20)
    up = FakeUpstream(slow_s=3 * TIMEOUT_S)
    reg = CollectorRegistry()
    app, proxy = _serve(
        up.url + "/v1", sentinel, reg, model_label="fake", replica="t", slices=["a", "b"]
    )
    try:
        yield {
            "up": up,
            "proxy": proxy.url,
            "reg": reg,
            "scorer": TopLogprobsScorer(sentinel),
            "sentinel": sentinel,
            "app": app,
        }
    finally:
        proxy.stop()
        up.stop()


def _expected(env, n, label):
    return env["scorer"].blocks(chat_response([steps_for(i, 20) for i in range(n)]), label)


def _post(env, body, path="/v1/chat/completions", **kw):
    return httpx.post(env["proxy"] + path, json=body, timeout=30, **kw)


def _stream(env, body):
    """A streamed chat completion through the proxy (``with _stream(env, body) as r``)."""
    return httpx.stream("POST", env["proxy"] + "/v1/chat/completions", json=body, timeout=30)


def _sdk(env, api_key="good", **kw):
    return openai.OpenAI(base_url=env["proxy"] + "/v1", api_key=api_key, **kw)


def _counter(env, name, **labels):
    """A metric sample of the module's proxy; its fixed labels (model, sentinel, replica) added."""
    labels = {"model": "fake", "sentinel": env["scorer"].id, "replica": "t", **labels}
    v = env["reg"].get_sample_value(name, labels)
    return 0.0 if v is None else v


def _same_block(got, want):
    assert set(got) == set(want)
    assert got["p_correct"] == pytest.approx(want["p_correct"], abs=1e-12)
    np.testing.assert_allclose(
        [got["features"][f] for f in want["features"]], list(want["features"].values()), rtol=1e-12
    )
    for key in ("entropy", "k", "n_steps", "model", "slice"):
        assert got[key] == want[key]


def test_json_n1_block_and_request_rewrite(env):
    before = _counter(env, "sentinel_requests_scored_total", slice="a")
    r = _post(
        env,
        {
            "model": "ok",
            "messages": [{"role": "user", "content": "hi"}],
            "vllm_xargs": {"sentinel_slice": "a", "other": 1},
        },
        headers={"Authorization": "Bearer client-key", "X-Custom": "v"},
    )
    assert r.status_code == 200, r.text
    obj = r.json()
    _same_block(obj["sentinel"], _expected(env, 1, "a")[0])
    assert obj["choices"][0]["logprobs"] is None  # the client did not ask
    seen = env["up"].seen[-1]
    assert seen["body"]["logprobs"] is True and seen["body"]["top_logprobs"] == 20
    assert seen["body"]["vllm_xargs"] == {"other": 1}  # the sentinel keys stay here
    assert seen["headers"]["authorization"] == "Bearer client-key"
    assert seen["headers"]["x-custom"] == "v"
    after = _counter(env, "sentinel_requests_scored_total", slice="a")
    assert after == before + 1


def test_json_n2_client_asked_fewer_logprobs(env):
    r = _post(
        env,
        {
            "model": "ok",
            "n": 2,
            "logprobs": True,
            "top_logprobs": 3,
            "messages": [{"role": "user", "content": "hi"}],
        },
    )
    obj = r.json()
    want = _expected(env, 2, "default")
    assert "sentinel" not in obj
    for c in obj["choices"]:
        _same_block(c["sentinel"], want[c["index"]])
        tops = [e["top_logprobs"] for e in c["logprobs"]["content"]]
        assert {len(t) for t in tops} == {3}  # cut to what the client asked
        lp = steps_for(c["index"], 20)
        np.testing.assert_allclose([[a["logprob"] for a in t] for t in tops], [s[:3] for s in lp])


def test_completions_endpoint(env):
    r = _post(env, {"model": "ok", "prompt": "2+2=", "logprobs": 2}, path="/v1/completions")
    obj = r.json()
    assert env["up"].seen[-1]["body"]["logprobs"] == 20
    assert obj["sentinel"]["n_steps"] == 9 and obj["sentinel"]["k"] == 20
    assert all(len(d) <= 3 for d in obj["choices"][0]["logprobs"]["top_logprobs"])


def test_openai_sdk_reads_block_json_and_stream(env):
    client = _sdk(env)
    r = client.chat.completions.create(
        model="ok",
        messages=[{"role": "user", "content": "hi"}],
        extra_body={"vllm_xargs": {"sentinel_slice": "b"}},
    )
    _same_block(r.model_extra["sentinel"], _expected(env, 1, "b")[0])
    assert r.choices[0].logprobs is None
    blocks, n_chunks = {}, 0
    stream = client.chat.completions.create(
        model="ok", n=2, stream=True, messages=[{"role": "user", "content": "hi"}]
    )
    for chunk in stream:
        n_chunks += 1
        for c in chunk.choices:  # every chunk with choices; the block rides on the finish chunk
            assert c.logprobs is None
            if c.finish_reason is not None:
                blocks[c.index] = c.model_extra["sentinel"]
    want = _expected(env, 2, "default")
    assert sorted(blocks) == [0, 1]
    for i in (0, 1):
        _same_block(blocks[i], want[i])
    # n = 1 stream: the block is top-level on the finish chunk, like the JSON answer
    stream = client.chat.completions.create(
        model="ok", stream=True, messages=[{"role": "user", "content": "hi"}]
    )
    fin = [c for c in stream if c.choices and c.choices[0].finish_reason]
    assert len(fin) == 1
    _same_block(fin[0].model_extra["sentinel"], _expected(env, 1, "default")[0])


def test_stream_forwarded_before_upstream_finishes(env):
    up = env["up"]
    up.gate.clear()
    body = {"model": "gated", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    got_content_before_gate = False
    with _stream(env, body) as r:
        lines = []
        for line in r.iter_lines():
            if line.startswith("data: {") and '"content":"tok0_0"' in line.replace(" ", ""):
                got_content_before_gate = not up.gate.is_set()
                up.gate.set()
            lines.append(line)
    assert got_content_before_gate
    assert lines[-1] == "data: [DONE]" or lines[-2] == "data: [DONE]"
    fin = [json.loads(ln[6:]) for ln in lines if ln.startswith("data: {") and "sentinel" in ln]
    assert len(fin) == 1 and fin[0]["choices"][0]["finish_reason"] == "stop"


def test_upstream_errors_pass_through_untouched(env):
    errs = _counter(env, "sentinel_errors_total", reason="missing_series")
    t0 = time.monotonic()
    r = _post(env, {"model": "fail500", "messages": []})
    assert r.status_code == 500 and r.json()["error"]["message"] == "boom"
    r = _post(env, {"model": "auth", "messages": []}, headers={"Authorization": "Bearer bad"})
    assert r.status_code == 401 and "sentinel" not in r.text
    client = _sdk(env, "bad", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="auth", messages=[{"role": "user", "content": "x"}])
    ok = _sdk(env)
    r = ok.chat.completions.create(model="auth", messages=[{"role": "user", "content": "x"}])
    assert "p_correct" in r.model_extra["sentinel"]
    assert time.monotonic() - t0 < 10
    # nothing of the sentinel acted on the rejected requests: no error counted for them
    assert _counter(env, "sentinel_errors_total", reason="missing_series") == errs


def test_upstream_without_logprobs_served_with_error_block(env):
    r = _post(env, {"model": "nologprobs", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"]
    assert r.json()["sentinel"]["reason"] == "missing_series"
    assert "no logprobs" in r.json()["sentinel"]["error"]
    text = httpx.get(env["proxy"] + "/metrics").text
    assert 'sentinel_errors_total{model="fake"' in text and 'reason="missing_series"' in text


def test_upstream_non_json_200_returned_as_is_and_counted(env):
    errs = _counter(env, "sentinel_errors_total", reason="upstream")
    scored = _counter(env, "sentinel_requests_scored_total", slice="a")
    r = _post(env, {"model": "notjson", "messages": [{"role": "user", "content": "x"}],
                    "vllm_xargs": {"sentinel_slice": "a"}})
    assert r.status_code == 200 and r.text == "upstream says hi"
    assert r.headers["content-type"].startswith("text/plain")
    assert _counter(env, "sentinel_errors_total", reason="upstream") == errs + 1
    assert _counter(env, "sentinel_requests_scored_total", slice="a") == scored


def test_one_date_and_server_header(env):
    """uvicorn writes Date and Server; the upstream's are not copied beside them."""
    for body in ({"model": "notjson", "messages": []}, {"model": "ok", "messages": []}):
        r = _post(env, body)
        assert r.status_code == 200
        for name in ("date", "server"):
            assert len(r.headers.get_list(name)) == 1, (name, r.headers.get_list(name))
        assert r.headers["server"] != "fake-up"
    r = httpx.get(env["proxy"] + "/v1/models")
    assert len(r.headers.get_list("date")) == 1 and len(r.headers.get_list("server")) == 1


def test_slow_upstream_gives_504_and_stalled_stream_ends(env):
    t0 = time.monotonic()
    r = _post(env, {"model": "slow", "messages": []})
    assert r.status_code == 504 and "timed out" in r.json()["error"]["message"]
    assert time.monotonic() - t0 < 3 * TIMEOUT_S
    body = {"model": "stall", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    t0 = time.monotonic()
    with _stream(env, body) as r:
        text = r.read().decode()
    assert r.status_code == 200 and "event: error" in text and "upstream_timeout" in text
    assert time.monotonic() - t0 < 3 * TIMEOUT_S


def test_upstream_down_gives_502(env):
    from prometheus_client import CollectorRegistry

    _, srv = _serve(f"http://127.0.0.1:{free_port()}", env["sentinel"], CollectorRegistry())
    try:
        t0 = time.monotonic()
        r = httpx.post(srv.url + "/v1/chat/completions", json={"model": "x", "messages": []})
        assert r.status_code == 502 and "unreachable" in r.json()["error"]["message"]
        r = httpx.get(srv.url + "/v1/models")
        assert r.status_code == 502
        assert time.monotonic() - t0 < 5
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="k", max_retries=0)
        with pytest.raises(openai.APIStatusError) as ei:
            client.chat.completions.create(model="x", messages=[{"role": "user", "content": "x"}])
        assert ei.value.status_code == 502
    finally:
        srv.stop()


def test_passthrough_and_opt_out(env):
    r = httpx.get(env["proxy"] + "/v1/models", headers={"Authorization": "Bearer z"})
    assert r.json()["data"][0]["id"] == "ok"
    assert env["up"].seen[-1]["headers"]["authorization"] == "Bearer z"
    r = _post(env, {"model": "ok", "messages": [], "vllm_xargs": {"sentinel": False}})
    assert "sentinel" not in r.json() and "vllm_xargs" not in env["up"].seen[-1]["body"]
    assert "top_logprobs" not in env["up"].seen[-1]["body"]


def test_refuses_full_and_other_k_sentinels(tmp_path, env):
    from prometheus_client import CollectorRegistry

    full = tmp_path / "full.onnx"
    make_tiny_sentinel(full, entropy="full")
    with pytest.raises(ValueError, match="full-vocabulary"):
        build_app(
            ProxyConfig(upstream=env["up"].url, sentinel=str(full)), registry=CollectorRegistry()
        )
    with pytest.raises(ValueError, match="top-20"):
        build_app(
            ProxyConfig(upstream=env["up"].url, sentinel=str(env["sentinel"]), k=5),
            registry=CollectorRegistry(),
        )


def test_incoherent_logprobs_request_left_to_the_upstream(env):
    """top_logprobs without logprobs=true is the upstream's to judge: forwarded as sent."""
    _post(env, {"model": "ok", "messages": [], "top_logprobs": 3})
    seen = env["up"].seen[-1]["body"]
    assert "logprobs" not in seen and seen["top_logprobs"] == 3


def test_sentinel_failure_never_costs_the_response(env, monkeypatch):
    """A scorer that raises: JSON and stream answers are still served, with an error block."""
    scorer = env["app"].state.scorer

    def boom(*a, **k):
        raise RuntimeError("injected")

    monkeypatch.setattr(scorer, "score", boom)
    monkeypatch.setattr(scorer, "score_choices", boom)
    r = _post(env, {"model": "ok", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
    assert (
        r.json()["sentinel"]["reason"] == "internal" and "injected" in r.json()["sentinel"]["error"]
    )
    body = {"model": "ok", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    with _stream(env, body) as r:
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert r.status_code == 200 and lines[-1] == "data: [DONE]"
    contents = [
        json.loads(ln[6:])["choices"][0]["delta"].get("content")
        for ln in lines[:-1]
        if json.loads(ln[6:])["choices"]
    ]
    assert "".join(c or "" for c in contents) == "".join(f"tok{t}_0" for t in range(9))


def test_cli_refuses_bad_upstream_port_timeout_and_listens_locally(env, capsys):
    """One-line errors (exit 1) before anything starts; the default host is loopback."""
    from sentinel_vllm.cli import build_parser, main

    ok = ["proxy", "--sentinel", str(env["sentinel"])]
    assert build_parser().parse_args([*ok, "--upstream", env["up"].url]).host == "127.0.0.1"
    for extra, msg in [
        (["--upstream", "10.0.0.5:8000"], "needs http:// or https://"),
        (["--upstream", "ftp://10.0.0.5"], "needs http:// or https://"),
        (["--upstream", "http://"], "needs http:// or https://"),
        (["--upstream", "http://[::1"], "not a URL"),
        (["--upstream", env["up"].url, "--port", "70000"], "--port 70000: must be in 1..65535"),
        (["--upstream", env["up"].url, "--port", "0"], "--port 0: must be in 1..65535"),
        (["--upstream", env["up"].url, "--timeout", "0"], "--timeout 0.0: must be > 0"),
        (["--upstream", env["up"].url, "--timeout", "-1"], "--timeout -1.0: must be > 0"),
    ]:
        assert main([*ok, *extra]) == 1, extra
        err = capsys.readouterr().err.strip()
        assert err.startswith("sentinel-vllm proxy: error: ") and msg in err and "\n" not in err
