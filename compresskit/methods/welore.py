"""WeLore — data-free, non-uniform low-rank compression (Jaiswal et al., 2024, arXiv 2407.11239).

methods.md §6: the singular values of every targeted decoder linear (fp32, on the job's device,
cached under a fingerprint of the weights) are normalised per matrix to [0, 1]; one global
threshold τ, solved for the requested *rank* reduction (``plan_ranks``; the reference's LLaMA-2
τ table is reported beside it as a cross-check), prunes p = #{σ̂ < τ} ranks of each matrix.
Matrices that lose more than ``--min-ratio`` of their rank, and whose factors really hold fewer
parameters than the dense weight, become ``LowRankLinear`` (the LRCs); the others stay dense.

With ``--merge`` the rank-k product U·V is written back into the dense weight instead: no saving
in memory or on disk, but a plain checkpoint that ``AutoModelForCausalLM`` loads anywhere, with
the same outputs as the factored model (up to the rounding of one fp32 product).

What is targeted: the ``nn.Linear`` modules ``--include`` / ``--exclude`` select among each
block's prunable linears. Routed experts stored *fused* (one 3-D tensor per block, transformers
≥ 5) are not ``nn.Linear`` modules and cannot be swapped one expert at a time, so they stay dense;
their block indices are listed in the details. Matrices already factorised by an earlier stage
are left as they are.

Composing with sparsity (e.g. OWL then WeLore in a recipe): the SVD of a sparse matrix has dense
factors, so an LRC loses the zeros of the earlier stage (its rank-k approximation is of the
*pruned* weight); N-LRC matrices keep their zeros. The measured sparsity in the manifest counts
the factors, so it shows exactly what is left.
"""

from __future__ import annotations

import time

from pydantic import Field, field_validator

from ..errors import InputError
from .base import MethodConfig, MethodResult, PruneJob, register

#: = ``lowrank.plan.DEFAULT_MIN_RATIO``, written here so the CLI's help needs no torch
#: (``tests/test_startup.py`` checks that the two agree)
DEFAULT_MIN_RATIO = 0.5


class WeLoreConfig(MethodConfig):
    rank_reduction: float | None = Field(
        None, validate_default=True, json_schema_extra={"flag": "--rank-reduction"},
        description="Target rank reduction in (0, 1): the fraction of Σ min(m, n) over all targeted "
                    "matrices to remove (WeLore's 'compression'; parameter reduction is reported too).",
    )
    min_ratio: float = Field(
        DEFAULT_MIN_RATIO, ge=0, lt=1, json_schema_extra={"flag": "--min-ratio"},
        description="A matrix is factorised only if it loses more than this fraction of its rank "
                    "(the fine-tuning scripts' 0.4999; 0.0 factorises every reduced matrix).",
    )
    merge: bool = Field(
        False, json_schema_extra={"flag": "--merge"},
        description="Write U·V back into dense weights: no saving, but loads with plain transformers.",
    )
    uniform: bool = Field(
        False, json_schema_extra={"flag": "--welore-uniform"},
        description="Baseline: remove the same fraction of rank from every matrix instead of one global τ.",
    )

    @field_validator("rank_reduction")
    @classmethod
    def _in_open_unit_interval(cls, value: float | None) -> float:
        if value is None:
            raise ValueError("--method welore needs --rank-reduction R with 0 < R < 1, e.g. 0.5")
        if not 0.0 < value < 1.0:
            raise ValueError(f"--rank-reduction must be in (0, 1), got {value:g}; e.g. 0.5 removes half the ranks")
        return value


def _factorised_prefixes(model: nn.Module) -> tuple[str, ...]:
    from ..lowrank.layer import LowRankLinear

    return tuple(f"{name}." for name, m in model.named_modules() if isinstance(m, LowRankLinear))


def welore_targets(job: PruneJob) -> dict[str, nn.Linear]:
    """Full name -> ``nn.Linear`` of every matrix WeLore may factorise, in block order.

    Called outside ``unfused_experts``: fused routed experts are not ``nn.Linear`` and stay dense.
    The U / V children of an existing ``LowRankLinear`` are skipped.
    """
    from .sparsify import target_linears

    done = _factorised_prefixes(job.model)
    targets: dict[str, nn.Linear] = {}
    for i in range(job.adapter.num_blocks):
        prefix = job.adapter.block_name(i)
        for local, module in target_linears(job, i).items():
            name = f"{prefix}.{local}"
            if not name.startswith(done):
                targets[name] = module
    return targets


def fused_expert_blocks(job: PruneJob) -> list[int]:
    """Blocks whose routed experts are fused tensors (left dense by WeLore)."""
    blocks = []
    for i in range(job.adapter.num_blocks):
        view = job.adapter.moe(i) if hasattr(job.adapter, "moe") else None
        if view is not None and view.fused:
            blocks.append(i)
    return blocks


