#!/usr/bin/env bash
# Main job (placeholder until the serving layer lands): set up .venv and show the CLI.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"
sentinel-vllm --help
