"""ONNX scoring in the API process (sentinel_vllm.serving.api.scoring) against scikit-learn."""

import numpy as np
import pytest
from serving_helpers import make_tiny_sentinel, reference_p

from sentinel_vllm.features import FEATURE_NAMES, compute_features
from sentinel_vllm.serving.api.scoring import SentinelScorer, resolve_sentinel_path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("sent") / "s.onnx"
    parts = make_tiny_sentinel(path)
    return path, parts


def _sample(traj, series="full", child=0):
    return {"child": child, "n_steps": len(traj), "nan_steps": 0, "truncated": False,
            "features": {series: compute_features(traj).tolist()}}


def test_blocks_match_sklearn_and_features(tiny):
    path, parts = tiny
    sc = SentinelScorer.from_path(path, vocab_size=49152)
    assert sc.id == parts[0] and sc.series == "full" and sc.k_reported == 49152
    rng = np.random.default_rng(3)
    trajs = [rng.gamma(2.0, 0.5, size=t) for t in (1, 7, 30)]
    out = sc.score([_sample(t) for t in trajs], ["a", "b", "a"])
    X = np.stack([compute_features(t) for t in trajs])
    want = reference_p(parts, X)
    for o, t, w, x, sl in zip(out, trajs, want, X, ["a", "b", "a"]):
        assert o.reason is None
        b = o.block
        assert b["p_correct"] == pytest.approx(w, abs=1e-12)
        assert list(b["features"]) == list(FEATURE_NAMES)
        np.testing.assert_allclose(list(b["features"].values()), x, rtol=0, atol=0)
        assert (b["entropy"], b["k"], b["n_steps"], b["model"], b["slice"]) == (
            "full", 49152, len(t), parts[0], sl)
        assert o.mean_entropy == pytest.approx(t.mean())


def test_topk_sentinel_reads_its_series(tmp_path):
    path = tmp_path / "t.onnx"
    parts = make_tiny_sentinel(path, entropy="topk", k=20)
    sc = SentinelScorer.from_path(path, vocab_size=49152)
    assert sc.series == "top20" and sc.k_reported == 20
    full, top = [3.0, 2.0, 4.0], [0.1, 0.2, 0.1]
    s = {"child": 0, "n_steps": 3, "features": {"full": compute_features(full).tolist(),
                                                "top20": compute_features(top).tolist()}}
    (o,) = sc.score([s], ["default"])
    assert o.block["entropy"] == "topk"
    assert o.block["p_correct"] == pytest.approx(reference_p(parts, [compute_features(top)])[0])
    assert o.block["features"]["mean"] == pytest.approx(np.mean(top))


def test_per_sample_errors_do_not_spoil_the_batch(tiny):
    path, parts = tiny
    sc = SentinelScorer.from_path(path)
    good = _sample([0.5, 1.5])
    nan = _sample([0.5])
    nan["features"]["full"][0] = float("nan")
    wrong = {"child": 0, "n_steps": 2, "features": {"top20": [0.0] * 11}}
    out = sc.score([None, good, nan, wrong], ["s"] * 4)
    assert [o.reason for o in out] == ["fetch_timeout", None, "nonfinite", "missing_series"]
    assert "top20" in out[3].block["error"] and out[3].block["slice"] == "s"
    assert out[1].block["p_correct"] == pytest.approx(
        reference_p(parts, [compute_features([0.5, 1.5])])[0])


def test_malformed_samples_never_raise(tiny):
    path, parts = tiny
    sc = SentinelScorer.from_path(path)
    good = _sample([0.5, 1.5])
    bad = [
        ["not", "a", "dict"],                                     # sample not a dict
        {"child": 0, "n_steps": 2, "features": [0.0] * 11},       # features not a dict
        {"child": 0, "n_steps": 2, "features": {"full": 3.0}},    # series not a list
        {"child": 0, "n_steps": 2, "features": {"full": ["x"] * 11}},  # not numbers
        {**good, "n_steps": "two"},                               # n_steps a string
        {**good, "nan_steps": [1]},                               # nan_steps not an int
        {**good, "n_steps": -3},                                  # negative length
    ]
    out = sc.score([good, *bad, good], ["s"] * (len(bad) + 2))
    assert [o.reason for o in out] == [None] + ["internal"] * len(bad) + [None]
    for o in out[1:-1]:
        assert o.block["slice"] == "s" and "malformed sample from the worker" in o.block["error"]
        assert o.p_correct is None
    ref = reference_p(parts, [compute_features([0.5, 1.5])])[0]
    assert out[0].p_correct == pytest.approx(ref) and out[-1].p_correct == pytest.approx(ref)
    assert out[0].block["n_steps"] == 2


