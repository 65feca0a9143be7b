"""WeLore rank planning: one global threshold on normalised singular values.

WeLore (Jaiswal et al., 2024, arXiv 2407.11239; reference ``utils.py::adaptive_rank_pruning``)
normalises every matrix's singular values to [0, 1] and prunes, in every matrix, the ranks whose
normalised value lies below one global threshold τ. Matrices with a fast-decaying (heavy-tailed)
spectrum lose many ranks, flat ones lose few: that is where the non-uniform allocation comes from.

The reference looks τ up in a table fitted to LLaMA-2 only; here τ is solved for any model so that
the pruned ranks hit a target fraction of Σ min(m, n) (:func:`find_global_tau`).

Two reductions are reported and they differ (methods.md §6.2):

* rank reduction      = Σ p / Σ min(m, n)            (what WeLore calls "compression")
* parameter reduction = 1 − Σ params_after / Σ m·n   (what the checkpoint size sees)

and each exists *planned* (every matrix pruned as τ says) and *applied* (only matrices that are
really factorised, the LRCs of §6.3, lose ranks; the others stay dense).

Everything here is pure arithmetic on singular values and shapes: no model, no SVD.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from compresskit.errors import InputError

# Reference table (``welore_rank_reduction.py``): target rank reduction in percent -> τ.
# Fitted to LLaMA-2-7B/13B only; for any other model use :func:`find_global_tau`.
WELORE_TAU_TABLE: dict[int, float] = {
    10: 0.0225,
    20: 0.084,
    30: 0.115,
    40: 0.145,
    50: 0.175,
    60: 0.215,
    70: 0.26,
}

DEFAULT_MIN_RATIO = 0.5


def normalised_spectrum(sigma: torch.Tensor) -> torch.Tensor:
    """σ̂ = (σ − min σ) / (max σ − min σ), in float64, same order as ``sigma``.

    The smallest singular value maps to exactly 0 and the largest to exactly 1, so any τ in (0, 1]
    prunes at least one rank and keeps at least one in every matrix.

    A constant spectrum (max = min: an orthogonal or all-zero matrix, or a single singular value)
    has no decay to exploit; the reference divides 0 by 0 and its NaNs are never below τ, so
    nothing is pruned. We keep that behaviour without NaNs by defining σ̂ = 1 everywhere.

    float64 keeps distinct fp32 singular values distinct after normalisation, so thresholds placed
    between them (see :func:`find_global_tau`) are unambiguous.
    """
    s = sigma.detach().to(device="cpu", dtype=torch.float64).flatten()
    if s.numel() == 0:
        raise ValueError("empty spectrum")
    lo, hi = s.min(), s.max()
    if hi == lo:
        return torch.ones_like(s)
    return (s - lo) / (hi - lo)


def ranks_pruned(sigma: torch.Tensor, tau: float) -> int:
    """p(τ) = #{σ̂ < τ}: ranks WeLore removes from one matrix (strict ``<``, as the reference)."""
    return int((normalised_spectrum(sigma) < tau).sum())


def find_global_tau(spectra: Mapping[str, torch.Tensor], target_rank_reduction: float) -> float:
    """The τ whose achieved rank reduction Σ p(τ) / Σ min(m, n) is closest to the target.

    p(τ) is a step function, so instead of bisecting on a real interval we solve exactly: pool the
    σ̂ of every matrix (one value per rank, N = Σ min(m, n) values) and sort them. The count
    achieved by τ is ``#{σ̂ < τ}``, a left-bisection into that sorted array, and it can only change
    at one of the pooled values. Every achievable count is therefore the first index c of a distinct
    value u; we take the count nearest to T = target·N (ties: the smaller one, the milder pruning)
    and return τ halfway between u and the distinct value below it, so that re-computing σ̂ with
    tiny rounding differences cannot move a value across τ.

    Cost: one sort of N values (N ≈ 0.9 M for LLaMA-2-7B), exact, with no tolerance to choose.

    Guarantee: τ ≤ 1 keeps every matrix's top rank, so counts range over [0, N − #matrices]. When
    the only ties among pooled values are each matrix's own 0 and 1 (true for real weights), the
    achievable counts are 0, #matrices, #matrices+1, …, N − #matrices, so the achieved count is
    within #matrices (one rank per matrix) of T. Larger exact ties (flat spectra, repeated singular
    values) create bigger steps; the result is still the closest achievable.
    """
    if not 0.0 < target_rank_reduction < 1.0:
        raise InputError(
            f"rank reduction must be in (0, 1), got {target_rank_reduction:g}; "
            "pass e.g. --rank-reduction 0.5"
        )
    if not spectra:
        raise InputError("no matrices to plan ranks for; the model has no low-rank candidates")
    pooled = torch.cat([normalised_spectrum(s) for s in spectra.values()])
    values, _ = torch.sort(pooled)
    total = values.numel()
    target_count = target_rank_reduction * total

    distinct = torch.unique_consecutive(values)
    distinct = distinct[distinct <= 1.0]
    # counts[j] = #{σ̂ < distinct[j]}: the pruned count for τ in (distinct[j-1], distinct[j]].
    counts = torch.searchsorted(values, distinct, side="left")
    best = int(torch.argmin((counts.to(torch.float64) - target_count).abs()))  # first = smaller
    if best == 0:
        return 0.0  # prune nothing: the target is below half of the first step
    return float((distinct[best - 1] + distinct[best]) / 2)


