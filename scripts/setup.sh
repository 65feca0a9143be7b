#!/usr/bin/env bash
# Create .venv (if missing) and install compresskit with its test dependencies, at the exact versions
# of requirements/ci.txt (the pinned test environment; CI uses this script). torch is pinned there to
# 2.13.0, which takes the local CPU wheel where one lies on disk; a torch already installed in .venv
# (a GPU user's CUDA build) is kept and left out of the pins.
# COMPRESSKIT_UNPINNED=1 installs the newest releases pyproject.toml allows instead (not for CI; see
# scripts/upgrade-deps.sh for the deliberate upgrade step).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${COMPRESSKIT_VENV:-.venv}
LOCK=requirements/ci.txt
if [ ! -x "$VENV/bin/python" ] || [ ! -f "$VENV/bin/activate" ]; then
  if [ -e "$VENV" ] && [ ! -f "$VENV/pyvenv.cfg" ]; then  # never delete a folder that is not a virtualenv
    echo "error: $VENV exists and is not a virtual environment; move it or set COMPRESSKIT_VENV" >&2
    exit 2
  fi
  rm -rf "$VENV"  # absent, or left half-made by an interrupted run
  "$PY" -m venv "$VENV"
fi
. "$VENV/bin/activate"
if [ "${COMPRESSKIT_UNPINNED:-0}" = "1" ]; then
  python -m pip install -q --upgrade pip
  python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
  python -m pip install -q --upgrade --upgrade-strategy eager -e ".[dev]"
  exit 0
fi
CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
if python -c "import torch" 2>/dev/null; then
  grep -v '^torch==' "$LOCK" > "$CONSTRAINTS"  # keep the torch that is there
else
  cp "$LOCK" "$CONSTRAINTS"
fi
python -m pip install -q -c "$CONSTRAINTS" pip
python -c "import torch" 2>/dev/null || python -m pip install -q -c "$CONSTRAINTS" torch
python -m pip install -q -c "$CONSTRAINTS" -e ".[dev]"
