#!/usr/bin/env bash
# Set up (scripts/setup.sh: the pinned environment of requirements/ci.txt) and run the whole test
# suite on CPU. Prints the setup time, then pytest's 15 slowest tests and its own total.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
bash scripts/setup.sh
echo "setup: $((SECONDS - start)) s"
. .venv/bin/activate
python -m pytest -n 2 -q --durations=15 "$@"
