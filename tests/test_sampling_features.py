"""Sampling-aware features: the ``sampling`` (temperature, top_p) and ``drawn`` groups.

Hand-computed values on tiny traces, the one row definition shared by traces and
worker-style samples, the worker's report of each request's own ``SamplingParams``,
and a sentinel declaring the new features scored by ``score`` and the serving scorer.
"""

import math
from types import SimpleNamespace

import numpy as np
import pytest
from synthetic import make_traces

from sentinel_vllm.cli import main
from sentinel_vllm.feature_sets import (
    DRAWN_SERIES,
    FeatureInputError,
    drawn_steps,
    feature_names,
    feature_set_matrix,
    make_spec,
    sampling_features,
    trace_drawn,
    trace_row,
)
from sentinel_vllm.features import compute_features_batch
from sentinel_vllm.sentinel_file import load_sentinel
from sentinel_vllm.serving.api.scoring import SentinelScorer
from sentinel_vllm.serving.worker.tracker import SlotTracker, sampling_of
from sentinel_vllm.traces import MissingSeriesError, Trace, read_traces, write_traces


def _h1(lp):
    """``-p ln p`` of a logprob: the ``top1`` value of a step whose drawn token is the argmax."""
    return -math.exp(lp) * lp


# drawn logprobs; steps 0 and 2 drew the argmax, step 1 did not; step 3 (the last) is never seen
LP = [-0.1, -2.0, -0.5, -0.05]
TOP1 = [_h1(-0.1), 0.3, _h1(-0.5), 0.2]
FULL = [0.4, 1.2, 0.8, 0.1]


def _trace(gen=None, extra=None, top1=TOP1, lp=LP):
    ex = {"finish_reason": "stop", "token_logprob": list(lp)}
    if gen is not None:
        ex["generation"] = gen
    ex.update(extra or {})
    return Trace("q/0", "q", True, {"full": FULL, "top1": list(top1)}, 20, ex)


def test_drawn_features_by_hand():
    row = dict(zip(feature_names("paper+length+drawn"),
                   feature_set_matrix([_trace()], "paper+length+drawn")[0]))
    # steps 0..2: nll = 0.1, 2.0, 0.5; off = 0, 1, 0
    assert row["drawn_nll_mean"] == pytest.approx(2.6 / 3, abs=1e-12)
    assert row["drawn_nll_q90"] == pytest.approx(0.5 + 0.8 * 1.5, abs=1e-12)  # h = 2 * 0.9
    assert row["drawn_nll_max"] == pytest.approx(2.0, abs=1e-12)
    assert row["off_argmax"] == pytest.approx(1 / 3, abs=1e-12)
    # the k-th logprob bounds a drawn token outside the top k: step 1 reads -1.5
    bounded = _trace(extra={"topk_logprob": [-3.0, -1.5, -3.0, -3.0]})
    b = dict(zip(feature_names("paper+length+drawn"),
                 feature_set_matrix([bounded], "paper+length+drawn")[0]))
    assert b["drawn_nll_max"] == pytest.approx(1.5) and b["drawn_nll_mean"] == pytest.approx(0.7)
    nll, _ = drawn_steps(LP, [True] * 4, [None, -1.5, float("nan"), None])  # no bound: as is
    np.testing.assert_allclose(nll, [0.1, 1.5, 0.5], rtol=0, atol=1e-15)
    # one step: nothing observed -> zeros; none at all -> zeros
    one = Trace("q/1", "q", True, {"full": [0.3], "top1": [0.1]}, 20,
                {"finish_reason": "stop", "token_logprob": [-0.2]})
    np.testing.assert_array_equal(feature_set_matrix([one], "paper+length+drawn")[0, -4:], 0.0)


def test_argmax_flag_tolerance_and_missing_inputs():
    # a drawn token 1e-3 away from the argmax value is off the argmax; 1e-6 away is on it
    lp = [-0.3, -0.3, -0.3]
    nll, off = drawn_steps(lp, [True, False, True])
    np.testing.assert_array_equal(nll, [0.3, 0.3]) and np.testing.assert_array_equal(off, [0, 1])
    t = _trace(top1=[_h1(-0.3) + 1e-6, _h1(-0.3) + 1e-3, 0.0], lp=lp)
    assert trace_drawn(t)[DRAWN_SERIES[1]][0] == pytest.approx(0.5)  # mean of off = [0, 1]
    with pytest.raises(MissingSeriesError, match="token_logprob or the top1"):
        trace_drawn(Trace("q/2", "q", True, {"full": FULL}, 20, {"token_logprob": LP}))
    with pytest.raises(MissingSeriesError, match="top1 has 3"):
        trace_drawn(_trace(top1=TOP1[:3]))
    with pytest.raises(FeatureInputError, match="not finite"):
        drawn_steps([-0.1, float("nan")], [True, True])


