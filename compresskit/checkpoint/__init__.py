"""Compressed checkpoints: safetensors + config + tokenizer + ``compresskit.json`` manifest."""

from .io import (
    atomic_directory,
    check_output_dir,
    load,
    load_with_tokenizer,
    register_structure_kind,
    save_checkpoint,
)
from .manifest import MANIFEST_NAME, Manifest, library_versions

__all__ = [
    "MANIFEST_NAME",
    "Manifest",
    "atomic_directory",
    "check_output_dir",
    "library_versions",
    "load",
    "load_with_tokenizer",
    "register_structure_kind",
    "save_checkpoint",
]
