"""Data-free analyses of model weights shared by several methods (spectra for AlphaPruning, WeLore)."""

from __future__ import annotations

from compresskit.analysis.spectra import SpectrumCache, model_singular_values, singular_values, weights_fingerprint

__all__ = ["SpectrumCache", "model_singular_values", "singular_values", "weights_fingerprint"]
