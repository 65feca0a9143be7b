"""Magnitude pruning (methods.md §2.1): score |W|, no calibration data.

Unstructured: the whole matrix is one comparison group (exactly ``int(numel*s)`` entries pruned,
see ``masks`` for how this differs from the reference's ``<=`` threshold). N:M: the N smallest
|W| of every M consecutive input columns of each row.
"""

from __future__ import annotations

import torch

from compresskit.pruning.masks import pattern_mask
from compresskit.pruning.pattern import Pattern


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """|W| in float32."""
    return weight.detach().abs().float()


@torch.no_grad()
def magnitude_prune_(
    weight: torch.Tensor, sparsity: float | None = None, pattern: Pattern = Pattern.unstructured()
) -> torch.Tensor:
    """Zero the smallest-|W| entries of ``weight`` in place (dtype kept); return the mask (True = pruned).

    ``sparsity`` is required for unstructured and may be omitted for N:M (it is N/M).
    """
    mask = pattern_mask(magnitude_scores(weight), sparsity, Pattern.parse(pattern), per_row=False)
    weight.masked_fill_(mask, 0)
    return mask
