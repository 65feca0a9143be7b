"""On-disk cache of calibration samples: ``<cache_dir>/calibration/<key>.pt``.

The key covers the spec, the resolved source definition and the tokenizer's identity, so a hit
never needs the source: an offline machine, or a deleted input file, still gets its samples.
Local files are additionally stamped with size and mtime: when the file still exists and has
changed, the entry is stale and rebuilt. Writes are atomic (temporary sibling + ``os.replace``).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from compresskit.paths import cache_dir

#: Texts whose tokenization identifies a tokenizer beyond its name (same name, other vocab).
_PROBE_TEXTS = (
    "Question: What is 12 + 30?\nAnswer: 42",
    "  The quick brown fox, naïve café — 東京 🦊\t\n",
    "pruning LLMs with OWL, Wanda and SparseGPT",
)


def tokenizer_identity(tokenizer) -> str:
    """Name, class, vocabulary size, special ids and a hash of a few tokenizations."""
    probes = [list(tokenizer(text)["input_ids"]) for text in _PROBE_TEXTS]
    digest = hashlib.sha256(repr(probes).encode()).hexdigest()[:16]
    specials = [getattr(tokenizer, n, None) for n in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")]
    name = getattr(tokenizer, "name_or_path", "") or ""
    return f"{type(tokenizer).__name__}|{name}|{len(tokenizer)}|{specials}|{digest}"


def file_stamp(path: str | None) -> list[int] | None:
    """(size, mtime_ns) of a local source file, None if it is absent or not a file source."""
    if not path:
        return None
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def cache_path(key: str) -> Path:
    return cache_dir() / "calibration" / f"{key}.pt"


def read_entry(key: str, stamp: list[int] | None) -> dict[str, Any] | None:
    """The cached entry, or None when absent, unreadable, or stale (its file changed)."""
    path = cache_path(key)
    if not path.is_file():
        return None
    try:
        entry = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a truncated or foreign file is a miss, rebuilt and overwritten
        return None
    if not isinstance(entry, dict) or "input_ids" not in entry:
        return None
    cached_stamp = entry.get("file_stamp")
    if stamp is not None and cached_stamp is not None and list(cached_stamp) != list(stamp):
        return None
    return entry


def write_entry(key: str, entry: dict[str, Any]) -> Path:
    path = cache_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(entry, handle)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
