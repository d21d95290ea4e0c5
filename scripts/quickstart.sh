#!/usr/bin/env bash
# Set up and run graphopt's main job on a built-in example: a 2-layer GPT-2
# (transformers config, random weights) is captured, optimized, checked
# against the original, saved to out/ (model.pt2, report.json) and the report
# printed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/graphopt optimize 'hf:gpt2?n_layer=2&n_embd=128&seq=64' -o out/ --force "$@"
