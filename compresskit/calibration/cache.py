"""On-disk cache of calibration samples: ``<cache_dir>/calibration/<key>.pt``.

The key covers the spec, the resolved source definition and the tokenizer's identity, so a hit
never needs the source: an offline machine, or a deleted input file, still gets its samples.
Local files are additionally stamped with the sha256 of their content (not size and mtime, which
new content can share): when the file still exists and its content changed, the entry is stale and
rebuilt, so the samples and the hash a manifest records always come from the file as it is now.
Writes are atomic (temporary sibling + ``os.replace``).
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


def file_stamp(path: str | None) -> str | None:
    """``"sha256:<hex>"`` of a local source file's content, None if it is absent or not a file source.

    The whole file is hashed on every call (about 1 GB/s): no (size, mtime) memo can tell two
    contents apart when a rewrite keeps both, so none is used.
    """
    if not path:
        return None
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    except OSError:
        return None
    return f"sha256:{digest.hexdigest()}"


def cache_path(key: str) -> Path:
    return cache_dir() / "calibration" / f"{key}.pt"


def read_entry(key: str, stamp: str | None) -> dict[str, Any] | None:
    """The cached entry, or None when absent, unreadable, or stale (its file's content changed, or
    it was stamped by an older compresskit with size and mtime)."""
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
    if stamp is not None and cached_stamp is not None and cached_stamp != stamp:
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
