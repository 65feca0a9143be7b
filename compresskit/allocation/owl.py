"""OWL — Outlier Weighed Layerwise sparsity (Yin et al., ICML 2024; methods.md §3).

Blocks whose Wanda scores hold more *outliers* (entries far above the block mean) are kept
denser. Two pure steps, both following ``lib/prune_all.py`` of luuyin/OWL (commit dddb7a4):

1. ``block_outlier_ratio``: the layerwise outlier distribution (LOD) value of one decoder block,
   measured on the **dense** model (pass 1 of OWL prunes nothing).
2. ``allocate_owl`` / ``allocate_owl_nm``: turn the per-block LOD vector into one sparsity
   (or one N of an N:M pattern) per block. All linears of a block share it (OWL issues #9, #12).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from compresskit.errors import InputError
from compresskit.pruning.wanda import wanda_scores

# Where the reference prunes a block whose computed sparsity is <= 0 (a very protected block).
MIN_BLOCK_SPARSITY = 0.01


def _count_above(scores: torch.Tensor, threshold: float) -> int:
    return int((scores > threshold).sum().item())


def _sum_f64(scores: torch.Tensor) -> float:
    # fp64 accumulation: the mean is then (almost) independent of how the entries are split into
    # matrices, which lets block_outlier_ratio stream matrix by matrix (see its docstring).
    return float(scores.sum(dtype=torch.float64).item())


def outlier_ratio(scores: torch.Tensor, m: float) -> float:
    """Percentage of entries above ``m`` times the mean (the reference's ``check_outlier_mean``).

    ``D = 100 · #{a_k > m · mean(a)} / len(a)`` over the flattened ``scores``. The mean is
    accumulated in float64 (the reference uses float32; the counts differ only for an entry
    within float32 rounding of the threshold).
    """
    flat = scores.detach().reshape(-1)
    if flat.numel() == 0:
        raise ValueError("outlier_ratio needs at least one score")
    threshold = m * (_sum_f64(flat) / flat.numel())
    return 100.0 * _count_above(flat, threshold) / flat.numel()


@torch.no_grad()
def block_outlier_ratio(
    weights: Sequence[torch.Tensor], act_sq_norms: Sequence[torch.Tensor], m: float
) -> float:
    """OWL's LOD value of one block: ``outlier_ratio`` of the concatenated Wanda scores.

    ``A = |W| · sqrt(a)`` per linear (``a`` = Wanda's squared input-column norm), flattened and
    concatenated over all linears of the block; the Wanda score is used whatever the base pruner
    is (methods.md §3.1). To avoid materialising the concatenation (≈ 200 M floats for a LLaMA-7B
    block) this makes two passes over the matrices, holding one score matrix at a time: pass 1
    sums the scores for the global mean ``Σ sums / Σ numel``; pass 2 counts the entries above
    ``m`` times that mean. Same arithmetic as ``outlier_ratio(torch.cat(...), m)``.
    """
    if len(weights) != len(act_sq_norms) or not weights:
        raise ValueError(f"need one act_sq_norm per weight, got {len(weights)} and {len(act_sq_norms)}")
    total, numel = 0.0, 0
    for weight, act_sq in zip(weights, act_sq_norms):
        total += _sum_f64(wanda_scores(weight, act_sq.reshape(-1)))
        numel += weight.numel()
    threshold = m * (total / numel)
    above = 0
    for weight, act_sq in zip(weights, act_sq_norms):
        above += _count_above(wanda_scores(weight, act_sq.reshape(-1)), threshold)
    return 100.0 * above / numel


def _normalised(outlier_ratios: Sequence[float], top: float) -> np.ndarray | None:
    """Min-max normalise into ``[0, top]``; None when all values are equal (no ranking)."""
    d = np.asarray(outlier_ratios, dtype=np.float64)
    if d.ndim != 1 or d.size == 0:
        raise ValueError("need a non-empty 1-D sequence of outlier ratios")
    if not np.all(np.isfinite(d)):
        raise ValueError(f"outlier ratios must be finite, got {d.tolist()}")
    spread = d.max() - d.min()
    if spread == 0:
        return None
    return (d - d.min()) / spread * top


def budget_mean(values: np.ndarray, sizes: Sequence[int] | None) -> float:
    """The mean a budget is taken over: each block weighted by its parameters ``sizes``.

    Blocks of equal size (the papers' dense models; ``sizes`` None) use the plain mean, so the
    reference's arithmetic is kept bit for bit; blocks of unequal size (MoE next to dense blocks,
    condensed MoE layers, removed sublayers, low-rank factors) use the parameter-weighted mean,
    so the pruned share of all the parameters is the budget, not the mean of the block shares.
    """
    if sizes is None:
        return float(values.mean())
    w = np.asarray(sizes, dtype=np.float64)
    if w.shape != values.shape or not np.all(w > 0):
        raise ValueError(f"need one positive size per block, got {list(sizes)} for {values.size} blocks")
    if np.all(w == w[0]):
        return float(values.mean())
    return float((values * w).sum() / w.sum())


def allocate_owl(outlier_ratios: Sequence[float], sparsity: float, lam: float,
                 sizes: Sequence[int] | None = None) -> list[float]:
    """One sparsity per block from the blocks' outlier ratios ``D`` (methods.md §3.1).

    ``D' = (D − min D) / (max D − min D) · 2λ``, ``density_ℓ = D'_ℓ − mean(D') + (1 − S)``,
    ``sparsity_ℓ = 1 − density_ℓ``. More outliers ⇒ denser block. The mean is weighted by the
    blocks' parameters ``sizes`` (:func:`budget_mean`; the plain mean when they are equal, as in
    the reference), so the pruned share of all the blocks' parameters is exactly ``S``; the most
    and the least protected blocks are ``2λ`` apart.

    A ratio ``<= 0`` becomes 0.01, as in the reference pruning loop (the mean then exceeds ``S``
    slightly). The reference has no upper clamp, but a ratio ``>= 1`` would empty a block, so it
    is an ``InputError`` asking for a smaller λ. When all ``D`` are equal the reference divides
    by zero (NaN ratios); here every block gets ``S``, the only ranking-free choice.
    """
    if not 0.0 <= sparsity < 1.0:
        raise InputError(f"sparsity must be in [0, 1), got {sparsity}")
    if lam < 0:
        raise InputError(f"--owl-lambda must be >= 0, got {lam}")
    spread = _normalised(outlier_ratios, 2.0 * lam)
    if spread is None:
        return [float(sparsity)] * len(outlier_ratios)
    density = spread - budget_mean(spread, sizes) + (1.0 - sparsity)
    ratios = [float(r) if r > 0 else MIN_BLOCK_SPARSITY for r in 1.0 - density]
    if max(ratios) >= 1.0:
        raise InputError(
            f"OWL λ={lam} gives block sparsities outside [0,1) (max {max(ratios):.2f}); "
            "use a smaller --owl-lambda"
        )
    return ratios


def allocate_owl_nm(outlier_ratios: Sequence[float], n: int, m: int, lam: float,
                    sizes: Sequence[int] | None = None) -> list[int]:
    """Per-block number of zeros in every ``m`` consecutive weights (OWL's N:M variant, §3.1).

    ``D' = (D − min D) / (max D − min D) · λ`` (note λ, not 2λ), ``N_ℓ = N − round(D'_ℓ − mean D')``,
    rounding half to even like ``np.round`` in ``prune_wanda_outlier_structure``; the mean is
    :func:`budget_mean` (parameter-weighted for blocks of unequal ``sizes``). λ is in units of
    "zeros per M": the README's 5:8 with λ=2 gives blocks with 4, 5 or 6 zeros. The mean of ``N_ℓ``
    need not be ``N`` (rounding). The reference does not clamp; an ``N_ℓ`` outside ``[0, m)`` is an
    ``InputError``. All ``D`` equal (the reference divides by zero) gives ``N`` for every block.
    """
    if not 0 < n < m:
        raise InputError(f"N:M pattern needs 0 < N < M, got {n}:{m}")
    if lam < 0:
        raise InputError(f"--owl-lambda must be >= 0, got {lam}")
    spread = _normalised(outlier_ratios, float(lam))
    if spread is None:
        return [n] * len(outlier_ratios)
    zeros = [n - int(shift) for shift in np.round(spread - budget_mean(spread, sizes))]
    if min(zeros) < 0 or max(zeros) >= m:
        raise InputError(
            f"OWL λ={lam} gives {min(zeros)}..{max(zeros)} zeros per {m}, outside [0, {m}); "
            "use a smaller --owl-lambda"
        )
    return zeros
