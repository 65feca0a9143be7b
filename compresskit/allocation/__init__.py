"""Layerwise sparsity allocation: how much of each block / matrix to prune (OWL, AlphaPruning).

Pure functions from per-block or per-matrix statistics to sparsity ratios; the methods in
``compresskit.methods`` gather the statistics and hand the ratios to a pruner.
"""

from __future__ import annotations

from compresskit.allocation.alpha import (
    allocate_alpha,
    block_ratios,
    esd_metric,
    hill_alpha_mid,
    hill_alpha_xmin_peak,
)
from compresskit.allocation.owl import allocate_owl, allocate_owl_nm, block_outlier_ratio, outlier_ratio

__all__ = [
    "allocate_alpha",
    "allocate_owl",
    "allocate_owl_nm",
    "block_outlier_ratio",
    "block_ratios",
    "esd_metric",
    "hill_alpha_mid",
    "hill_alpha_xmin_peak",
    "outlier_ratio",
]
