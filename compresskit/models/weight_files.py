"""Corrupt weight files become one-line errors naming the file, not library tracebacks.

``check_safetensors_files`` reads only the headers (8-byte length + JSON) of a directory's
``*.safetensors`` and checks that each file is exactly as long as its header says, so truncated,
random-bytes or half-copied shards are caught before transformers loads anything, and that the
shard index (``model.safetensors.index.json``) names only shards that exist and that hold the
tensors it places in them — the same check for the lazy and the in-memory loader.
``LOAD_ERRORS`` are the exceptions safetensors, torch (unpickling ``pytorch_model.bin``) and
transformers (config sizes that disagree with the weights) raise for bad files;
``describe_load_error`` turns one into the line worth showing. ``refuse_missing_weights`` is the
one check that every loader (in memory, lazy, checkpoint) runs on the keys it found missing:
a missing tensor is an error naming it, never a random initialisation. The format's dtype names
(``safetensors_dtypes``: the header field ``dtype``) are here too: the lazy loader reads them, the
checkpoint writer writes them.
"""

from __future__ import annotations

import json
import pickle
import re
import struct
from collections.abc import Iterable
from functools import lru_cache
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
INDEX_FILE = "model.safetensors.index.json"
MANIFEST_FILE = "compresskit.json"  # checkpoint.manifest.MANIFEST_NAME (models/ does not import checkpoint/)


def safetensors_header(path: Path) -> tuple[dict | None, str | None]:
    """``(header, None)`` for a complete safetensors file (tensor name -> dtype / shape / offsets), or
    ``(None, why not)`` when its header and size disagree."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return None, f"{path.name} is truncated ({size} bytes)"
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, _MAX_HEADER):
                return None, f"{path.name} is truncated or not a safetensors file (bad header length)"
            header = json.loads(fh.read(n))
    except OSError as exc:
        return None, f"cannot read {path.name}: {exc.strerror or exc}"
    except (ValueError, UnicodeDecodeError):
        return None, f"{path.name} is not a safetensors file (unreadable header)"
    if not isinstance(header, dict):
        return None, f"{path.name} is not a safetensors file (unreadable header)"
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            return None, f"{path.name} is not a safetensors file (tensor {name!r} has no data offsets)"
        end = max(end, offsets[1])
    if 8 + n + end > size:
        return None, f"{path.name} is truncated ({size} of {8 + n + end} bytes)"
    if 8 + n + end < size:
        return None, f"{path.name} is corrupt ({size - 8 - n - end} bytes beyond its last tensor)"
    return header, None


def safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete safetensors file, or None when its header and size agree."""
    return safetensors_header(path)[1]


def shard_index_problem(directory: Path, headers: dict[str, dict]) -> str | None:
    """Why ``model.safetensors.index.json`` does not describe the shards beside it (unreadable, a shard
    it names is missing, a tensor it places in a shard that does not hold it), or None.
    ``headers``: file name -> safetensors header of the directory's shards."""
    index = directory / INDEX_FILE
    if not index.is_file():
        return None
    try:
        weight_map = json.loads(index.read_bytes().decode("utf-8")).get("weight_map")
    except (OSError, ValueError, UnicodeDecodeError, AttributeError):
        return f"{INDEX_FILE} is not a readable shard index (JSON with a weight_map)"
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        return f"{INDEX_FILE} is not a readable shard index (JSON with a weight_map)"
    for key, name in weight_map.items():
        if name not in headers:
            return f"{INDEX_FILE} names shard {name} (for {key}), which is missing"
        if key not in headers[name]:
            return f"{INDEX_FILE} places tensor {key} in {name}, which does not hold it"
    return None


def check_safetensors_files(directory: str | Path, error_cls: type[CompressKitError], what: str) -> None:
    """Raise ``error_cls`` naming the first damaged ``*.safetensors`` file of ``directory``, or the
    first disagreement between its shard index and the shards."""
    directory = Path(directory)
    headers: dict[str, dict] = {}
    for f in sorted(directory.glob("*.safetensors")):
        header, problem = safetensors_header(f)
        if problem is not None:
            raise error_cls(f"cannot load {what} {directory}: {problem}")
        headers[f.name] = header
    problem = shard_index_problem(directory, headers)
    if problem is not None:
        raise error_cls(f"cannot load {what} {directory}: {problem}")


def _block_index(key: str) -> int | None:
    found = re.search(r"(?:^|\.)layers\.(\d+)\.", key)
    return int(found.group(1)) if found else None


def _recorded_skips(config) -> dict[int, list[str]]:
    """Block index -> sublayers the config records as removed (transformers' ``per_layer_config``)."""
    if config is None:
        return {}
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    per_layer = data.get("per_layer_config") or (data.get("text_config") or {}).get("per_layer_config") or {}
    skips: dict[int, list[str]] = {}
    if isinstance(per_layer, dict):
        for index, entry in per_layer.items():
            kinds = entry.get("skip") if isinstance(entry, dict) else None
            if str(index).isdigit() and isinstance(kinds, list) and kinds:
                skips[int(index)] = [str(k) for k in kinds]
    return skips


def refuse_missing_weights(missing: Iterable[str], source: str | Path, error_cls: type[CompressKitError],
                           what: str = "model", config=None) -> None:
    """Raise ``error_cls`` naming the first tensor the weight files lack (``missing``: the model's keys
    that no stored tensor filled, tied weights already taken out). transformers would initialise
    it randomly, and the random weights would then be compressed and saved as if they were real.
    When ``config`` records that block's sublayers as removed (``per_layer_config``, a FinerCut
    checkpoint) the line says the manifest that rebuilds them is missing."""
    missing = sorted(missing, key=lambda k: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", k)])
    if not missing:
        return
    first = missing[0]
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    block = _block_index(first)
    skipped = _recorded_skips(config).get(block) if block is not None else None
    if skipped:
        raise error_cls(
            f"cannot load {what} {source}: tensor {first} is missing{more}; config.json records block {block}'s "
            f"{' and '.join(skipped)} as removed (per_layer_config), but {MANIFEST_FILE} that rebuilds the removal is "
            "missing: restore the checkpoint's manifest")
    raise error_cls(f"cannot load {what} {source}: tensor {first} is missing from its weight files{more}; "
                    "refusing to initialise it randomly")


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


# ----------------------------------------------------------------------------- the format's dtype names
@lru_cache(maxsize=1)
def safetensors_dtypes() -> dict:
    """safetensors' dtype names (the file format's header field ``dtype``) → torch dtypes."""
    import torch  # not at module level: the CLI imports this module before any command runs

    return {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
        "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
        "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "C64": torch.complex64,
    }


def safetensors_dtype(name: str):
    try:
        return safetensors_dtypes()[name]
    except KeyError:
        raise ValueError(f"safetensors dtype {name!r} is not supported by compresskit") from None


def safetensors_dtype_name(dtype) -> str:
    for name, value in safetensors_dtypes().items():
        if value == dtype:
            return name
    raise ValueError(f"dtype {dtype} cannot be written to safetensors")
