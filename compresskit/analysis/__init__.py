"""Data-free analyses of model weights shared by several methods (spectra for AlphaPruning, WeLore),
and the distances of output-comparing methods (FinerCut, CD-MoE).

The names load on first use (``names`` is torch-free), so option checks that only need the valid
choices answer before torch is imported."""

from __future__ import annotations

import importlib

__all__ = ["SpectrumCache", "model_singular_values", "singular_values", "weights_fingerprint"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("compresskit.analysis.spectra"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
