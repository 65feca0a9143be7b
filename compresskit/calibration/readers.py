"""Read a source's records: local files (txt / jsonl / json / parquet) or the Hugging Face Hub.

A ``.txt`` file is ONE document (the whole file). Pre-training calibration draws windows of
``seqlen`` tokens from documents longer than ``seqlen``; splitting a book on blank lines would
give paragraphs far shorter than 2048 tokens. One document per file is also the reference's
WikiText-2 calibration protocol (the whole train split joined into one token stream).

The hub is contacted only when it looks reachable: ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``
are honoured, then one TCP connect of at most 3 s (cached per process), so an offline machine
gets a one-line error at once instead of ``datasets``' retries.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from compresskit.calibration.registry import SourceDefinition
from compresskit.errors import CalibrationError
from compresskit.hub import hub_reachable

FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
#: ``datasets`` builders that read local ``data_files`` and need no hub (``dataset: json`` in a YAML).
LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow")


def read_file_records(path_text: str) -> list[dict[str, Any]]:
    path = Path(path_text)
    if not path.exists():
        raise CalibrationError(f"calibration file not found: {path}")
    if not path.is_file():
        raise CalibrationError(f"calibration source {path} is not a file; give a .txt, .jsonl, .json or .parquet file")
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise CalibrationError(
            f"calibration file {path} has an unsupported extension {suffix or '(none)'}; use {', '.join(FILE_SUFFIXES)}"
        )
    try:
        if suffix == ".parquet":
            return _read_parquet(path)
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CalibrationError(f"cannot read calibration file {path}: {str(exc).splitlines()[0]}") from exc
    if suffix == ".txt":
        return [{"text": text}]
    if suffix == ".jsonl":
        return _parse_jsonl(path, text)
    return _parse_json(path, text)


def _parse_jsonl(path: Path, text: str) -> list[dict[str, Any]]:
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CalibrationError(f"{path}: line {number} is not valid JSON ({exc.msg})") from exc
        records.append(_as_record(record, path, f"line {number}"))
    return records


def _parse_json(path: Path, text: str) -> list[dict[str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CalibrationError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise CalibrationError(f'{path}: expected a list of records or {{"data": [...]}}')
    return [_as_record(item, path, f"item {i}") for i, item in enumerate(data)]


def _as_record(item: Any, path: Path, where: str) -> dict[str, Any]:
    if isinstance(item, str):  # a bare string is a document
        return {"text": item}
    if not isinstance(item, dict):
        raise CalibrationError(f"{path}: {where} is a {type(item).__name__}, expected an object or a string")
    return item


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises many types for corrupt files
        raise CalibrationError(f"cannot read parquet file {path}: {str(exc).splitlines()[0]}") from exc


def read_hub_records(definition: SourceDefinition, label: str) -> Sequence[dict[str, Any]]:
    """Records of a hub dataset: a memory-mapped ``datasets.Dataset`` (rows read on demand) or,
    when streaming, the first ``max_documents`` rows as a list."""
    if definition.dataset not in LOCAL_BUILDERS and not hub_reachable():
        local = (
            f" (a local copy of it: file:PATH with schema {label})" if definition.fields and ":" not in label else ""
        )
        raise CalibrationError(
            f"calibration source {label!r} needs the Hugging Face Hub, which is unreachable; "
            f"use --calib file:PATH for offline calibration{local}"
        )
    import datasets

    kwargs: dict[str, Any] = {"split": definition.split, "verification_mode": "no_checks"}
    if definition.revision:
        kwargs["revision"] = definition.revision
    if definition.data_files:
        kwargs["data_files"] = definition.data_files
    try:
        if definition.streaming:
            stream = datasets.load_dataset(definition.dataset, definition.config, streaming=True, **kwargs)
            limit = definition.max_documents
            return list(stream.take(limit) if limit else stream)
        dataset = datasets.load_dataset(definition.dataset, definition.config, **kwargs)
    except Exception as exc:  # datasets raises many types (network, missing config, scripts)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CalibrationError(f"cannot load calibration dataset {definition.dataset!r} ({label}): {first}") from exc
    if definition.max_documents and len(dataset) > definition.max_documents:
        dataset = dataset.select(range(definition.max_documents))
    return dataset
