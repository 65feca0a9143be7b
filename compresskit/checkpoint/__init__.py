"""Compressed checkpoints: safetensors + config + tokenizer + ``compresskit.json`` manifest.

The manifest is light (pydantic only) and imported at once; the names of ``io`` (torch,
transformers) are imported on first use, so ``compresskit inspect`` starts without torch.
"""

from .manifest import MANIFEST_NAME, Manifest, library_versions

_IO_NAMES = ("atomic_directory", "check_output_dir", "load", "load_with_tokenizer", "register_structure_kind",
             "save_checkpoint")


def __getattr__(name: str):
    if name in _IO_NAMES:
        from . import io

        return getattr(io, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
