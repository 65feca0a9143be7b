"""Calibration sources as data: YAML definitions under ``calibration/definitions/sources/`` + ``parse_source``.

Adding a dataset is a YAML file (the lm-evaluation-harness idea of declarative tasks). A source
file names the hub dataset (id, config, split, revision, data_files) and either the text column
(``text_field``, pre-training text sampled in windows) or Jinja templates deriving
``question`` / ``answer`` / ``rationale`` from a record (question-answer sets). The prompt frames
of the formats live in ``calibration/definitions/formats.yaml``; a source may override them (``templates``),
as the reference does for the NLI and multiple-choice sets.

Two more kinds of registered source need no Hub: ``package_file`` names a file shipped inside the
package (``demo``: the public-domain sample in ``compresskit/demo_data/``, labelled as a demo in
every manifest), and ``fallbacks`` lists other sources tried in order, the first available one
being used and recorded (``auto``: the quickstart's chain Hub → local mirror → demo). A source a
user names explicitly is never replaced by another one; only a ``fallbacks`` source falls back.

Source strings: a registered name (``c4``), ``hf:<dataset>[:<config>]:<split>:<field>``
(colons inside ``[...]`` belong to the split, e.g. ``train[:5000]``) or ``file:<path>``.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from compresskit.errors import CalibrationError
from compresskit.paths import calibration_defs_dir, shared_dir

#: Keys a source YAML may hold, with what they mean.
SOURCE_KEYS = {
    "description": "one line: what the data is and which paper uses it",
    "aliases": "other names the source answers to",
    "dataset": "Hugging Face Hub dataset id",
    "config": "dataset config name (null for none)",
    "split": "split, slicing allowed (train[:5000])",
    "revision": "pinned commit of the dataset repository",
    "data_files": "data_files argument of datasets.load_dataset",
    "streaming": "stream the dataset (with max_documents: read only the first N records)",
    "max_documents": "keep only the first N records",
    "join": "join all texts with this separator into one document (WikiText-2 protocol)",
    "text_field": "column holding the document text (window format)",
    "fields": "question / answer / rationale: Jinja templates over one record",
    "templates": "qa / cot / zero: override of the prompt frames in formats.yaml",
    "package_file": "a file shipped in compresskit/demo_data/ (instead of a Hub dataset)",
    "label": "what manifests record and the terminal shows as the data's source (demo data says so)",
    "fallbacks": "sources tried in order, the first available one is used (${COMPRESSKIT_SHARED_DIR} allowed)",
}
#: Written in a ``fallbacks`` entry, replaced by the shared data folder (``paths.shared_dir()``).
SHARED_DIR_VARIABLE = "${COMPRESSKIT_SHARED_DIR}"
TEMPLATE_NAMES = ("qa", "cot", "zero")


@dataclass(frozen=True)
class SourceDefinition:
    """One resolved calibration source (registered, ``hf:`` or ``file:``)."""

    name: str
    kind: str  # "hub", "file" or "fallback"
    description: str = ""
    dataset: str | None = None
    config: str | None = None
    split: str = "train"
    revision: str | None = None
    data_files: Any = None
    streaming: bool = False
    max_documents: int | None = None
    join: str | None = None
    path: str | None = None
    text_field: str | None = None
    fields: dict[str, str] = field(default_factory=dict)
    templates: dict[str, str] = field(default_factory=dict)
    label: str | None = None
    fallbacks: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def fingerprint(self) -> str:
        """Hash of everything in the definition that changes the samples (the YAML content, the
        prompt frames in force, the resolved file path)."""
        data = self.to_dict()
        data.pop("description")
        data["frames"] = prompt_frames(self)
        blob = json.dumps(data, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise CalibrationError(f"cannot read calibration definition {path}: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise CalibrationError(f"calibration definition {path} must be a mapping of keys to values")
    return data


def _definition_from_yaml(name: str, path: Path) -> SourceDefinition:
    data = _read_yaml(path)
    unknown = sorted(set(data) - set(SOURCE_KEYS))
    if unknown:
        raise CalibrationError(f"{path}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(SOURCE_KEYS)}")
    if "fallbacks" in data:
        return _fallback_definition(name, path, data)
    if "package_file" in data:
        return _package_file_definition(name, path, data)
    if not data.get("dataset"):
        raise CalibrationError(f"{path}: 'dataset' (the Hugging Face Hub id) is required")
    if not data.get("text_field") and not data.get("fields"):
        raise CalibrationError(f"{path}: give 'text_field' (documents) or 'fields' (question/answer)")
    fields_ = {str(k): str(v) for k, v in (data.get("fields") or {}).items()}
    bad = sorted(set(fields_) - {"question", "answer", "rationale"})
    if bad:
        raise CalibrationError(f"{path}: fields may be question, answer, rationale; got {', '.join(bad)}")
    templates = {str(k): str(v) for k, v in (data.get("templates") or {}).items()}
    bad = sorted(set(templates) - set(TEMPLATE_NAMES))
    if bad:
        raise CalibrationError(f"{path}: templates may be {', '.join(TEMPLATE_NAMES)}; got {', '.join(bad)}")
    return SourceDefinition(
        name=name,
        kind="hub",
        description=str(data.get("description", "")),
        dataset=str(data["dataset"]),
        config=data.get("config"),
        split=str(data.get("split", "train")),
        revision=data.get("revision"),
        data_files=data.get("data_files"),
        streaming=bool(data.get("streaming", False)),
        max_documents=data.get("max_documents"),
        join=data.get("join"),
        text_field=data.get("text_field"),
        fields=fields_,
        templates=templates,
    )


def _fallback_definition(name: str, path: Path, data: dict[str, Any]) -> SourceDefinition:
    chain = data["fallbacks"]
    if not isinstance(chain, list) or not chain or not all(isinstance(c, str) and c.strip() for c in chain):
        raise CalibrationError(f"{path}: 'fallbacks' must be a non-empty list of source strings")
    extra = sorted(set(data) - {"description", "aliases", "fallbacks"})
    if extra:
        raise CalibrationError(f"{path}: a 'fallbacks' source takes only description and aliases, not {', '.join(extra)}")
    return SourceDefinition(name=name, kind="fallback", description=str(data.get("description", "")),
                            fallbacks=tuple(c.strip() for c in chain))


def _package_file_definition(name: str, path: Path, data: dict[str, Any]) -> SourceDefinition:
    from compresskit.demo_data import DEMO_DIR

    extra = sorted(set(data) & {"dataset", "config", "split", "revision", "data_files", "streaming"})
    if extra:
        raise CalibrationError(f"{path}: 'package_file' is a local file; drop {', '.join(extra)}")
    file = (DEMO_DIR / str(data["package_file"])).resolve()
    if DEMO_DIR not in file.parents:
        raise CalibrationError(f"{path}: package_file must name a file inside {DEMO_DIR}")
    fields_ = {str(k): str(v) for k, v in (data.get("fields") or {}).items()}
    return SourceDefinition(
        name=name, kind="file", description=str(data.get("description", "")), path=str(file),
        join=data.get("join"), text_field=data.get("text_field"), fields=fields_, templates={str(k): str(v) for k, v in (data.get("templates") or {}).items()},
        label=str(data["label"]) if data.get("label") else None,
    )


def expand_fallback(candidate: str) -> str:
    """A ``fallbacks`` entry with ``${COMPRESSKIT_SHARED_DIR}`` replaced by the shared data folder."""
    return candidate.replace(SHARED_DIR_VARIABLE, str(shared_dir()))


@functools.lru_cache(maxsize=8)
def _registry(defs_dir: str) -> dict[str, tuple[str, Path]]:
    """name or alias -> (canonical name, YAML path)."""
    sources = Path(defs_dir) / "sources"
    table: dict[str, tuple[str, Path]] = {}
    for path in sorted(sources.glob("*.yaml")):
        name = path.stem.lower()
        table[name] = (name, path)
        for alias in _read_yaml(path).get("aliases") or []:
            table.setdefault(str(alias).lower(), (name, path))
    return table


def available_sources() -> list[str]:
    """Registered source names (one per YAML file in ``definitions/sources/``), sorted."""
    return sorted({canonical for canonical, _ in _registry(str(calibration_defs_dir())).values()})


def registered_source(name: str) -> SourceDefinition:
    table = _registry(str(calibration_defs_dir()))
    entry = table.get(name.strip().lower())
    if entry is None:
        hint = " (for a local file write file:PATH)" if Path(name).expanduser().exists() else ""
        raise CalibrationError(
            f"unknown calibration source {name!r}{hint}; known: {', '.join(available_sources())}, "
            "hf:<dataset>[:<config>]:<split>:<field>, file:<path>"
        )
    canonical, path = entry
    return _definition_from_yaml(canonical, path)


@functools.lru_cache(maxsize=8)
def _default_frames(defs_dir: str) -> dict[str, str]:
    path = Path(defs_dir) / "formats.yaml"
    data = _read_yaml(path)
    missing = [name for name in TEMPLATE_NAMES if name not in data]
    if missing:
        raise CalibrationError(f"{path}: missing template(s) {', '.join(missing)}")
    return {name: str(data[name]) for name in TEMPLATE_NAMES}


def prompt_frames(definition: SourceDefinition) -> dict[str, str]:
    """The qa / cot / zero prompt templates in force for a source (its overrides win)."""
    frames = dict(_default_frames(str(calibration_defs_dir())))
    frames.update(definition.templates)
    return frames


def split_source_string(text: str) -> list[str]:
    """Split on ``:`` except inside ``[...]`` (split slices such as ``train[:5000]``)."""
    parts, current, depth = [], [], 0
    for char in text:
        if char == "[":
            depth += 1
        elif char == "]":
            depth = max(0, depth - 1)
        if char == ":" and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def _parse_hf(text: str) -> SourceDefinition:
    parts = split_source_string(text[len("hf:") :])
    if len(parts) == 3:
        dataset, split, column = parts
        config = None
    elif len(parts) == 4:
        dataset, config, split, column = parts
    else:
        raise CalibrationError(
            f"cannot parse calibration source {text!r}; write hf:<dataset>[:<config>]:<split>:<field>, "
            "e.g. hf:allenai/c4:en:train:text"
        )
    if not all(p.strip() for p in (dataset, split, column)) or (config is not None and not config.strip()):
        raise CalibrationError(
            f"empty part in calibration source {text!r}; write hf:<dataset>[:<config>]:<split>:<field>"
        )
    return SourceDefinition(name=text, kind="hub", dataset=dataset, config=config, split=split, text_field=column)


def parse_source(source: str, text_field: str | None = None, schema: str | None = None) -> SourceDefinition:
    """Resolve a ``--calib`` string to a `SourceDefinition` (reads no data, touches no network).

    ``text_field`` overrides the text column; ``schema`` copies the question/answer mapping and
    prompt overrides of a registered source (a local GSM8K copy: ``schema="gsm8k"``).
    """
    source = source.strip()
    if source.startswith("file:"):
        raw = source[len("file:") :]
        if not raw:
            raise CalibrationError("calibration source 'file:' needs a path, e.g. file:/data/train.jsonl")
        path = Path(raw).expanduser().resolve()
        definition = SourceDefinition(name=f"file:{path}", kind="file", path=str(path))
    elif source.startswith("hf:"):
        definition = _parse_hf(source)
    else:
        definition = registered_source(source)
    if text_field:
        definition = replace(definition, text_field=text_field)
    if schema:
        donor = registered_source(schema)
        if not donor.fields:
            raise CalibrationError(
                f"schema {schema!r} has no question/answer fields; use a question-answer source such as gsm8k"
            )
        definition = replace(definition, fields=dict(donor.fields), templates=dict(donor.templates))
    return definition