def welore_spectra(job: PruneJob) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, int]]]:
    """Singular values (fp32, descending, CPU) and (out, in) shapes of every WeLore target.

    Computed on ``job.device`` and cached under a fingerprint of the weights themselves, so a
    fine-tuned or pruned model never reuses another model's values (the reference caches without
    any key, methods.md §6.4).
    """
    from ..analysis.spectra import model_singular_values, weights_fingerprint
    from .sparsify import onloaded_weights

    targets = welore_targets(job)
    if not targets:
        raise InputError("no decoder linear to factorise; check --include / --exclude")
    # Block by block through onload (a lazily loaded model holds one block at a time); fused
    # routed experts are not targets, so the experts stay fused here.
    key = weights_fingerprint(onloaded_weights(job, "cpu", unfused=False, only=targets))
    spectra = model_singular_values(onloaded_weights(job, unfused=False, only=targets), cache_key=key,
                                    device=job.device, progress=job.progress is None)
    shapes = {name: (module.out_features, module.in_features) for name, module in targets.items()}
    return spectra, shapes


def make_plan(spectra, shapes, rank_reduction: float, min_ratio: float, uniform: bool) -> WeLorePlan:
    """The WeLore plan (one global τ) or the uniform baseline on the same matrices."""
    from ..lowrank.plan import plan_ranks, uniform_plan

    if uniform:
        return uniform_plan(shapes, rank_reduction, min_ratio)
    return plan_ranks(spectra, shapes, rank_reduction, min_ratio)


def _per_block(job: PruneJob, rank_map: dict[str, int]):
    """``(block module, {name: rank} of that block)`` for every block holding planned matrices."""
    for i in range(job.adapter.num_blocks):
        prefix = job.adapter.block_name(i) + "."
        ranks = {name: rank for name, rank in rank_map.items() if name.startswith(prefix)}
        if ranks:
            yield job.adapter.block(i), ranks


def merge_lowrank(job: PruneJob, plan: WeLorePlan, spectra) -> dict[str, int]:
    """``--merge``: overwrite each LRC's dense weight by its rank-k truncation U·V (same module)."""
    import torch

    from ..lowrank.layer import LowRankLinear
    from ..models.placement import onload

    rank_map = plan.rank_map
    for block, ranks in _per_block(job, rank_map):
        with onload(block, job.device), torch.no_grad():
            for name, rank in ranks.items():
                linear = job.model.get_submodule(name)
                factors = LowRankLinear.from_linear(linear, rank, spectra.get(name), svd_device=job.device)
                linear.weight.copy_(factors.merged_weight())
    return rank_map


def factorise(job: PruneJob, plan: WeLorePlan, spectra) -> dict[str, int]:
    """Swap each LRC for its ``LowRankLinear``, block by block inside ``onload`` (the new factors
    are kept: released with the block, or spilled for a lazily loaded model)."""
    from ..lowrank.layer import replace_with_lowrank
    from ..models.placement import onload

    for block, ranks in _per_block(job, plan.rank_map):
        with onload(block, job.device):
            replace_with_lowrank(job.model, ranks, spectra=spectra, svd_device=job.device)
    return plan.rank_map


def run_welore(job: PruneJob, config: WeLoreConfig) -> MethodResult:
    from ..lowrank.plan import WELORE_TAU_TABLE

    t0 = time.perf_counter()
    spectra, shapes = welore_spectra(job)
    svd_s = time.perf_counter() - t0
    plan = make_plan(spectra, shapes, config.rank_reduction, config.min_ratio, config.uniform)
    t0 = time.perf_counter()
    if config.merge:
        rank_map = merge_lowrank(job, plan, spectra)
    else:
        rank_map = factorise(job, plan, spectra)
    factorise_s = time.perf_counter() - t0
    if job.progress is not None:
        job.progress("welore", len(rank_map), len(rank_map), f"{len(rank_map)} matrices factorised")

    details = plan.summary()
    percent = round(config.rank_reduction * 100)
    details.update(
        rank_map=rank_map,
        merged=config.merge,
        # Cross-check only: the reference's τ for LLaMA-2 at this target (None off its grid).
        tau_llama2_table=WELORE_TAU_TABLE.get(percent) if abs(percent - config.rank_reduction * 100) < 1e-9 else None,
        fused_expert_blocks_kept_dense=fused_expert_blocks(job),
    )
    structure = [] if config.merge else [{"kind": "lowrank", "ranks": dict(rank_map)}]
    return MethodResult(
        method="welore",
        config=config.model_dump(),
        block_ratios=None,
        details=details,
        structure=structure,
        timings={"singular_values_s": svd_s, "factorise_s": factorise_s},
    )


register(
    "welore", WeLoreConfig,
    "WeLore: data-free non-uniform low-rank factors (--rank-reduction, --min-ratio, --merge)",
    needs_calibration=lambda job, cfg: False,
    kind="structural",
)(run_welore)
