#!/usr/bin/env bash
# Create .venv (if missing) and install compresskit with its test dependencies.
# torch is pinned to the CPU wheel 2.13.0 here; GPU users install their own CUDA torch first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ] || [ ! -f .venv/bin/activate ]; then
  rm -rf .venv  # absent, or left half-made by an interrupted run
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q torch==2.13.0
fi
python -m pip install -q -e ".[dev]"
