"""``compresskit.json``: what was done to a checkpoint, exactly enough to rebuild and audit it.

``structure`` lists module replacements (low-rank factors, removed sublayers, condensed MoE
layers); each entry has a ``kind`` that a module registered with ``register_structure_kind``
knows how to rebuild on load. A checkpoint with an empty ``structure`` is a plain transformers
checkpoint (dense weights, zeros kept) and loads with ``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from ..errors import CheckpointError

MANIFEST_NAME = "compresskit.json"
FORMAT_VERSION = 1


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for dist in ("compresskit", "torch", "transformers", "safetensors", "datasets", "lm_eval"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return versions


class Manifest(BaseModel):
    format_version: int = FORMAT_VERSION
    #: with the fields' types, how ``outputs.is_checkpoint_dir`` tells a checkpoint from a file merely named compresskit.json
    written_by: str = "compresskit"
    created: str = Field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    base_model: str
    revision: str | None = None
    method: str
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    calibration: dict[str, Any] | None = None  # spec + sample hash
    block_ratios: list[float] | None = None  # the allocation's target per block
    method_details: dict[str, Any] = Field(default_factory=dict)  # e.g. OWL's D per block
    sparsity: dict[str, Any] = Field(default_factory=dict)  # measured: overall, per block, per module
    parameters: dict[str, int] = Field(default_factory=dict)
    structure: list[dict[str, Any]] = Field(default_factory=list)
    storage: str = "dense"
    loadable_with_transformers: bool = True
    form_reason: str | None = None  # why the checkpoint is (or cannot be) in a stock transformers form
    dtype: str | None = None
    versions: dict[str, str] = Field(default_factory=library_versions)
    timings: dict[str, float] = Field(default_factory=dict)
    stages: list[dict[str, Any]] = Field(default_factory=list)  # earlier manifests when methods are chained

    def write(self, directory: Path) -> None:
        (Path(directory) / MANIFEST_NAME).write_text(json.dumps(self.model_dump(), indent=2) + "\n")

    @classmethod
    def read(cls, directory: Path) -> "Manifest":
        path = Path(directory) / MANIFEST_NAME
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{directory} is not a compresskit checkpoint (no {MANIFEST_NAME})") from None
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{path} must hold a JSON object (a compresskit manifest), not a {type(data).__name__}")
        version = data.get("format_version", FORMAT_VERSION)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise CheckpointError(f"{path}: format_version must be a positive integer, got {version!r}")
        if data.get("format_version", 0) > FORMAT_VERSION:
            raise CheckpointError(
                f"{path} has format_version {data['format_version']}; this compresskit reads up to {FORMAT_VERSION}, upgrade it"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise CheckpointError(f"{path}: field {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
