"""Boolean prune masks from a score matrix (True = prune), for the three comparison groups.

* ``matrix_mask``: the whole matrix is one group (magnitude, methods.md §2.1; and SparseGPT's
  rows x blocksize block, §2.3).
* ``row_mask``: each output row is a group (Wanda, §2.2).
* ``nm_mask``: each row's M consecutive input columns are a group (N:M, all three pruners).

"Exactly k" convention. The reference magnitude pruner (and SparseGPT's adaptive mask) takes
``thresh = sorted(score)[int(numel*s)]`` and prunes ``score <= thresh``: that is one entry more
than ``int(numel*s)``, plus every entry tied with the threshold (all the zeros of an already
sparse matrix, for example). compresskit prunes exactly ``k = int(numel*s)`` entries, the k
smallest, ties broken by position (row-major) as a stable sort would, so the requested sparsity
is met exactly and every device gives the same mask. ``int()`` truncation is kept from the
reference (``int(100 * 0.29) == 28``).

Scores are compared in float32 whatever their input dtype: fp16/bf16 |W| are exactly
representable in fp32, so the order is unchanged, and fp32 sorts / selections run everywhere.
"""

from __future__ import annotations

import torch

from compresskit.pruning.pattern import Pattern, check_divisible, validate_sparsity


def _count(total: int, sparsity: float) -> int:
    return int(total * validate_sparsity(sparsity))


def smallest_k_mask(score: torch.Tensor, k: int, dim: int, *, use_sort: bool | None = None) -> torch.Tensor:
    """True at the ``k`` smallest entries along ``dim``; ties go to the lower position.

    That is exactly the first ``k`` entries of a stable ascending sort. On GPU we do that sort
    (fast there); on CPU a selection (``kthvalue`` + position rank among the ties) gives the
    same mask several times faster. ``use_sort`` forces one path (tests compare them).
    """
    score = score.float()
    if use_sort is None:
        use_sort = score.device.type != "cpu"
    if use_sort:
        order = torch.sort(score, dim=dim, stable=True).indices.narrow(dim, 0, k)
        return torch.zeros(score.shape, dtype=torch.bool, device=score.device).scatter_(dim, order, True)
    threshold = score.kthvalue(k, dim=dim, keepdim=True).values
    below = score < threshold
    ties = score == threshold
    missing = k - below.sum(dim=dim, keepdim=True)
    return below | (ties & (ties.cumsum(dim=dim) <= missing))


def matrix_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune exactly ``int(numel * sparsity)`` smallest scores of the whole matrix (ties: row-major)."""
    k = _count(score.numel(), sparsity)
    if k == 0:
        return torch.zeros(score.shape, dtype=torch.bool, device=score.device)
    return smallest_k_mask(score.reshape(-1), k, dim=0).reshape(score.shape)


def row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per output row, prune the ``int(in_features * sparsity)`` smallest scores (Wanda, stable sort)."""
    if score.dim() != 2:
        raise ValueError(f"row_mask needs a 2-D score [out, in], got shape {tuple(score.shape)}")
    k = _count(score.shape[1], sparsity)
    if k == 0:
        return torch.zeros(score.shape, dtype=torch.bool, device=score.device)
    return smallest_k_mask(score, k, dim=1)


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In each row and each group of ``m`` consecutive columns, prune the ``n`` smallest scores.

    The reference uses ``topk(n, largest=False)``; a stable sort over the ``m`` entries of each
    group selects the same entries when scores are distinct and breaks ties by position, so the
    result is the same on every device. All groups are handled in one batched call.
    """
    if score.dim() != 2:
        raise ValueError(f"nm_mask needs a 2-D score [out, in], got shape {tuple(score.shape)}")
    pattern = Pattern.nm(n, m)
    rows, cols = score.shape
    check_divisible(cols, pattern)
    groups = score.float().reshape(rows, cols // m, m)
    smallest = torch.sort(groups, dim=2, stable=True).indices[:, :, :n]
    mask = torch.zeros(groups.shape, dtype=torch.bool, device=score.device)
    mask.scatter_(2, smallest, True)
    return mask.reshape(rows, cols)


def pattern_mask(score: torch.Tensor, sparsity: float | None, pattern: Pattern, *, per_row: bool) -> torch.Tensor:
    """The mask for ``pattern``: N:M groups, else per row (Wanda) or over the whole matrix."""
    if pattern.is_nm:
        pattern.resolve_sparsity(sparsity)
        return nm_mask(score, pattern.n, pattern.m)
    sparsity = pattern.resolve_sparsity(sparsity)
    return row_mask(score, sparsity) if per_row else matrix_mask(score, sparsity)
