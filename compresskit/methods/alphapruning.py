"""AlphaPruning (Lu et al., NeurIPS 2024): layerwise sparsity from heavy-tailed weight spectra.

Per decoder linear: eigenvalues λ = σ² of W (fp32, on the GPU when present, cached per model),
the Hill estimator ``alpha_peak`` (xmin at the log-histogram peak, KS-selected) as the reference
computes it; block-wise mean α mapped linearly to [1−ε, 1+ε] and rescaled so exactly S of all
decoder-linear weights are pruned. Smaller α (heavier tail, "better trained") ⇒ less pruning.
No calibration data is used for the allocation; the pruner (default Wanda) uses it as usual.
The reference has no N:M variant, so neither does this method.
"""

from __future__ import annotations

from pydantic import Field

from ..errors import InputError
from .base import MethodConfig, MethodResult, PruneJob, register


class AlphaConfig(MethodConfig):
    alpha_epsilon: float = Field(
        0.3, ge=0, lt=1, json_schema_extra={"flag": "--alpha-epsilon"},
        description="ε: block ratios are mapped to [S(1-ε), S(1+ε)] before rescaling (argparse default 0.3; "
                    "the scripts use 0.2-0.5 per model and pruner).",
    )
    alpha_metric: str = Field(
        "alpha_peak", json_schema_extra={"flag": "--alpha-metric"},
        description="Spectral metric: alpha_peak (PL_Alpha_Hill, the paper's) or alpha_mid.",
    )
    alpha_mapping: str = Field(
        "block_wise", json_schema_extra={"flag": "--alpha-mapping"},
        description="block_wise (one ratio per block, the reference default) or matrix_wise.",
    )


def matrix_alphas(job: PruneJob, metric: str) -> tuple[list[str], list[int], list[int], list[float]]:
    """(full names, block index, numel, α) of every targeted decoder linear, in block order.

    Weights are read block by block through ``onload`` (twice: the cache fingerprint, then the
    spectra), so a lazily loaded model never holds more than one block."""
    from ..allocation.alpha import esd_metric
    from ..analysis.spectra import model_singular_values, weights_fingerprint
    from .sparsify import expert_scope, onloaded_weights, target_linears

    names, blocks, numels = [], [], []
    for i in range(job.adapter.num_blocks):
        with expert_scope(job, i):
            for local, module in target_linears(job, i).items():
                names.append(f"{job.adapter.block_name(i)}.{local}")
                blocks.append(i)
                numels.append(module.weight.numel())
    key = weights_fingerprint(onloaded_weights(job, "cpu"))
    sigma = model_singular_values(onloaded_weights(job), cache_key=key, device=job.device,
                                  progress=job.progress is None)
    alphas = [esd_metric(sigma[n].double() ** 2, metric) for n in names]
    return names, blocks, numels, alphas


def run_alphapruning(job: PruneJob, config: AlphaConfig) -> MethodResult:
    from ..allocation.alpha import MAPPINGS, allocate_alpha
    from .sparsify import prune_blocks

    if job.pattern.kind == "nm":
        raise InputError("AlphaPruning allocates unstructured sparsity; N:M is not defined for it (use --method owl for N:M)")
    if config.alpha_mapping not in MAPPINGS:
        raise InputError(f"--alpha-mapping must be one of {', '.join(MAPPINGS)}")
    names, blocks, numels, alphas = matrix_alphas(job, config.alpha_metric)
    per_matrix = allocate_alpha(alphas, blocks, numels, job.sparsity, config.alpha_epsilon, config.alpha_mapping)
    n = job.adapter.num_blocks
    ratios: list[dict[str, float]] = [{} for _ in range(n)]
    for name, b, r in zip(names, blocks, per_matrix):
        ratios[b][name.removeprefix(job.adapter.block_name(b) + ".")] = r
    block_ratio = []
    for b in range(n):
        sizes = [s for s, bb in zip(numels, blocks) if bb == b]
        rs = [r for r, bb in zip(per_matrix, blocks) if bb == b]
        block_ratio.append(sum(s * r for s, r in zip(sizes, rs)) / sum(sizes) if sizes else 0.0)
    result = prune_blocks(job, ratios)
    block_alpha = []
    for b in range(n):
        vals = [a for a, bb in zip(alphas, blocks) if bb == b]
        block_alpha.append(sum(vals) / len(vals) if vals else None)
    return MethodResult(
        method="alphapruning",
        config=config.model_dump(),
        block_ratios=block_ratio,
        details={"alpha_block_mean": block_alpha, "alpha_per_matrix": dict(zip(names, alphas)),
                 "magnitude_fallback": result["magnitude_fallback"]},
        timings={k: v for k, v in result.items() if k.endswith("_s")},
    )


register(
    "alphapruning", AlphaConfig,
    "AlphaPruning: layerwise sparsity from heavy-tailed spectra (Hill α) + --pruner (default wanda)",
    needs_calibration=lambda job, cfg: job.pruner != "magnitude",
)(run_alphapruning)
