"""Architecture adapters: one API over the decoder blocks, linears and experts of every family."""

from __future__ import annotations

from compresskit.models.adapters.base import ModelAdapter
from compresskit.models.adapters.families import FAMILIES, Family, supported_families
from compresskit.models.adapters.moe import ExpertView, MoEView, UnfusedExperts
from compresskit.models.adapters.registry import get_adapter

__all__ = [
    "FAMILIES",
    "ExpertView",
    "Family",
    "ModelAdapter",
    "MoEView",
    "UnfusedExperts",
    "get_adapter",
    "supported_families",
]
