"""``sentinel-vllm fit`` end to end on the real SmolLM2 with vLLM (small --n): collect, LOBO, train, report."""

import os
import subprocess
import sys

import pytest
from e2e_helpers import MODEL, require_model

require_model()
pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def test_fit_smollm2_end_to_end(tmp_path):
    out = tmp_path / "smol.onnx"
    # multiple choice: a 135M model guesses some right, so every fold has both classes
    cmd = [sys.executable, "-m", "sentinel_vllm", "fit", "--model", str(MODEL), "--out", str(out),
           "--benchmarks", "arc_challenge,mmlu_stem,svamp", "--temperatures", "0,1.0", "--n", "12",
           "--max-tokens", "48", "--compositions", "extremes", "--feature-sets", "paper",
           "--dtype", "float32", "--kv-cache-memory-bytes", "300000000", "--enforce-eager",
           "--batch-size", "36", "--max-model-len", "1024"]
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto")}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    lines = r.stdout.splitlines()
    assert lines[0] == "# sentinel-vllm fit"
    assert "chosen recipe: extremes/paper " in r.stdout
    # three held-out benchmarks at two temperatures = 6 units; one AUROC row per benchmark
    assert any(ln.startswith("| extremes/paper | 6 | ") for ln in lines), r.stdout
    for b in ("arc_challenge", "mmlu_stem", "svamp"):
        assert any(ln.startswith(f"| {b} | ") for ln in lines), r.stdout
    assert "[fit] collect 1/2: temperature 0" in r.stderr and "[fit] collect 2/2" in r.stderr
    work = tmp_path / "smol.fit"
    assert (work / "traces-t0.jsonl.gz").is_file() and (work / "traces-t1.jsonl.gz").is_file()
    assert (work / "report.md").read_text().splitlines() == lines
    from sentinel_vllm.sentinel_file import load_sentinel

    meta = load_sentinel(str(out)).metadata
    assert meta["feature_set"] == "paper" and meta["trained_for_model"] == str(MODEL)
    # rerun: every trace is there, so vLLM does not start and the report is the same
    r2 = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "nothing to collect" in r2.stderr and "Starting" not in r2.stderr
    assert r2.stdout == r.stdout