def test_sampling_features_and_trace_settings():
    np.testing.assert_array_equal(sampling_features(0.7, 0.95), [0.7, 0.95])
    np.testing.assert_array_equal(sampling_features(None, None), [0.0, 1.0])
    np.testing.assert_array_equal(sampling_features(1e-6, 1.0), [0.0, 1.0])  # vLLM's greedy
    for bad in ((-0.1, 1.0), (float("inf"), 1.0), (0.5, 0.0), (0.5, 1.5)):
        with pytest.raises(FeatureInputError):
            sampling_features(*bad)
    name = "paper+length+temperature"
    assert feature_names(name)[-2:] == ("temperature", "top_p")
    row = trace_row(_trace({"temperature": 0.5}), name)
    np.testing.assert_array_equal(row[-2:], [0.5, 1.0])
    top = trace_row(_trace({"temperature": 0.5}, {"temperature": 1.0, "top_p": 0.9}), name)
    np.testing.assert_array_equal(top[-2:], [1.0, 0.9])  # top-level keys first
    with pytest.raises(MissingSeriesError, match="top_p must lie"):
        trace_row(_trace({"temperature": 0.5, "top_p": 2.0}), name)


def _worker_sample(trajs: dict, sampling=None):
    """A fetch answer as kernels/slot_state.py ``gather`` computes it (zero-padded rows)."""
    feats = {}
    for name, x in trajs.items():
        n = len(x)
        pad = np.zeros((1, max(n, 1)))
        pad[0, :n] = x
        feats[name] = [float(v) for v in compute_features_batch(pad, np.array([n]))[0]]
    s = {"child": 0, "n_steps": len(trajs["full"]), "nan_steps": 0, "truncated": False,
         "features": feats}
    if sampling is not None:
        s["sampling"] = sampling
    return s


def _sampled_traces(n=20, seed=3):
    """Synthetic traces with temperature, token_logprob and top1 (drawn = argmax at T = 0)."""
    recs = make_traces(n, seed=seed)
    rng = np.random.default_rng(seed)
    for i, r in enumerate(recs):
        T = len(r["entropy"]["full"])
        temp = [0.0, 0.5, 1.0][i % 3]
        lp = -rng.exponential(0.1 + 0.4 * temp + 0.3 * (not r["correct"]), size=T)
        lp1 = np.minimum(lp + rng.exponential(0.5, size=T) * (rng.random(T) < temp / 3), 0.0)
        r["token_logprob"] = lp.round(7).tolist()
        r["entropy"]["top1"] = (-np.exp(lp1) * lp1).round(7).tolist()
        r["generation"] = {"temperature": temp}
    return recs


@pytest.mark.parametrize("name", ["paper+length+temperature", "paper+length+drawn",
                                  "paper+length+sampling"])
def test_trace_rows_equal_worker_rows(name):
    traces = [Trace(r["id"], r["slice"], r["correct"], r["entropy"], r["k"],
                    {k: r[k] for k in ("finish_reason", "token_logprob", "generation")})
              for r in _sampled_traces()]
    X = feature_set_matrix(traces, name)
    spec = make_spec(name, "full")
    assert spec.needed_series == (("full", *DRAWN_SERIES) if "drawn" in spec.groups else ("full",))
    for t, x in zip(traces, X):
        trajs = {"full": t.series("full")}
        if "drawn" in spec.groups:
            lp = np.asarray(t.extra["token_logprob"])
            nll, off = drawn_steps(lp, np.abs(-np.exp(lp) * lp - t.series("top1")) < 1e-4)
            trajs.update(drawn_nll=nll, off_argmax=off)
        s = _worker_sample(trajs, {"temperature": t.extra["generation"]["temperature"],
                                   "top_p": 1.0})
        got = spec.row(s["features"], s["n_steps"], False, sampling=(
            s["sampling"]["temperature"], s["sampling"]["top_p"]))
        np.testing.assert_allclose(got, x, rtol=0, atol=1e-12)


def test_worker_reports_each_requests_sampling_params():
    """The tracker keeps the request's own SamplingParams values and returns them in fetch."""
    class _State:  # records nothing: the sampling block does not depend on the device state
        device = "cpu"

        def __init__(self, num_slots, max_steps, series, device, backend):
            self.series = series

        def reset(self, slots):
            pass

        def gather(self, slots):
            n = len(slots)
            return SimpleNamespace(n_steps=np.full(n, 3), nan_steps=np.zeros(n),
                                   truncated=np.zeros(n, bool),
                                   features={s: np.zeros((n, 11)) for s in self.series})

    tr = SlotTracker(4, 16, ("full",), state_factory=_State)
    hot = SimpleNamespace(temperature=0.7, top_p=0.8)  # e.g. a generation_config default
    greedy = SimpleNamespace(temperature=0.0, top_p=1.0)
    tr.acquire("a", 0, params=hot)
    tr.acquire("b", 0, params=greedy)
    tr.acquire("c", 0)  # no params seen: no sampling block
    out = tr.fetch(["a", "b", "c"])
    assert out["a"][0]["sampling"] == {"temperature": 0.7, "top_p": 0.8}
    assert out["b"][0]["sampling"] == {"temperature": 0.0, "top_p": 1.0}
    assert "sampling" not in out["c"][0]
    assert sampling_of(None) is None
    assert sampling_of(SimpleNamespace(temperature=1, top_p=None)) == {"temperature": 1.0,
                                                                       "top_p": None}


