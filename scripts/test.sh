#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pytest -n 2 -q --durations=15 "$@"
