#!/usr/bin/env bash
# One-shot GPU check of issue 5, run from anywhere on a CUDA machine: at most
# ~4.5 minutes; needs a CUDA build of torch with triton (python on PATH, or .venv).
# Kernel tests on the GPU (no interpreter), then the kernel benchmark (quick grid
# incl. batch 256/1024, bf16, then the full grid without naive if time allows).
# Prints everything; paste the tables into benchmarks/RESULTS.md "## Kernel (issue 5)".
set -u
cd "$(dirname "$0")/.."
# Use a python whose torch sees CUDA (the repo's .venv may be a CPU build).
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  [ -f .venv/bin/activate ] && source .venv/bin/activate
fi
# kernels/ maps to sentinel_vllm.kernels only through the installed package.
python -c "import sentinel_vllm.kernels" 2>/dev/null || \
  pip install -q --no-deps --no-build-isolation -e . || echo "!! could not install the package"
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
