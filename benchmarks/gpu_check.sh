#!/usr/bin/env bash
# One-shot GPU check of issue 5 (run on a CUDA machine from the repository root;
# at most ~4.5 minutes; needs a CUDA build of torch with triton in .venv or on PATH): kernel tests on the GPU (no interpreter), then the kernel
# benchmark (quick grid incl. batch 256/1024, then the full grid if time allows).
# Prints everything; paste the tables into benchmarks/RESULTS.md "## Kernel (issue 5)".
set -u
cd "$(dirname "$0")/.."
[ -f .venv/bin/activate ] && source .venv/bin/activate
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1
echo "== environment"; date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python - <<'PY'
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
PY
echo "== kernel tests on CUDA"
timeout 120 python -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_kernels_triton.py 2>&1 | tail -25
echo "== benchmark, quick grid (fp32 then bf16)"
timeout 50 python benchmarks/bench_kernel.py --quick
timeout 30 python benchmarks/bench_kernel.py --quick --dtype bfloat16 --no-naive
echo "== benchmark, full grid (fp32, no naive)"
timeout 60 python benchmarks/bench_kernel.py --no-naive
echo "== done"; date -u
