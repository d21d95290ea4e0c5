#!/usr/bin/env bash
# Set up and run graphopt's test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The viewer's tests drive a real headless Chromium (Debian's package, via Playwright).
if ! command -v chromium >/dev/null 2>&1 && [ -z "${GRAPHOPT_CHROMIUM:-}" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing chromium for the viewer's browser tests" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "warning: no chromium found; the viewer's browser tests will be skipped (install it or set GRAPHOPT_CHROMIUM)" >&2
  fi
fi
exec .venv/bin/python -m pytest -q -n 2 --durations=15 "$@"
