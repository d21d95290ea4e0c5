#!/usr/bin/env bash
# Create .venv (if missing) and install graphopt with its test dependencies.
# torch is pinned to the CPU build so pip never pulls a multi-GB CUDA build;
# set GRAPHOPT_TORCH to choose another supported version (2.11 - 2.14).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${GRAPHOPT_TORCH:-2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==${TORCH_VERSION}" 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import torch" || { echo "torch ${TORCH_VERSION} failed to install" >&2; exit 1; }
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]" 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import graphopt, transformers, onnxruntime, hypothesis" || { echo "graphopt's dependencies failed to install" >&2; exit 1; }
