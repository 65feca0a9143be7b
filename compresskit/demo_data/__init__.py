"""Small public-domain texts shipped with the package: a DEMO, not the papers' protocol.

Used only where asked for by name (``--calib demo``, ``--ppl demo``) or as the last step of the
explicit fallback chain ``auto`` (the quickstart's). See README.md beside this file.
"""

from __future__ import annotations

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent
CALIBRATION_FILE = DEMO_DIR / "sotu_excerpts.jsonl"
PERPLEXITY_FILE = DEMO_DIR / "moby_dick_excerpt.txt"

#: What results record as their source (and what the terminal shows).
CALIBRATION_LABEL = "demo (shipped public-domain sample: State of the Union excerpts, not the papers' protocol)"
PERPLEXITY_LABEL = "demo (shipped public-domain sample: Moby Dick excerpt, not WikiText-2)"
