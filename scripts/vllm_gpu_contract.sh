#!/usr/bin/env bash
# Runner contract against the real vLLM GPU build, on a machine without a GPU.
#
# Makes .venv-vllm033 (git-ignored; SENTINEL_CONTRACT_VENV overrides the path) with the
# vLLM GPU wheel installed --no-deps (vLLM >= 0.33: Model Runner V2 is its default), CPU
# torch and the few pure-python packages that importing vLLM's config, runner-selection and
# logits-processor loader modules needs; then runs tests/test_vllm_gpu_contract.py there:
# for VLLM_USE_V2_MODEL_RUNNER unset/0/1 and features that force a runner, vLLM's own
# VllmConfig.use_v2_model_runner decides, and that runner's loader and the frontend
# validator must accept the class path sentinel-vllm hands vLLM.
# Usage: bash scripts/vllm_gpu_contract.sh [extra pytest args]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SENTINEL_CONTRACT_VENV:-$ROOT/.venv-vllm033}"
VLLM_SPEC="${SENTINEL_CONTRACT_VLLM:-vllm>=0.33,<0.34}"
TORCH_WHEEL="${SENTINEL_TORCH_WHEEL:-$(ls /opt/wheels/torch-2.13.0+cpu-*.whl 2>/dev/null | head -1 || true)}"
PY="${PYTHON:-python3}"
STAMP="$VENV/.contract-stamp"
WANT="$(echo "$VLLM_SPEC" | sha256sum | cut -c1-16)"

if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]; then
  echo "[contract] creating $VENV ($VLLM_SPEC, --no-deps; about 340 MB download)" >&2
  "$PY" -m venv "$VENV"
  PIP=("$VENV/bin/python" -m pip install -q)
  "${PIP[@]}" --upgrade pip
  # CPU torch (the local file when there is one); the vLLM wheel's own torch pin is ignored
  "${PIP[@]}" "${TORCH_WHEEL:-torch==2.13.0}" --index-url "${SENTINEL_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}" \
    --extra-index-url https://pypi.org/simple 2>/dev/null || "${PIP[@]}" "${TORCH_WHEEL:-torch==2.13.0}"
  "${PIP[@]}" --no-deps "$VLLM_SPEC"
  # what `import vllm.config`, the V1 and MRV2 processor loaders and SamplingParams need
  "${PIP[@]}" -c <(echo "torch==$("$VENV/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])')") \
    packaging pydantic msgspec cloudpickle psutil pyzmq regex pyyaml requests tqdm numpy cachetools \
    blake3 prometheus_client typing_extensions einops "transformers>=5.16.1,<5.21" pillow cbor2 \
    aiohttp openai openai_harmony pybase64 uvloop py-cpuinfo "xgrammar==0.2.8" fastapi \
    partial_json_parser llguidance pytest
  echo "$WANT" > "$STAMP"
fi
cd "$ROOT"
"$VENV/bin/python" -c 'import vllm; print("[contract] vllm", vllm.__version__, "from", vllm.__file__)'
env -u VLLM_USE_V2_MODEL_RUNNER PYTHONPATH="$ROOT" \
  "$VENV/bin/python" -m pytest -q -rA -p no:cacheprovider -m vllm_gpu_contract tests/test_vllm_gpu_contract.py "$@"
