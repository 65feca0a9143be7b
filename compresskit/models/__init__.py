"""What loading a model is made of, and the architecture adapters.

``source`` resolves a name (built-in, local directory, Hub id) once; ``loading`` loads in memory;
``lazy`` / ``lazy_store`` keep decoder blocks on disk; ``placement.onload`` is the one way code gets
real weights. The one loader that puts these together is ``compresskit.checkpoint.reader.open_model``.
"""

from __future__ import annotations

from compresskit.models.adapters import (
    ExpertView,
    ModelAdapter,
    MoEView,
    UnfusedExperts,
    get_adapter,
    supported_families,
)
from compresskit.models.builtin import BUILTIN_MODELS, builtin_model_dir
from compresskit.models.loading import load_model, resolve_device, resolve_dtype
from compresskit.models.source import Source, resolve_source

__all__ = [
    "BUILTIN_MODELS",
    "ExpertView",
    "ModelAdapter",
    "MoEView",
    "Source",
    "UnfusedExperts",
    "builtin_model_dir",
    "get_adapter",
    "load_model",
    "resolve_device",
    "resolve_dtype",
    "resolve_source",
    "supported_families",
]
