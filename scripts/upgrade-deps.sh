#!/usr/bin/env bash
# The deliberate upgrade step (never run by CI): install the newest releases that pyproject.toml allows
# into a separate .venv-latest, check compresskit/compat.py's private names against them, and run the
# whole suite there. With --write, and only if everything passed, rewrite requirements/ci.txt from that
# environment; then set compat.CHECKED_WITH to the new versions (tests/test_compat.py insists) and
# commit both together with the suite's result.
#   bash scripts/upgrade-deps.sh [--write] [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
WRITE=0
if [ "${1:-}" = "--write" ]; then WRITE=1; shift; fi
export COMPRESSKIT_VENV=.venv-latest COMPRESSKIT_UNPINNED=1
bash scripts/setup.sh
. .venv-latest/bin/activate
python - <<'PY'
import sys
from compresskit import compat
for lib in sorted({e.library for e in compat.INTERNALS.values()}):
    print(f"{lib:14s} {compat.version(lib):12s} (checked with {compat.CHECKED_WITH.get(lib, '?')})")
bad = compat.problems()
print("\n".join(bad) if bad else "compat: every internal compresskit uses is present")
sys.exit(1 if bad else 0)
PY
python -m pytest -n 2 -q --durations=15 "$@"
if [ "$WRITE" = "1" ]; then
  {
    sed -n '/^#/p' requirements/ci.txt | sed "s/resolved from pyproject.toml's ranges on [0-9-]*/resolved from pyproject.toml's ranges on $(date -u +%Y-%m-%d)/"
    python -m pip freeze --all | grep -v '^-e \|^compresskit\|^# Editable' | sed 's/+cpu$//' | sort -f
  } > requirements/ci.txt.new
  mv requirements/ci.txt.new requirements/ci.txt
  echo "requirements/ci.txt rewritten; now set CHECKED_WITH in compresskit/compat.py"
fi