@pytest.fixture(scope="module")
def sampled_sentinel(tmp_path_factory):
    d = tmp_path_factory.mktemp("samp")
    write_traces(d / "t.jsonl", _sampled_traces(30, seed=5))
    out = d / "temp.onnx"
    assert main(["train", str(d / "t.jsonl"), "--feature-set", "paper+length+temperature",
                 "--out", str(out)]) == 0
    return d / "t.jsonl", out


def test_temperature_sentinel_scores_in_score_and_serving(sampled_sentinel, tmp_path):
    trace_file, path = sampled_sentinel
    sent = load_sentinel(path)
    assert sent.metadata["feature_set"] == "paper+length+temperature"
    traces = read_traces(trace_file)
    want = sent.p_correct(feature_set_matrix(traces, "paper+length+temperature"))
    out = tmp_path / "s.csv"
    assert main(["score", str(path), str(trace_file), "--out", str(out)]) == 0
    got = [float(line.split(",")[-1]) for line in out.read_text().splitlines()[1:]]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    sc = SentinelScorer(sent, vocab_size=100)
    samples = [_worker_sample({"full": t.series("full")},
                              {"temperature": t.extra["generation"]["temperature"], "top_p": None})
               for t in traces]
    res = sc.score(samples, ["s"] * len(traces), [t.extra["finish_reason"] for t in traces])
    for o, w in zip(res, want):
        assert o.reason is None, o.block
        assert o.block["p_correct"] == pytest.approx(w, abs=1e-12)
    assert res[1].block["features"]["temperature"] == 0.5 and res[1].block["features"]["top_p"] == 1
    # no sampling block (a worker that did not see the params) or a malformed one: error blocks
    bare = dict(samples[0])
    del bare["sampling"]
    bad = dict(samples[0], sampling={"temperature": "hot"})
    neg = dict(samples[0], sampling={"temperature": -1.0, "top_p": 1.0})
    r = sc.score([bare, bad, neg], ["s"] * 3, ["stop"] * 3)
    assert [x.reason for x in r] == ["missing_series"] * 3
    assert "temperature and top_p" in r[0].block["error"]
    assert "malformed 'sampling'" in r[1].block["error"]
    assert "temperature must be" in r[2].block["error"]


def test_proxy_scores_sampling_and_drawn_from_top_logprobs(tmp_path):
    """The black-box path: top-20 entropy, the drawn token's own logprob from the response,
    the request's temperature; the same row as the trace definition gives by hand."""
    from openai_fixtures import chat_response, choice_steps

    from sentinel_vllm.blackbox.client import TopLogprobsScorer, request_sampling, trajectories

    write_traces(tmp_path / "t.jsonl", _sampled_traces(30, seed=6))
    path = tmp_path / "s.onnx"
    assert main(["train", str(tmp_path / "t.jsonl"), "--entropy", "topk", "--feature-set",
                 "paper+length+sampling", "--out", str(path)]) == 0
    sc = TopLogprobsScorer(path)
    steps = choice_steps(3, 7, 20)
    resp = chat_response([steps])
    content = resp["choices"][0]["logprobs"]["content"]
    for t in (1, 4):  # two steps drew the third-largest alternative
        content[t]["logprob"] = content[t]["top_logprobs"][2]["logprob"]
    body = {"temperature": 0.7, "messages": []}
    assert request_sampling(body) == {"temperature": 0.7, "top_p": None}
    assert request_sampling({"messages": []}) is None
    block = sc.blocks(resp, "s", request_sampling(body))[0]
    lp = [float(s[2] if t in (1, 4) else s[0]) for t, s in enumerate(steps)]
    nll = -np.array(lp[:-1])
    x = np.concatenate([
        compute_features_batch(trajectories(resp)[0].entropy[None], [7])[0],
        [math.log(8), 0.0, 0.7, 1.0],
        [nll.mean(), np.quantile(nll, 0.9), nll.max(), 2 / 6],
    ])
    got = np.array(list(block["features"].values()))
    np.testing.assert_allclose(got, x, rtol=0, atol=1e-12)
    assert block["p_correct"] == pytest.approx(load_sentinel(path).p_correct(x[None])[0],
                                               abs=1e-12)
    # a request that did not set its temperature: an error block, not a guess
    bad = sc.blocks(resp, "s")[0]
    assert bad["reason"] == "missing_series" and "temperature" in bad["error"]
