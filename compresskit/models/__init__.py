"""Model loading (hub id, local directory, built-in names) and architecture adapters."""

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

__all__ = [
    "BUILTIN_MODELS",
    "ExpertView",
    "ModelAdapter",
    "MoEView",
    "UnfusedExperts",
    "builtin_model_dir",
    "get_adapter",
    "load_model",
    "resolve_device",
    "resolve_dtype",
    "supported_families",
]
