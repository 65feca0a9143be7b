"""Checkpoints in and out: the manifest, the one loader (``reader``), the writer, structure kinds.

``reader.open_model`` answers how any model gets in (built-in name, Hub id, local directory,
compresskit checkpoint; lazily or in memory); ``writer.save_checkpoint`` writes one atomically;
``structure`` holds the module replacements a checkpoint records. The manifest is light (pydantic
only) and imported at once; the other names (torch, transformers) are imported on first use, so
``compresskit inspect`` starts without torch.
"""

from .manifest import MANIFEST_NAME, Manifest, library_versions

_MODULE_OF = {
    "LoadedModel": "reader", "open_model": "reader", "load": "reader", "load_with_tokenizer": "reader",
    "atomic_directory": "writer", "check_output_dir": "writer", "save_checkpoint": "writer",
    "describe_structure": "structure", "known_structure_kinds": "structure", "register_structure_kind": "structure",
}


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is not None:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{module}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["MANIFEST_NAME", "Manifest", "library_versions", *sorted(_MODULE_OF)]
