"""OWL — Outlier Weighed Layerwise sparsity (Yin et al., ICML 2024), and OWLed.

Pass 1 measures, on the *dense* model, each block's layerwise outlier distribution
``D_ℓ = 100·#{a > M·mean(a)}/len(a)`` over the Wanda scores ``a = |W|·‖X‖`` of all the block's
linears concatenated (Wanda statistics even when the pruner is SparseGPT or magnitude, as the
reference does). ``allocate_owl`` turns D into one sparsity per block (mean = S, spread 2λ, more
outliers ⇒ less pruning); pass 2 is the ordinary sequential pass of the chosen pruner with those
ratios. With an N:M pattern, OWL's structured variant gives each block its own N (§3.1).

OWLed (Li, Yin, Wang 2024) released no code; it is OWL with domain calibration data (any
``--calib`` source, typically a local jsonl of domain prompts) and ``--include``/``--exclude``
filters that keep an encoder / projector dense. It is registered as its own name so manifests
say which one ran.
"""

from __future__ import annotations

from pydantic import Field

from ..errors import InputError
from .base import MethodConfig, MethodResult, PruneJob, register


class OWLConfig(MethodConfig):
    owl_m: float = Field(
        5.0, gt=0, json_schema_extra={"flag": "--owl-m"},
        description="Outlier threshold M: a score is an outlier above M x the block mean "
                    "(paper/README 5; the reference's argparse default is 3).",
    )
    owl_lambda: float = Field(
        0.08, ge=0, json_schema_extra={"flag": "--owl-lambda"},
        description="λ: block sparsities spread over [S-λ, S+λ] (unstructured); for N:M, the spread "
                    "in zeros per M (README 5:8 example: 2).",
    )


def outlier_ratios(job: PruneJob, m: float) -> list[float | None]:
    """OWL pass 1: D per block on the dense model (None for a block with nothing to prune)."""
    from ..allocation.owl import block_outlier_ratio
    from .sparsify import collect_block_statistics

    def reduce(i, linears, stats):
        names = [k for k in linears if k in stats]
        if not names:
            return None
        return block_outlier_ratio([linears[k].weight for k in names], [stats[k] for k in names], m)

    return collect_block_statistics(job, reduce, needs="sq_norm")


def block_params(job: PruneJob) -> list[int]:
    """Each block's targeted decoder-linear parameters (shapes only, no weight read): the weights
    of the budget, which blocks of unequal size (MoE, condensed, removed sublayers, low rank) need."""
    from .sparsify import expert_scope, target_linears

    sizes = []
    for i in range(job.adapter.num_blocks):
        with expert_scope(job, i):
            sizes.append(sum(module.weight.numel() for module in target_linears(job, i).values()))
    return sizes


def run_owl(job: PruneJob, config: OWLConfig, name: str = "owl") -> MethodResult:
    from ..allocation.owl import allocate_owl, allocate_owl_nm
    from ..pruning import Pattern
    from .sparsify import prune_blocks

    D = outlier_ratios(job, config.owl_m)
    active = [i for i, d in enumerate(D) if d is not None]
    if not active:
        raise InputError("no decoder linear is left to prune after --include/--exclude")
    Dact = [D[i] for i in active]
    sizes = block_params(job)
    size_act = [sizes[i] for i in active]
    n = job.adapter.num_blocks
    details = {"outlier_ratio_D": D, "block_params": sizes}
    if job.pattern.kind == "nm":
        zeros = allocate_owl_nm(Dact, job.pattern.n, job.pattern.m, config.owl_lambda, size_act)
        patterns = [Pattern.unstructured()] * n
        ratios: list[float] = [0.0] * n
        per_block_n: list[int | None] = [None] * n
        for i, z in zip(active, zeros):
            per_block_n[i] = z
            if z > 0:
                patterns[i] = Pattern.nm(z, job.pattern.m)
            ratios[i] = z / job.pattern.m
        details["zeros_per_m"] = per_block_n
        result = prune_blocks(job, ratios, patterns)
    else:
        alloc = allocate_owl(Dact, job.sparsity, config.owl_lambda, size_act)
        ratios = [0.0] * n
        for i, r in zip(active, alloc):
            ratios[i] = r
        result = prune_blocks(job, ratios)
    details["magnitude_fallback"] = result["magnitude_fallback"]
    return MethodResult(
        method=name,
        config=config.model_dump(),
        block_ratios=ratios,
        details=details,
        timings={k: v for k, v in result.items() if k.endswith("_s")},
    )


register("owl", OWLConfig, "OWL: outlier-weighted layerwise sparsity + --pruner (default wanda)")(run_owl)
register("owled", OWLConfig, "OWLed: OWL with domain calibration (--calib) and module filters (--exclude)")(
    lambda job, config: run_owl(job, config, name="owled")
)