def test_session_failure_marks_every_sample(tiny):
    class Broken:
        id, metadata = "sentinel-broken", {"entropy": "full", "k": None}

        def p_correct(self, X):
            raise RuntimeError("onnxruntime exploded")

    out = SentinelScorer(Broken()).score([_sample([1.0]), _sample([2.0])], ["a", "b"])
    assert [o.reason for o in out] == ["scoring", "scoring"]
    assert "onnxruntime exploded" in out[0].block["error"]


def test_bad_files_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="no such sentinel file"):
        SentinelScorer.from_path(tmp_path / "nope.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not onnx")
    with pytest.raises(ValueError, match="not an ONNX"):
        SentinelScorer.from_path(bad)
    pk = tmp_path / "model.pkl"
    pk.write_bytes(b"\x80\x04\x95")
    with pytest.raises(ValueError, match="never loads pickles"):
        SentinelScorer.from_path(pk)


def test_default_sentinel_errors_clearly_until_bundled():
    from sentinel_vllm.serving.api import scoring

    if scoring.DEFAULT_SENTINEL.is_file():
        assert resolve_sentinel_path("default") == scoring.DEFAULT_SENTINEL
    else:
        with pytest.raises(ValueError, match="no default sentinel is bundled"):
            resolve_sentinel_path("default")


class _FakeEngine:
    def __init__(self, answer):
        self.answer = answer

    def collective_rpc(self, name, args=()):
        if isinstance(self.answer, Exception):
            raise self.answer
        return [self.answer]


class _Out:
    def __init__(self, n):
        self.outputs = [type("Comp", (), {"index": i, "sentinel": None})() for i in range(n)]


@pytest.mark.parametrize("answer", [
    {"id-0": [{"child": "zero", "features": {}}]},   # child not a number
    {"id-0": "not a list"},                            # samples not a list of dicts
    {"id-0": [{"child": 0, "n_steps": "2", "features": {"full": [0.0] * 11}}]},
    RuntimeError("worker gone"),                       # the RPC itself fails
])
def test_offline_attach_never_raises(tiny, answer):
    from sentinel_vllm.serving.api.offline import LLM

    llm = object.__new__(LLM)  # the wrapper without starting vLLM
    llm.scorer = SentinelScorer.from_path(tiny[0])
    llm.llm = _FakeEngine(answer)
    outs = [_Out(2)]
    llm._attach(outs, ["id-0"], "s")
    blocks = [c.sentinel for c in outs[0].outputs]
    assert all("error" in b and b["slice"] == "s" for b in blocks), blocks


def test_all_nonfinite_steps_is_an_error_not_a_score(tiny):
    """A response whose every step had NaN/inf logits has zero statistics: no p_correct."""
    path, parts = tiny
    sc = SentinelScorer.from_path(path)
    all_bad = {"child": 0, "n_steps": 0, "nan_steps": 8, "truncated": False,
               "features": {"full": [0.0] * 11}}
    some_bad = {**_sample([0.5, 1.5, 0.7]), "nan_steps": 1}  # n_steps counts finite steps
    out = sc.score([all_bad, some_bad], ["s", "s"])
    assert out[0].reason == "nonfinite" and "all 8 decode steps" in out[0].block["error"]
    assert out[1].reason is None and out[1].block["nan_steps"] == 1
    assert out[1].block["p_correct"] == pytest.approx(
        reference_p(parts, [compute_features([0.5, 1.5, 0.7])])[0], abs=1e-12)
