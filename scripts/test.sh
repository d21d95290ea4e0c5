#!/usr/bin/env bash
# Set up and run graphopt's test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -n 2 --durations=15 "$@"
