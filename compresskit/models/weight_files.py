"""Corrupt weight files become one-line errors naming the file, not library tracebacks.

``check_safetensors_files`` reads only the headers (8-byte length + JSON) of a directory's
``*.safetensors`` and checks that each file is exactly as long as its header says, so truncated,
random-bytes or half-copied shards are caught before transformers loads anything.
``LOAD_ERRORS`` are the exceptions safetensors, torch (unpickling ``pytorch_model.bin``) and
transformers (config sizes that disagree with the weights) raise for bad files;
``describe_load_error`` turns one into the line worth showing.
"""

from __future__ import annotations

import json
import pickle
import re
import struct
from pathlib import Path

from compresskit.errors import CompressKitError

try:  # the Rust extension's error class is not an OSError / ValueError
    from safetensors import SafetensorError
except ImportError:  # pragma: no cover - depends on the installed safetensors
    SafetensorError = OSError  # type: ignore[misc,assignment]

LOAD_ERRORS: tuple[type[BaseException], ...] = (
    OSError, ValueError, KeyError, RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError, struct.error,
)
_MAX_HEADER = 100 << 20


def safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete safetensors file, or None when its header and size agree."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return f"{path.name} is truncated ({size} bytes)"
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, _MAX_HEADER):
                return f"{path.name} is truncated or not a safetensors file (bad header length)"
            header = json.loads(fh.read(n))
    except OSError as exc:
        return f"cannot read {path.name}: {exc.strerror or exc}"
    except (ValueError, UnicodeDecodeError):
        return f"{path.name} is not a safetensors file (unreadable header)"
    if not isinstance(header, dict):
        return f"{path.name} is not a safetensors file (unreadable header)"
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            return f"{path.name} is not a safetensors file (tensor {name!r} has no data offsets)"
        end = max(end, offsets[1])
    if 8 + n + end > size:
        return f"{path.name} is truncated ({size} of {8 + n + end} bytes)"
    if 8 + n + end < size:
        return f"{path.name} is corrupt ({size - 8 - n - end} bytes beyond its last tensor)"
    return None


def check_safetensors_files(directory: str | Path, error_cls: type[CompressKitError], what: str) -> None:
    """Raise ``error_cls`` naming the first damaged ``*.safetensors`` file of ``directory``."""
    directory = Path(directory)
    for f in sorted(directory.glob("*.safetensors")):
        problem = safetensors_problem(f)
        if problem is not None:
            raise error_cls(f"cannot load {what} {directory}: {problem}")


def describe_load_error(exc: BaseException) -> str:
    """The one line of a loading exception worth showing (the size mismatch, not the preamble)."""
    text = str(exc).strip()
    if isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" in text:
        return "a pytorch_model*.bin file cannot be unpickled (corrupt, or not a weights file)"
    if "ignore_mismatched_sizes" in text:
        return "the weights' shapes do not match config.json (sizes disagree)"
    mismatch = re.search(r"size mismatch for ([^:]+): copying a param with shape torch\.Size\((\[[^\]]*\])\) from "
                         r"checkpoint, the shape in current model is torch\.Size\((\[[^\]]*\])\)", text)
    if mismatch:
        name, saved, expected = mismatch.groups()
        return f"{name}: stored tensor has shape {saved}, the model expects {expected}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
