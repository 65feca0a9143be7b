"""Wanda (Sun et al., 2023; methods.md §2.2): prune by |W| x input-feature norm, per output row.

``S_ij = |W_ij| * sqrt(a_j)`` where ``a_j`` is the calibration mean over *samples* of
``sum_tokens x_j^2`` (``stats.SquaredNormStat``). This is |W| times the L2 norm of input feature j
up to a constant that does not change any ranking. The comparison group is each output row, so
every row ends with exactly ``int(in_features * s)`` zeros; N:M uses the same score. No weight
update.
"""

from __future__ import annotations

import torch

from compresskit.pruning.masks import pattern_mask
from compresskit.pruning.pattern import Pattern


def wanda_scores(weight: torch.Tensor, act_sq_norm: torch.Tensor) -> torch.Tensor:
    """``|W| * sqrt(act_sq_norm)`` in float32, broadcasting the per-input-column statistic over rows."""
    if act_sq_norm.dim() != 1 or act_sq_norm.shape[0] != weight.shape[1]:
        raise ValueError(
            f"act_sq_norm must have one entry per input column ({weight.shape[1]}), got shape "
            f"{tuple(act_sq_norm.shape)}"
        )
    scale = act_sq_norm.detach().to(device=weight.device, dtype=torch.float32).sqrt()
    return weight.detach().abs().float() * scale.unsqueeze(0)


@torch.no_grad()
def wanda_prune_(
    weight: torch.Tensor,
    act_sq_norm: torch.Tensor,
    sparsity: float | None = None,
    pattern: Pattern = Pattern.unstructured(),
) -> torch.Tensor:
    """Zero the lowest-Wanda-score entries per row (or per N:M group) in place; return the mask."""
    scores = wanda_scores(weight, act_sq_norm)
    mask = pattern_mask(scores, sparsity, Pattern.parse(pattern), per_row=True)
    weight.masked_fill_(mask, 0)
    return mask