def achieved_rank_reduction(spectra: Mapping[str, torch.Tensor], tau: float) -> float:
    """Σ p(τ) / Σ min(m, n) over all matrices (the reference's "Attempted Rank Reduction")."""
    pruned = sum(ranks_pruned(s, tau) for s in spectra.values())
    return pruned / sum(s.numel() for s in spectra.values())


@dataclass(frozen=True)
class RankPlan:
    """What the plan does to one matrix W [out, in] (m = out, n = in).

    ``pruned`` is the planned p; ``kept_rank`` is the rank W has *after* the plan is applied:
    min(m, n) − p for an LRC, min(m, n) for a matrix that stays dense. Parameter counts are
    weights only (a bias is unchanged by factorisation).
    """

    name: str
    shape: tuple[int, int]
    full_rank: int
    pruned: int
    kept_rank: int
    is_lowrank: bool
    params_before: int
    params_after: int

    @property
    def planned_rank(self) -> int:
        """min(m, n) − p, the rank τ asks for, whether or not it is applied."""
        return self.full_rank - self.pruned

    @property
    def applied_pruned(self) -> int:
        """Ranks really removed: p for an LRC, 0 for a dense matrix."""
        return self.full_rank - self.kept_rank


def is_lowrank_component(shape: tuple[int, int], pruned: int, min_ratio: float) -> bool:
    """LRC rule (methods.md §6.3): factorise W iff p / min(m, n) > min_ratio AND k·(m+n) < m·n.

    The first condition is WeLore's (``do_rank_reduction``); the second makes sure the factors
    U [m, k] and V [k, n] really hold fewer parameters than W, i.e. k < m·n / (m+n), which for a
    square matrix is k < n/2 but for 1536×576 is k < 418.9 (pruning ≈ 27 % of the rank already
    saves).
    """
    m, n = shape
    full = min(m, n)
    k = full - pruned
    return pruned / full > min_ratio and k * (m + n) < m * n


@dataclass(frozen=True)
class WeLorePlan:
    """Per-matrix rank plans plus the reductions they add up to.

    ``tau`` is None for the uniform baseline. ``planned_*`` count every matrix as τ prunes it
    (``planned_param_reduction`` assumes every pruned matrix is factorised, as the reference's
    ``--min_ratio 0`` script does; it can be negative). ``applied_*`` count only the LRCs.
    """

    method: str
    tau: float | None
    target_rank_reduction: float
    min_ratio: float
    matrices: list[RankPlan] = field(default_factory=list)

    @property
    def total_rank(self) -> int:
        return sum(p.full_rank for p in self.matrices)

    @property
    def planned_rank_reduction(self) -> float:
        return sum(p.pruned for p in self.matrices) / self.total_rank

    @property
    def applied_rank_reduction(self) -> float:
        return sum(p.applied_pruned for p in self.matrices) / self.total_rank

    @property
    def params_before(self) -> int:
        return sum(p.params_before for p in self.matrices)

    @property
    def params_after(self) -> int:
        return sum(p.params_after for p in self.matrices)

    @property
    def planned_param_reduction(self) -> float:
        after = sum(p.planned_rank * sum(p.shape) for p in self.matrices)
        return 1.0 - after / self.params_before

    @property
    def applied_param_reduction(self) -> float:
        return 1.0 - self.params_after / self.params_before

    @property
    def rank_map(self) -> dict[str, int]:
        """Full module name -> kept rank, for the factorised matrices only (checkpoint manifest)."""
        return {p.name: p.kept_rank for p in self.matrices if p.is_lowrank}

    def summary(self) -> dict[str, object]:
        """JSON-ready report: both reductions, planned and applied, and the per-matrix ranks."""
        return {
            "method": self.method,
            "tau": self.tau,
            "target_rank_reduction": self.target_rank_reduction,
            "min_ratio": self.min_ratio,
            "planned_rank_reduction": self.planned_rank_reduction,
            "applied_rank_reduction": self.applied_rank_reduction,
            "planned_param_reduction": self.planned_param_reduction,
            "applied_param_reduction": self.applied_param_reduction,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "matrices": [
                {
                    "name": p.name,
                    "shape": list(p.shape),
                    "full_rank": p.full_rank,
                    "planned_rank": p.planned_rank,
                    "kept_rank": p.kept_rank,
                    "lowrank": p.is_lowrank,
                }
                for p in self.matrices
            ],
        }


