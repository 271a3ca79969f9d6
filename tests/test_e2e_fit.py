"""``sentinel-vllm fit`` end to end on the real SmolLM2 with vLLM (small --n): collect, LOBO,
train, report."""

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
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-4000:]
    work = tmp_path / "smol.fit"
    lines = (work / "report.md").read_text().splitlines()
    assert "\n".join(lines) in r.stdout  # (vLLM logs to stdout too)
    assert lines[0] == "# sentinel-vllm fit"
    assert "chosen recipe: extremes/paper " in r.stdout
    # three held-out benchmarks at two temperatures = 6 units; one AUROC row per benchmark
    assert any(ln.startswith("| extremes/paper | 6 | ") for ln in lines), lines
    for b in ("arc_challenge", "mmlu_stem", "svamp"):
        assert any(ln.startswith(f"| {b} | ") for ln in lines), lines
    assert any(ln.startswith("band: estimate +- (") for ln in lines), lines
    assert "[fit] collect 1/2: temperature 0" in r.stderr and "[fit] collect 2/2" in r.stderr
    assert (work / "traces-t0.jsonl.gz").is_file() and (work / "traces-t1.jsonl.gz").is_file()
    from sentinel_vllm.sentinel_file import load_sentinel

    meta = load_sentinel(str(out)).metadata
    assert meta["feature_set"] == "paper" and meta["trained_for_model"] == str(MODEL)
    # rerun: every trace is there, so vLLM does not start and the report is the same
    r2 = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "nothing to collect" in r2.stderr and "Starting" not in r2.stderr
    assert r2.stdout.splitlines() == lines
