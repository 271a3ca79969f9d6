"""Feature sets in serving: one assembly of a row (FeatureSpec.row) for training and the scorer.

Hand-computed rows, trace rows equal to rows assembled from worker-style samples,
sentinels of each set built by the real training path (``sentinel-vllm train
--feature-set``) and scored by SentinelScorer, and the refusal of sets serving
cannot compute.
"""

import math

import numpy as np
import pytest

from sentinel_vllm.cli import main
from sentinel_vllm.feature_sets import (
    SERVABLE,
    FeatureSpec,
    feature_names,
    feature_set_matrix,
    make_spec,
    spec_from_metadata,
    trace_row,
)
from sentinel_vllm.features import FEATURE_NAMES, compute_features, compute_features_batch
from sentinel_vllm.sentinel_file import load_sentinel
from sentinel_vllm.serving.api.response import finish_reasons
from sentinel_vllm.serving.api.scoring import SentinelScorer, worker_series
from sentinel_vllm.serving.contract import vllm_launch_kwargs
from sentinel_vllm.traces import Trace, read_traces, write_traces
from openai_fixtures import chat_response, choice_steps
from serving_helpers import make_tiny_sentinel
from synthetic import make_traces


def _worker_sample(trajs: dict, truncated=False):
    """The worker's fetch answer for one choice: statistics by compute_features_batch, as
    kernels/slot_state.py ``gather`` computes them (zero-padded rows, ``n_steps``)."""
    n = len(next(iter(trajs.values())))
    feats = {}
    for name, x in trajs.items():
        pad = np.zeros((1, max(n, 1)))
        pad[0, :n] = x
        feats[name] = [float(v) for v in compute_features_batch(pad, np.array([n]))[0]]
    return {"child": 0, "n_steps": n, "nan_steps": 0, "truncated": truncated, "features": feats}


