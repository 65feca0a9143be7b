"""SparseGPT (Frantar & Alistarh, 2023; methods.md §2.3): prune with an OBS weight update.

For a layer ``y = W x`` with calibration Hessian ``H = (2/N) sum x x^T`` (``stats.HessianStat``),
the columns of W are visited left to right. Pruning entry ``w_ri`` costs ``w_ri^2 / [H^-1]_ii``
(the Optimal Brain Surgeon saliency) and is compensated by moving the row's not-yet-visited
weights along ``H^-1``:

    err = (w - q) / U_ii          U = upper Cholesky factor of H^-1 (so U_ii^2 = [H^-1]_ii
    W[:, i:] -= err (x) U[i, i:]  after removing the columns already visited)

``q`` is ``w`` with the pruned entries set to 0. Updates to columns beyond the current block of
``blocksize`` columns are batched into one matmul per block ("lazy batch updates").

Masks. Unstructured: "adaptive mask selection", the score ``w^2 / U_ii^2`` over the whole
rows x blocksize block, chosen at the start of the block. The reference prunes
``score <= sorted(score)[int(numel*s)]`` (one entry more than ``int(numel*s)``, plus ties); we
prune exactly ``int(numel_block * s)`` entries, like ``masks.matrix_mask``. N:M: at every column
``i`` with ``i % M == 0`` inside the block, the N smallest scores per row among columns
``i..i+M-1``, scored with the weights as already updated by the columns before them.

Numerics follow the reference: float32 work copy, TF32 off, dead input columns (``H_jj == 0``:
the feature never fired) get ``H_jj = 1`` and zero weights, ``percdamp * mean(diag H)`` is added
to the diagonal. One difference: the damping and the factorisation chain (Cholesky, inverse,
Cholesky) run in float64 and ``U`` is rounded to float32 once. LAPACK's blocked fp32 factorisation
gives different roundings for different CPU thread counts, so the same Hessian solved by a rank
with 1 thread and by one process with 2 threads gave slightly different ``U``; in a bf16 model such
a difference flips bf16 roundings of updated weights and spreads through the next blocks' inputs.
In fp64 the difference is ~1e-16 and vanishes in the fp32 rounding (``engine.distributed``). Unlike the reference, which crashes when the damped H is not positive definite
(a rank-deficient Hessian from too few calibration tokens), we retry with 10x the damping a few
times and report it (``SparseGPTResult.damping_retries``, plus a log warning). The caller's
Hessian is never modified (q/k/v share one).

Layout: the work copy is stored transposed, ``[in, out]``, so that one input column is one
contiguous row; the sequential column loop then touches contiguous memory and does two kernels
per column (the error, and a rank-1 update of the rest of the block). Everything else is
batched per block.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from compresskit.errors import InputError
from compresskit.pruning.masks import matrix_mask
from compresskit.pruning.pattern import Pattern, check_divisible
from compresskit.pruning.precision import full_fp32_matmul

logger = logging.getLogger(__name__)

DAMPING_RETRIES = 3
"""Extra Cholesky attempts, each with 10x the previous damping (e.g. 0.01 -> 0.1 -> 1 -> 10)."""


@dataclass(frozen=True)
class SparseGPTResult:
    """What one SparseGPT call did, for reports; ``sparsegpt_prune_`` returns only ``mask``."""

    mask: torch.Tensor
    """[out, in] bool, True = zeroed by this call (selected entries and dead columns)."""
    percdamp_used: float
    damping_retries: int
    dead_columns: int
    obs_loss: float
    """The reference's ``Losses`` sum: sum over pruned entries of ``err^2 / 2`` (OBS estimate)."""


def upper_cholesky_of_inverse(hessian: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, float, int]:
    """``U`` with ``U^T U = (H + damp I)^-1``, upper triangular; ``damp = percdamp * mean(diag H)``.

    Computed as the reference does (cholesky, cholesky_inverse, cholesky upper). ``hessian`` is
    damped in place (pass a copy). Returns ``(U, percdamp_used, retries)``.
    """
    diagonal = hessian.diagonal()
    mean_diag = diagonal.mean()
    attempts = [percdamp] + [max(percdamp, 0.01) * 10**k for k in range(1, DAMPING_RETRIES + 1)]
    applied = 0.0
    for retry, damping in enumerate(attempts):
        diagonal.add_((damping - applied) * mean_diag)
        applied = damping
        lower, info = torch.linalg.cholesky_ex(hessian)
        if int(info) != 0:
            continue
        inverse = torch.cholesky_inverse(lower)
        del lower  # at most three [in, in] alive: the damped copy, the inverse, its factor
        upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
        del inverse
        if int(info) == 0 and bool(torch.isfinite(upper).all()):
            return upper, damping, retry
    raise InputError(
        f"SparseGPT: the Hessian is not positive definite even with percdamp {attempts[-1]:g}; "
        "use more calibration samples or another pruner for this layer"
    )