def _check_min_ratio(min_ratio: float) -> None:
    if not 0.0 <= min_ratio < 1.0:
        raise InputError(f"--min-ratio must be in [0, 1), got {min_ratio:g}; the default is 0.5")


def _matrix_plan(name: str, shape: tuple[int, int], pruned: int, min_ratio: float) -> RankPlan:
    m, n = int(shape[0]), int(shape[1])
    full = min(m, n)
    lowrank = is_lowrank_component((m, n), pruned, min_ratio)
    kept = full - pruned if lowrank else full
    return RankPlan(
        name=name,
        shape=(m, n),
        full_rank=full,
        pruned=pruned,
        kept_rank=kept,
        is_lowrank=lowrank,
        params_before=m * n,
        params_after=kept * (m + n) if lowrank else m * n,
    )


def _finish(plan: WeLorePlan) -> WeLorePlan:
    if not any(p.is_lowrank for p in plan.matrices):
        raise InputError(
            f"no matrix qualifies for low rank at rank reduction {plan.target_rank_reduction:g} "
            f"with --min-ratio {plan.min_ratio:g}; raise --rank-reduction or lower --min-ratio"
        )
    return plan


def plan_ranks(
    spectra: Mapping[str, torch.Tensor],
    shapes: Mapping[str, tuple[int, int]],
    target: float,
    min_ratio: float = DEFAULT_MIN_RATIO,
) -> WeLorePlan:
    """WeLore plan: solve the global τ for ``target`` rank reduction, then apply the LRC rule.

    ``spectra[name]`` are the singular values of the weight ``shapes[name] = (out, in)``, so each
    must have min(out, in) entries (a mismatch means a stale singular-value cache).
    """
    _check_min_ratio(min_ratio)
    if set(spectra) != set(shapes):
        missing = sorted(set(spectra) ^ set(shapes))
        raise InputError(
            f"singular values and weight shapes name different matrices ({missing[0]}, ...); "
            "recompute the singular values for this model"
        )
    for name, sigma in spectra.items():
        if sigma.numel() != min(shapes[name]):
            raise InputError(
                f"{name} has {sigma.numel()} singular values but its shape {tuple(shapes[name])} "
                f"needs {min(shapes[name])}; the singular-value cache is stale, recompute it"
            )
    tau = find_global_tau(spectra, target)
    matrices = [
        _matrix_plan(name, shapes[name], ranks_pruned(spectra[name], tau), min_ratio)
        for name in spectra
    ]
    return _finish(WeLorePlan("welore", tau, target, min_ratio, matrices))


def uniform_pruned(full_rank: int, target: float) -> int:
    """round(target · min(m, n)), capped at min(m, n) − 1 so at least one rank survives."""
    return min(int(round(target * full_rank)), full_rank - 1)


def uniform_plan(
    shapes: Mapping[str, tuple[int, int]],
    target: float,
    min_ratio: float = DEFAULT_MIN_RATIO,
) -> WeLorePlan:
    """Baseline of the WeLore paper: every matrix loses the same fraction of its rank.

    Same LRC rule as :func:`plan_ranks`, so the two compare like for like.
    """
    if not 0.0 < target < 1.0:
        raise InputError(
            f"rank reduction must be in (0, 1), got {target:g}; pass e.g. --rank-reduction 0.5"
        )
    _check_min_ratio(min_ratio)
    if not shapes:
        raise InputError("no matrices to plan ranks for; the model has no low-rank candidates")
    matrices = [
        _matrix_plan(name, shape, uniform_pruned(min(shape), target), min_ratio)
        for name, shape in shapes.items()
    ]
    return _finish(WeLorePlan("uniform", None, target, min_ratio, matrices))