def test_five_step_trajectory_by_hand():
    full, top = [0.5, 1.0, 0.0, 2.0, 1.5], [0.4, 0.9, 0.0, 1.0, 1.2]
    t = Trace("q/0", "q", True, {"full": full, "topk": top}, 20, {"finish_reason": "length"})
    row = dict(zip(feature_names("paper+length"), feature_set_matrix([t], "paper+length")[0]))
    assert row["log_n_steps"] == pytest.approx(math.log(6), abs=1e-15)
    assert row["truncated"] == 1.0
    assert row["mean"] == pytest.approx(1.0) and row["sum"] == pytest.approx(5.0)
    assert row["std"] == pytest.approx(math.sqrt(0.5))  # deviations .5 0 1 1 .5 -> 2.5 / 5
    assert row["max"] == 2.0 and row["q50"] == 1.0
    stop = Trace("q/1", "q", True, {"full": full}, 20, {"finish_reason": "stop"})
    assert feature_set_matrix([stop], "paper+length")[0, -1] == 0.0
    X = feature_set_matrix([t], "paper+topk")
    assert X.shape == (1, 22)
    np.testing.assert_array_equal(X[0, 11:], compute_features(top))
    np.testing.assert_array_equal(X[0, :11], compute_features(full))
    topk = dict(zip(feature_names("paper+topk"), X[0]))
    assert topk["topk_mean"] == pytest.approx(0.7) and topk["topk_max"] == 1.2
    # the worker-side assembly of the same trajectory gives the same row
    spec = make_spec("paper+topk", "full", None, 20)
    assert spec == FeatureSpec("paper+topk", "full", "top20")
    assert spec.needed_series == ("full", "top20") and spec.servable
    s = _worker_sample({"full": full, "top20": top})
    np.testing.assert_allclose(spec.row(s["features"], s["n_steps"]), X[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("name,entropy", [("paper", "full"), ("paper+length", "full"),
                                          ("paper+topk", "full"), ("paper+length", "top5"),
                                          ("paper+topk", "top5")])
def test_trace_rows_equal_worker_rows(name, entropy):
    recs = make_traces(15, seed=4)
    rng = np.random.default_rng(0)
    traces = []
    for r in recs:
        r["finish_reason"] = "length" if rng.random() < 0.3 else "stop"
        traces.append(Trace(r["id"], r["slice"], r["correct"], r["entropy"], r["k"],
                            {"finish_reason": r["finish_reason"]}))
    X = feature_set_matrix(traces, name, entropy)
    assert X.shape == (len(traces), len(feature_names(name)))
    spec = make_spec(name, entropy, 20 if entropy == "topk" else None, 20)
    for t, x in zip(traces, X):
        sample = _worker_sample({s: t.series(s) for s in spec.needed_series})
        got = spec.row(sample["features"], sample["n_steps"], t.extra["finish_reason"] == "length")
        np.testing.assert_allclose(got, x, rtol=0, atol=1e-12)
        np.testing.assert_allclose(trace_row(t, name, entropy), x, rtol=0, atol=0)


def test_spec_from_metadata_reads_the_declared_set():
    meta = {"feature_names": list(feature_names("paper+topk")), "entropy": "full", "k": None,
            "topk_k": 10, "feature_set": "paper+topk"}
    assert spec_from_metadata(meta) == FeatureSpec("paper+topk", "full", "top10")
    assert spec_from_metadata({"feature_names": list(FEATURE_NAMES), "entropy": "topk",
                               "k": 5}) == FeatureSpec("paper", "top5", None)
    with pytest.raises(ValueError, match="declares feature set 'paper' but"):
        spec_from_metadata({**meta, "feature_set": "paper"})
    with pytest.raises(ValueError, match="topk_k"):
        spec_from_metadata({**meta, "topk_k": None})
    with pytest.raises(ValueError, match="no known feature set"):
        spec_from_metadata({**meta, "feature_names": ["mean", "sum"]}, "sentinel x")
    assert SERVABLE == {"paper", "paper+length", "paper+topk", "paper+length+temperature"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One file per set, written by ``sentinel-vllm train --feature-set`` (the real path)."""
    d = tmp_path_factory.mktemp("fs")
    recs = make_traces(40, seed=7)
    rng = np.random.default_rng(1)
    for r in recs:  # long hard answers run out of tokens more often
        r["finish_reason"] = "length" if rng.random() < 0.2 + 0.01 * len(r["entropy"]["full"]) \
            else "stop"
    write_traces(d / "t.jsonl", recs)
    files = {}
    for name in ("paper+length", "paper+topk", "paper+tail"):
        files[name] = d / f"{name}.onnx"
        assert main(["train", str(d / "t.jsonl"), "--feature-set", name, "--out",
                     str(files[name])]) == 0
    files["top20+length"] = d / "top20+length.onnx"  # for the black-box path
    assert main(["train", str(d / "t.jsonl"), "--entropy", "topk", "--feature-set", "paper+length",
                 "--out", str(files["top20+length"])]) == 0
    return d / "t.jsonl", files


@pytest.mark.parametrize("name", ["paper+length", "paper+topk"])
def test_scorer_serves_trained_feature_sets(trained, name):
    trace_file, files = trained
    sent = load_sentinel(files[name])
    assert sent.metadata["feature_set"] == name
    assert sent.metadata["feature_names"] == list(feature_names(name))
    sc = SentinelScorer(sent, vocab_size=49152)
    traces = read_traces(trace_file)[:25]
    X = feature_set_matrix(traces, name, "full", None, 20)
    want = sent.p_correct(X)
    samples = [_worker_sample({s: t.series(s) for s in sc.needed_series}) for t in traces]
    frs = [t.extra["finish_reason"] for t in traces]
    out = sc.score(samples, ["s"] * len(traces), frs)
    for o, w, x in zip(out, want, X):
        assert o.reason is None, o.block
        assert o.block["p_correct"] == pytest.approx(w, abs=1e-12)
        assert list(o.block["features"]) == list(feature_names(name))
        np.testing.assert_allclose(list(o.block["features"].values()), x, rtol=0, atol=1e-12)
    assert len(set(o.block["p_correct"] for o in out)) > 1
    if name == "paper+topk":
        assert sc.needed_series == ("full", "top20")
        assert worker_series(sc, None) == "full,top20"
        # the worker must record the top-k series: a sample without it is an error block
        (bad,) = sc.score([_worker_sample({"full": [1.0, 2.0]})], ["s"])
        assert bad.reason == "missing_series" and "'top20'" in bad.block["error"]
    else:
        assert sc.needed_series == ("full",)
        assert [o.block["features"]["truncated"] for o in out] == [float(f == "length") for f in frs]
        assert [o.block["features"]["log_n_steps"] for o in out] == pytest.approx(
            [math.log1p(len(t.series("full"))) for t in traces], abs=1e-15)
        # without a finish reason the length features cannot be computed: error, not a guess
        (bad,) = sc.score([samples[0]], ["s"])
        assert bad.reason == "missing_series" and "finish_reason" in bad.block["error"]


def test_paper_block_is_unchanged(tmp_path):
    """The paper set keeps the 11 statistics, byte-identical to the worker's numbers."""
    make_tiny_sentinel(tmp_path / "p.onnx")
    sc = SentinelScorer.from_path(tmp_path / "p.onnx")
    s = _worker_sample({"full": [0.25, 3.0, 0.5]})
    (o,) = sc.score([s], ["s"])
    assert list(o.block["features"]) == list(FEATURE_NAMES)
    assert list(o.block["features"].values()) == s["features"]["full"]
    assert set(o.block) == {"p_correct", "features", "entropy", "k", "n_steps", "model", "slice"}


def test_unservable_set_is_refused_at_load(trained, tmp_path, capsys, monkeypatch):
    trace_file, files = trained
    with pytest.raises(ValueError) as exc:
        SentinelScorer.from_path(files["paper+tail"])
    msg = str(exc.value)
    assert "\n" not in msg and "'paper+tail'" in msg
    assert "servable feature sets: paper, paper+length, paper+length+temperature, paper+topk" in msg
    # serve stops before vLLM starts, with that line
    from sentinel_vllm.cli import serve

    monkeypatch.setattr(serve, "run_vllm_serve", lambda args: pytest.fail("vLLM started"))
    assert main(["serve", "m", "--sentinel", str(files["paper+tail"])]) == 1
    assert "serve: error: " in capsys.readouterr().err
    # the offline LLM refuses it before vLLM starts too
    from sentinel_vllm.serving.api.offline import LLM

    with pytest.raises(ValueError, match="paper\\+tail"):
        LLM("no-such-model", sentinel=files["paper+tail"])
    # `score` on traces computes every set, tail included
    out = tmp_path / "s.csv"
    assert main(["score", str(files["paper+tail"]), str(trace_file), "--out", str(out)]) == 0
    got = [float(line.split(",")[-1]) for line in out.read_text().splitlines()[1:]]
    traces = read_traces(trace_file)
    want = load_sentinel(files["paper+tail"]).p_correct(feature_set_matrix(traces, "paper+tail"))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_launch_records_every_needed_series(trained):
    _, files = trained
    sc = SentinelScorer.from_path(files["paper+topk"])
    kw = vllm_launch_kwargs(sc.needed_series, environ={})
    assert kw["additional_config"]["sentinel"]["series"] == "full,top20"
    with pytest.raises(ValueError, match="top20"):
        vllm_launch_kwargs(sc.needed_series, environ={"SENTINEL_SERIES": "full"})
    with pytest.raises(ValueError, match="top20"):
        worker_series(sc, "full,top5")


def test_finish_reasons_from_responses():
    chat = {"object": "chat.completion", "choices": [
        {"index": 0, "finish_reason": "length"}, {"index": 1, "finish_reason": "stop"}]}
    assert finish_reasons(chat) == {0: "length", 1: "stop"}
    chunk = {"object": "chat.completion.chunk", "choices": [
        {"index": 2, "delta": {}, "finish_reason": "length"}, {"index": 0, "delta": {"content": "x"},
                                                              "finish_reason": None}]}
    assert finish_reasons(chunk) == {2: "length"}
    resp = {"object": "response", "status": "incomplete",
            "incomplete_details": {"reason": "max_output_tokens"}}
    assert finish_reasons(resp) == {0: "length"}
    assert finish_reasons({"type": "response.completed",
                           "response": {"object": "response", "status": "completed"}}) == {0: "stop"}
    assert finish_reasons({"choices": []}) == {} and finish_reasons(None) == {}


def test_blackbox_scores_paper_length_from_top_logprobs(trained):
    """The proxy's scorer: top-20 statistics, n_steps and the choice's finish_reason."""
    from sentinel_vllm.blackbox.client import TopLogprobsScorer, trajectories
    from sentinel_vllm.sentinel_file import SentinelFileError

    _, files = trained
    sc = TopLogprobsScorer(files["top20+length"])
    resp = chat_response([choice_steps(1, 6, 20), choice_steps(2, 9, 20)])
    resp["choices"][1]["finish_reason"] = "length"
    blocks = sc.blocks(resp)
    sent = load_sentinel(files["top20+length"])
    for i, (n, trunc) in enumerate([(6, 0.0), (9, 1.0)]):
        h = trajectories(resp)[i].entropy
        x = np.concatenate([compute_features(h), [math.log1p(n), trunc]])
        assert blocks[i]["features"]["log_n_steps"] == pytest.approx(math.log(1 + n), abs=1e-15)
        assert blocks[i]["features"]["truncated"] == trunc
        assert blocks[i]["p_correct"] == pytest.approx(sent.p_correct(x[None])[0], abs=1e-12)
    with pytest.raises(SentinelFileError, match="full-vocabulary"):
        TopLogprobsScorer(files["paper+length"])


def test_middleware_passes_each_finish_reason(trained):
    """Through the API-server middleware (fake vLLM app, real rewriter/fetcher/scorer): the
    ``truncated`` feature of each choice is its own finish_reason, in a JSON body and a stream."""
    import asyncio
    import json

    httpx = pytest.importorskip("httpx")
    prometheus_client = pytest.importorskip("prometheus_client")
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    from sentinel_vllm.serving.api.metrics import SentinelMetrics
    from sentinel_vllm.serving.api.middleware import SentinelMiddleware, ServerConfig

    _, files = trained
    parked, reasons, T = {}, ["length", "stop"], 7

    class Engine:
        async def collective_rpc(self, method, args=()):
            return [{sid: parked.pop(sid) for sid in args[0] if sid in parked}]

    async def chat(request):
        body = await request.json()
        xa = body["vllm_xargs"]
        parked[xa["sentinel_id"]] = [
            {**_worker_sample({"full": [0.2 * (c + 1) + 0.1 * i for i in range(T)]}), "child": c}
            for c in range(2)]
        if not body.get("stream"):
            return JSONResponse({"object": "chat.completion", "choices": [
                {"index": c, "message": {"content": "x"}, "finish_reason": reasons[c]}
                for c in range(2)]})

        async def gen():
            for c in range(2):
                yield "data: " + json.dumps({"object": "chat.completion.chunk", "choices": [
                    {"index": c, "delta": {"content": "y"}, "finish_reason": reasons[c]}]}) + "\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(gen(), media_type="text/event-stream")

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    app.state.engine_client = Engine()
    reg = prometheus_client.CollectorRegistry()
    app.add_middleware(SentinelMiddleware, config=ServerConfig(sentinel=str(files["paper+length"]),
                                                               batch_delay_s=0.01),
                       metrics_factory=lambda **kw: SentinelMetrics(registry=reg, **kw))

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://t") as client:
            r = await client.post("/v1/chat/completions", json={"messages": [], "n": 2})
            blocks = [c["sentinel"] for c in r.json()["choices"]]
            r = await client.post("/v1/chat/completions",
                                  json={"messages": [], "n": 2, "stream": True})
            chunks = [json.loads(ln[6:]) for ln in r.text.splitlines()
                      if ln.startswith("data: {")]
            return blocks, [c["choices"][0]["sentinel"] for c in chunks]

    for blocks in asyncio.run(go()):
        assert [b["features"]["truncated"] for b in blocks] == [1.0, 0.0], blocks
        assert [b["features"]["log_n_steps"] for b in blocks] == [math.log(1 + T)] * 2
        assert all(b["p_correct"] == pytest.approx(load_sentinel(files["paper+length"]).p_correct(
            [list(b["features"].values())])[0], abs=1e-12) for b in blocks)