def _check_arguments(
    weight: torch.Tensor, hessian: torch.Tensor, pattern: Pattern, blocksize: int, percdamp: float
) -> None:
    if weight.dim() != 2:
        raise ValueError(f"SparseGPT needs a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    cols = weight.shape[1]
    if tuple(hessian.shape) != (cols, cols):
        raise ValueError(f"Hessian shape {tuple(hessian.shape)} does not match in_features {cols}")
    check_divisible(cols, pattern)
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise InputError(f"SparseGPT blocksize must be a positive integer, got {blocksize!r}")
    if pattern.is_nm and blocksize % pattern.m != 0:
        # N:M groups restart at each block (i % M inside the block), so a block edge inside a
        # group would silently produce an invalid pattern.
        raise InputError(
            f"SparseGPT blocksize {blocksize} must be a multiple of M={pattern.m} for N:M pattern {pattern}"
        )
    if not (isinstance(percdamp, (int, float)) and math.isfinite(percdamp) and percdamp >= 0):
        raise InputError(f"SparseGPT percdamp must be a finite number >= 0 (default 0.01), got {percdamp!r}")


@torch.no_grad()
def sparsegpt_reconstruct_(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float | None = None,
    pattern: Pattern = Pattern.unstructured(),
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> SparseGPTResult:
    """Prune ``weight`` [out, in] in place with OBS updates from ``hessian`` [in, in]; full report."""
    pattern = Pattern.parse(pattern)
    sparsity = pattern.resolve_sparsity(sparsity)
    _check_arguments(weight, hessian, pattern, blocksize, percdamp)
    rows, cols = weight.shape
    device = weight.device

    with full_fp32_matmul():
        work_h = hessian.detach().to(device=device, dtype=torch.float64, copy=True)
        if not bool(torch.isfinite(work_h).all()):
            raise InputError(
                "SparseGPT: the Hessian has NaN/inf entries (the calibration forward overflowed); "
                "load the model in bfloat16 or float32"
            )
        weight_t = torch.empty((cols, rows), dtype=torch.float32, device=device)
        weight_t.copy_(weight.detach().T)  # [in, out]: input column j is the contiguous row j

        dead = work_h.diagonal() == 0
        work_h.diagonal()[dead] = 1.0
        weight_t[dead] = 0.0
        hinv, percdamp_used, retries = upper_cholesky_of_inverse(work_h, float(percdamp))
        del work_h
        hinv = hinv.to(torch.float32)  # factorised in fp64, rounded once
        hinv_diag = hinv.diagonal()

        mask_t = torch.zeros((cols, rows), dtype=torch.bool, device=device)
        loss = torch.zeros((), dtype=torch.float32, device=device)
        for i1 in range(0, cols, blocksize):
            i2 = min(i1 + blocksize, cols)
            block = slice(i1, i2)
            err = _prune_block(
                weight_t[block], mask_t[block], hinv[block, block], hinv_diag[block], sparsity, pattern
            )
            loss += err.square().sum() / 2
            if i2 < cols:
                weight_t[i2:].addmm_(hinv[i1:i2, i2:].T, err, alpha=-1)

        mask_t[dead] = True
        weight_t.masked_fill_(mask_t, 0.0)
        weight.copy_(weight_t.T)

    if retries:
        logger.warning(
            "SparseGPT: Hessian [%d x %d] needed percdamp %g (requested %g) to be positive definite",
            cols, cols, percdamp_used, percdamp,
        )
    return SparseGPTResult(
        mask=mask_t.T.contiguous(),
        percdamp_used=percdamp_used,
        damping_retries=retries,
        dead_columns=int(dead.sum()),
        obs_loss=float(loss),
    )


def _prune_block(
    block_t: torch.Tensor,
    mask_t: torch.Tensor,
    hinv1: torch.Tensor,
    d1: torch.Tensor,
    sparsity: float,
    pattern: Pattern,
) -> torch.Tensor:
    """Column loop over one block (transposed views, modified in place); returns ``err`` [count, out].

    On return ``block_t[i]`` holds column i as it was when visited (later updates only touch
    columns after i), so masking it (done once for the whole matrix) yields the reference's ``Q1``.
    """
    count = block_t.shape[0]
    d1_squared = d1.square().unsqueeze(1)
    if pattern.is_nm:
        scale = torch.zeros_like(block_t)
        inverse_d1 = d1.reciprocal().unsqueeze(1)
    else:
        score = block_t.square() / d1_squared
        mask_t.copy_(matrix_mask(score.T, sparsity).T)  # row-major tie order, like matrix_mask(W)
        scale = mask_t.float() / d1.unsqueeze(1)  # err = w * mask / d, one multiply per column
    err = torch.empty_like(block_t)
    columns, scales, errors, hinv_rows = block_t.unbind(0), scale.unbind(0), err.unbind(0), hinv1.unbind(0)
    group_size = pattern.m if pattern.is_nm else 0
    for i in range(count):
        if group_size and i % group_size == 0:
            # nm_mask inlined on the transposed [m, out] group: this runs every M columns.
            group = slice(i, i + group_size)
            group_score = block_t[group].square().div_(d1_squared[group])
            smallest = torch.sort(group_score, dim=0, stable=True).indices[: pattern.n]
            mask_t[group].scatter_(0, smallest, True)
            torch.mul(mask_t[group], inverse_d1[group], out=scale[group])
        torch.mul(columns[i], scales[i], out=errors[i])
        if i + 1 < count:
            block_t[i + 1 :].addr_(hinv_rows[i][i + 1 :], errors[i], alpha=-1)
    return err


def sparsegpt_prune_(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float | None = None,
    pattern: Pattern = Pattern.unstructured(),
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> torch.Tensor:
    """Prune ``weight`` in place with SparseGPT (dtype kept); return the bool mask (True = zeroed)."""
    return sparsegpt_reconstruct_(weight, hessian, sparsity, pattern, blocksize, percdamp).mask
