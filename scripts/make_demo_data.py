"""Regenerate compresskit/demo_data/ from the public-domain texts of the shared data folder.

    python scripts/make_demo_data.py [SHARED_DATA_DIR]

Writes sotu_excerpts.jsonl (calibration demo: the opening of eight State of the Union addresses,
at most 16,000 characters each, cut at a paragraph end) and moby_dick_excerpt.txt (perplexity
demo: the first chapters of Moby Dick, about 110,000 characters). Both sources are public domain.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

YEARS = (1790, 1823, 1862, 1901, 1934, 1961, 1983, 2009)
MAX_CHARS = 16_000
PPL_CHARS = 110_000


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    end = text.rfind("\n", 0, limit)
    return text[: end if end > limit // 2 else limit].rstrip()


def main() -> None:
    data = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "shared" / "data"
    out = Path(__file__).resolve().parents[1] / "compresskit" / "demo_data"
    records = [json.loads(line) for line in (data / "corpora" / "sotu.jsonl").read_text(encoding="utf-8").splitlines()]
    chosen = []
    for year in YEARS:
        record = next(r for r in records if int(r["year"]) == year)
        chosen.append({"year": record["year"], "president": record["president"], "text": _cut(record["text"], MAX_CHARS)})
    with open(out / "sotu_excerpts.jsonl", "w", encoding="utf-8") as fh:
        for record in chosen:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    moby = (data / "corpora" / "moby_dick.txt").read_text(encoding="utf-8")
    (out / "moby_dick_excerpt.txt").write_text(_cut(moby, PPL_CHARS) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
