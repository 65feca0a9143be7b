"""Offline PIQA for lm-eval: joins ``valid.jsonl`` with its separate ``valid-labels.lst``.

lm-eval's own ``piqa`` task reads the Hub dataset ``baber/piqa``, which is unreachable on offline
machines. The original PIQA release keeps the gold labels in a separate ``.lst`` file, one 0/1 per
line, so a plain ``dataset_path: json`` task cannot see them; ``custom_dataset`` (this loader)
joins the two files in memory. The folder comes from, in order: the ``piqa_dir`` task metadata,
``COMPRESSKIT_PIQA_DIR``, ``compresskit.paths.shared_data_dir() / "piqa"``.

lm-eval imports this file by path (``custom_dataset: !function piqa_local.load_piqa`` in
``piqa_local.yaml``), so it is not part of the ``compresskit`` package.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import datasets

from compresskit.errors import EvaluationError

QUESTIONS_FILE = "valid.jsonl"
LABELS_FILE = "valid-labels.lst"


def resolve_piqa_dir(piqa_dir: str | os.PathLike | None = None) -> Path:
    if piqa_dir:
        return Path(piqa_dir).expanduser()
    env = os.environ.get("COMPRESSKIT_PIQA_DIR")
    if env:
        return Path(env).expanduser()
    from compresskit.paths import shared_data_dir

    return shared_data_dir() / "piqa"


def read_piqa(folder: Path) -> list[dict]:
    """Rows ``{"goal", "sol1", "sol2", "label"}`` in file order (label 0 ⇒ sol1 is correct)."""
    questions, labels = folder / QUESTIONS_FILE, folder / LABELS_FILE
    for path in (questions, labels):
        if not path.is_file():
            raise EvaluationError(
                f"PIQA file {path} not found; set COMPRESSKIT_PIQA_DIR to a folder holding "
                f"{QUESTIONS_FILE} and {LABELS_FILE}"
            )
    with questions.open(encoding="utf-8") as fh:
        items = [json.loads(line) for line in fh if line.strip()]
    with labels.open(encoding="utf-8") as fh:
        gold = [line.strip() for line in fh if line.strip()]
    if len(items) != len(gold):
        raise EvaluationError(
            f"PIQA in {folder}: {len(items)} questions but {len(gold)} labels; the files must pair line by line"
        )
    bad = sorted({g for g in gold if g not in ("0", "1")})
    if bad:
        raise EvaluationError(f"PIQA labels in {labels} must be 0 or 1, found {bad[:3]}")
    return [
        {"goal": it["goal"], "sol1": it["sol1"], "sol2": it["sol2"], "label": int(g)}
        for it, g in zip(items, gold, strict=True)
    ]


def load_piqa(piqa_dir: str | None = None, **_task_metadata) -> datasets.DatasetDict:
    """lm-eval ``custom_dataset`` hook: called with the task's metadata and ``dataset_kwargs``."""
    rows = read_piqa(resolve_piqa_dir(piqa_dir))
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)})
