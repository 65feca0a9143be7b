"""AlphaPruning (Lu et al., NeurIPS 2024; methods.md §5): sparsity from heavy-tailed spectra.

Each decoder linear's empirical spectral density (eigenvalues ``λ = σ²`` of ``WᵀW``) is fitted
with a power law ``p(λ) ∝ λ^{−α}`` above some ``xmin``. A small α (heavy tail) marks a
well-trained, important layer, which is pruned **less**; a large α is pruned more (maintainer
reply, AlphaPruning issue #1). The estimator follows ``lib/esd_utils.py::net_esd_estimator`` and
the allocation ``lib/prune.py::ww_sparsity`` of haiquanlu/AlphaPruning (commit 5f0e984),
including its fp32 arithmetic, so that α values match the repository's cached ``.npy`` files.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

import numpy as np
import torch

from compresskit.errors import InputError

HISTOGRAM_BINS = 100
MAPPINGS = ("block_wise", "matrix_wise")
# weightwatcher metric name -> column of ``WeightWatcher.analyze()``'s details frame (reference
# ``get_esd_metrics``); these are computed by weightwatcher over a whole model, not from eigs.
WEIGHTWATCHER_METRICS = {
    "entropy": "entropy",
    "alpha": "alpha",
    "mp_softrank": "mp_softrank",
    "stable_rank": "stable_rank",
    "random_distance": "rand_distance",
    "log_norm": "log_norm",
    "log_spectral_norm": "log_spectral_norm",
    "alpha_weighted": "alpha_weighted",
    "log_alpha_norm": "log_alpha_norm",
    "spectral_norm": "spectral_norm",
}


def _ascending_eigs(eigs: torch.Tensor | np.ndarray) -> torch.Tensor:
    """fp32, CPU, ascending, zeros dropped.

    The reference keeps zeros (``filter_zeros=False``) and then fails on ``log10(0)``; dropping
    exact zeros changes nothing for a full-rank matrix and lets rank-deficient ones be fitted.
    """
    values = eigs if isinstance(eigs, torch.Tensor) else torch.as_tensor(np.asarray(eigs))
    values = values.detach().to(device="cpu", dtype=torch.float32).reshape(-1)
    values = torch.sort(values[values > 0]).values
    if values.numel() < 2 or values[0] == values[-1]:
        raise InputError(
            "a weight matrix has a flat or empty spectrum (fewer than 2 distinct non-zero singular "
            "values), so no power law can be fitted; exclude it from AlphaPruning"
        )
    return values


def _hill_alpha(log_eigs: torch.Tensor, i: int) -> torch.Tensor:
    """``α_i = 1 + n / (Σ_{k≥i} ln λ_k − n ln λ_i)`` with ``n = N − i`` (fp32, as the reference)."""
    n = float(log_eigs.numel() - i)
    return 1 + n / (torch.sum(log_eigs[i:]) - n * log_eigs[i])


def _ks_distance(eigs: torch.Tensor, i: int, alpha: torch.Tensor) -> torch.Tensor:
    """``D_i = max_k |1 − (λ_{i+k}/λ_i)^{1−α} − k/n|``: the fitted CDF against the empirical one."""
    n = float(eigs.numel() - i)
    fitted_cdf = 1 - (eigs[i:] / eigs[i]) ** (1 - alpha)
    return torch.max(torch.abs(fitted_cdf - torch.arange(n) / n))


def xmin_peak_candidates(eigs: torch.Tensor) -> list[int]:
    """Indices ``i`` of ascending ``eigs`` tried as ``xmin`` by the ``xmin_peak`` rule.

    ``xmin2 = 10^(left edge of the fullest of 100 bins of log10 λ over [min, max])`` (``torch.histc``
    semantics: equal-width bins, the maximum counted in the last bin, first bin on ties). Tried:
    ``i = 0..N−2`` with ``λ_i ≤ 1.5·xmin2``, stopping at the first larger one, and skipping
    ``λ_i < log10(0.95·xmin2)``. That lower bound compares a raw eigenvalue with a *log* value;
    a reference quirk kept on purpose for parity with the published α values (methods.md §5.1).
    """
    log10 = torch.log10(eigs)
    lo, hi = log10.min().item(), log10.max().item()
    counts = torch.histc(log10, bins=HISTOGRAM_BINS, min=lo, max=hi)
    edges = torch.linspace(lo, hi, HISTOGRAM_BINS + 1)
    xmin2 = 10 ** edges[torch.argmax(counts)]
    lower, upper = torch.log10(0.95 * xmin2), 1.5 * xmin2
    tried = eigs[:-1]
    above = torch.nonzero(tried > upper)
    stop = int(above[0]) if above.numel() else tried.numel()
    return torch.nonzero(~(tried[:stop] < lower)).reshape(-1).tolist()


def hill_alpha_xmin_peak(eigs: torch.Tensor | np.ndarray) -> float:
    """AlphaPruning's ``alpha_peak`` (the paper's PL_Alpha_Hill) of one spectrum ``λ = σ²``.

    For every candidate ``xmin = λ_i`` (``xmin_peak_candidates``): the Hill estimate ``α_i`` and,
    if ``α_i > 1``, the Kolmogorov–Smirnov distance ``D_i`` (else ``D_i = 1``). Returns the ``α_i``
    of smallest ``D_i`` (first on ties). As in the reference, indices that are not candidates hold
    ``α = 0, D = 1``, so when no candidate beats ``D = 1`` the first index wins, possibly with 0.
    For parity, pass ``torch.linalg.svdvals(W.float()) ** 2`` computed in fp32.
    """
    lam = _ascending_eigs(eigs)
    log_lam = torch.log(lam)
    alphas = torch.zeros(lam.numel() - 1)
    distances = torch.ones(lam.numel() - 1)
    for i in xmin_peak_candidates(lam):
        alphas[i] = _hill_alpha(log_lam, i)
        if alphas[i] > 1:
            distances[i] = _ks_distance(lam, i, alphas[i])
    return float(alphas[torch.argmin(distances)])


def hill_alpha_mid(eigs: torch.Tensor | np.ndarray) -> float:
    """AlphaPruning's ``alpha_mid``: the Hill estimate with ``xmin`` at the median, ``i = int(N/2)``."""
    lam = _ascending_eigs(eigs)
    return float(_hill_alpha(torch.log(lam), lam.numel() // 2))


def _require_weightwatcher(metric: str):
    if importlib.util.find_spec("weightwatcher") is None:
        raise InputError(f"metric {metric!r} needs the weightwatcher package: pip install weightwatcher")
    import weightwatcher

    return weightwatcher


def esd_metric(eigs: torch.Tensor | np.ndarray, metric: str = "alpha_peak") -> float:
    """One spectrum's metric by name: ``alpha_peak`` (default) or ``alpha_mid``.

    The reference's other names (``entropy``, ``stable_rank``, ...) come from weightwatcher,
    which analyses a whole model: see ``weightwatcher_metric``.
    """
    if metric == "alpha_peak":
        return hill_alpha_xmin_peak(eigs)
    if metric == "alpha_mid":
        return hill_alpha_mid(eigs)
    if metric in WEIGHTWATCHER_METRICS:
        _require_weightwatcher(metric)
        raise ValueError(
            f"metric {metric!r} is computed over a model: call weightwatcher_metric(blocks, {metric!r})"
        )
    names = ", ".join(["alpha_peak", "alpha_mid", *WEIGHTWATCHER_METRICS])
    raise InputError(f"unknown AlphaPruning metric {metric!r}; choose one of: {names}")


def weightwatcher_metric(blocks: torch.nn.Module, metric: str) -> list[float]:
    """A weightwatcher metric per linear of ``blocks`` (reference: ``analyze(mp_fit, randomize)``)."""
    if metric not in WEIGHTWATCHER_METRICS:
        names = ", ".join(WEIGHTWATCHER_METRICS)
        raise InputError(f"{metric!r} is not a weightwatcher metric; choose one of: {names}")
    ww = _require_weightwatcher(metric)
    details = ww.WeightWatcher(model=blocks).analyze(mp_fit=True, randomize=True)
    return [float(v) for v in details[WEIGHTWATCHER_METRICS[metric]]]


def allocate_alpha(
    alphas_per_matrix: Sequence[float],
    block_of_matrix: Sequence[int],
    numel_of_matrix: Sequence[int],
    sparsity: float,
    epsilon: float,
    mapping: str = "block_wise",
) -> list[float]:
    """One sparsity per matrix from the matrices' α (``ww_sparsity``, methods.md §5.2).

    1. ``block_wise`` (default): every matrix takes the mean α of its block, so all linears of a
       block share one ratio; ``matrix_wise`` keeps each matrix's own α.
    2. ``r_i = (α_i − min α)/(max α − min α) · (s2 − s1) + s1`` with ``s1 = 1 − ε``, ``s2 = 1 + ε``.
    3. ``r_i ← r_i · S·Σ n_i / Σ n_i r_i`` (``n_i`` = parameters of matrix i): exactly ``S`` of all
       the decoder-linear weights are pruned.

    The reference does not clip; a ratio outside ``[0, 1)`` is an ``InputError`` asking for a
    smaller ε. When all α are equal the reference divides by zero; here every matrix gets ``S``.
    """
    alphas = np.asarray(alphas_per_matrix, dtype=np.float64)
    blocks = np.asarray(block_of_matrix)
    numel = np.asarray(numel_of_matrix, dtype=np.float64)
    if alphas.ndim != 1 or alphas.size == 0 or blocks.shape != alphas.shape or numel.shape != alphas.shape:
        raise ValueError(
            f"need one block index and one numel per α, got {alphas.shape}, {blocks.shape}, {numel.shape}"
        )
    if not np.all(np.isfinite(alphas)):
        raise InputError("AlphaPruning metric values must be finite; recompute the spectra of this model")
    if not 0.0 <= sparsity < 1.0:
        raise InputError(f"sparsity must be in [0, 1), got {sparsity}")
    if epsilon < 0:
        raise InputError(f"--alpha-epsilon must be >= 0, got {epsilon}")
    if mapping not in MAPPINGS:
        raise InputError(f"unknown AlphaPruning mapping {mapping!r}; choose one of: {', '.join(MAPPINGS)}")

    scores = alphas
    if mapping == "block_wise":
        scores = np.empty_like(alphas)
        for block in np.unique(blocks):
            scores[blocks == block] = alphas[blocks == block].mean()
    lo, hi = scores.min(), scores.max()
    if hi == lo:
        return [float(sparsity)] * alphas.size
    s1, s2 = 1.0 - epsilon, 1.0 + epsilon
    ratios = (scores - lo) / (hi - lo) * (s2 - s1) + s1
    ratios = ratios * (sparsity * numel.sum() / (numel * ratios).sum())
    if ratios.min() < 0 or ratios.max() >= 1:
        raise InputError(
            f"AlphaPruning ε={epsilon} gives layer sparsities outside [0,1) "
            f"(range {ratios.min():.2f}..{ratios.max():.2f}); use a smaller --alpha-epsilon"
        )
    return [float(r) for r in ratios]


def feasible_alpha_allocation(
    alphas_per_matrix: Sequence[float],
    block_of_matrix: Sequence[int],
    numel_of_matrix: Sequence[int],
    sparsity: float,
    epsilon: float,
    mapping: str = "block_wise",
    tolerance: float = 1e-4,
) -> tuple[list[float], float]:
    """``allocate_alpha`` at ``epsilon`` when its ratios stay in [0, 1), else at the largest smaller
    ε that keeps them there (bisection to ``tolerance``; ε = 0 is uniform, always feasible):
    ``(ratios, ε used)``. For allocations that must exist whatever the sparsity (EvoPress's
    ``alphapruning`` seed); ``--method alphapruning`` itself refuses an infeasible ε instead."""

    def allocate(eps: float) -> list[float] | None:
        try:
            return allocate_alpha(alphas_per_matrix, block_of_matrix, numel_of_matrix, sparsity, eps, mapping)
        except InputError as exc:
            if "outside [0,1)" not in str(exc):
                raise
            return None

    ratios = allocate(epsilon)
    if ratios is not None:
        return ratios, float(epsilon)
    lo, hi = 0.0, float(epsilon)
    while hi - lo > tolerance:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if allocate(mid) is not None else (lo, mid)
    return allocate(lo), lo


def block_ratios(
    alphas_per_matrix: Sequence[float],
    block_of_matrix: Sequence[int],
    numel_of_matrix: Sequence[int],
    sparsity: float,
    epsilon: float,
) -> list[float]:
    """``allocate_alpha`` with the ``block_wise`` mapping, one ratio per block in block-index order."""
    per_matrix = allocate_alpha(alphas_per_matrix, block_of_matrix, numel_of_matrix, sparsity, epsilon)
    first = {}
    for block, ratio in zip(block_of_matrix, per_matrix):
        first.setdefault(int(block), ratio)
    return [first[block] for block in sorted(first)]
