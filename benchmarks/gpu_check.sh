#!/usr/bin/env bash
# One-shot GPU check of issue 19 (H200): at most 8 minutes, one table, the same numbers as JSON.
#
# Usage (from anywhere; runs in the repo root):
#     bash benchmarks/gpu_check.sh OUT.json 2>&1 | tee OUT.log
#
# Needs python3 with a CUDA torch, triton and transformers; no vLLM, no network, no
# install: the repo root goes on PYTHONPATH and sentinel_vllm/kernels -> ../kernels is
# created if missing. The driver benchmarks/gpu_check.py runs, each guarded and with its
# own time budget: 1 kernel tests on CUDA without the interpreter (pytest subprocess:
# test_kernels_triton.py, test_kernels_cuda.py and the CUDA test of test_kernels.py),
# 2 kernel bandwidth vs the measured copy bandwidth, 3 host syncs per decode step, 4 a
# random-weight Qwen2-0.5B-shaped decode loop with/without the sentinel, 5 the recorded
# trajectories vs float64. CPU check of the script: python benchmarks/gpu_check.py --dry-run
# --json /tmp/x.json. Paste the table into benchmarks/RESULTS.md "## H200".
set -u
OUT_JSON="$(realpath -m "${1:?usage: bash benchmarks/gpu_check.sh OUT.json}")"
cd "$(dirname "$0")/.."
PY=python3
command -v python3 >/dev/null 2>&1 || PY=python
[ -e sentinel_vllm/kernels ] || ln -s ../kernels sentinel_vllm/kernels
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
echo "== environment"
date -u
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.memory \
  --format=csv,noheader || echo "!! nvidia-smi failed"
"$PY" - <<'PY' || echo "!! environment check failed (the driver still runs; sections may error)"
import sys, torch, triton, transformers
import sentinel_vllm.kernels  # noqa: F401  (through PYTHONPATH and the symlink)
ok = torch.cuda.is_available()
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "triton", triton.__version__, "transformers", transformers.__version__,
      "device", torch.cuda.get_device_name(0) if ok else "NONE")
sys.exit(0 if ok else 1)
PY
echo "== gpu_check.py -> $OUT_JSON"
timeout 470 "$PY" benchmarks/gpu_check.py --json "$OUT_JSON"
rc=$?
[ "$rc" = 124 ] && echo "!! gpu_check.py hit the 470 s timeout; $OUT_JSON holds the sections finished"
echo "== done rc=$rc"
date -u
exit "$rc"
