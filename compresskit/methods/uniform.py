"""Uniform allocation: every block gets the target sparsity (the Wanda / SparseGPT papers' setting).

``--method wanda|sparsegpt|magnitude`` means uniform allocation with that pruner;
``--method uniform --pruner X`` is the same thing spelled out.
"""

from __future__ import annotations

from .base import MethodResult, NoOptions, PruneJob, register


def _run(job: PruneJob, config: NoOptions, name: str) -> MethodResult:
    from .sparsify import prune_blocks

    n = job.adapter.num_blocks
    ratio = job.pattern.sparsity if job.pattern.kind == "nm" else job.sparsity
    details = prune_blocks(job, [ratio] * n)
    return MethodResult(
        method=name,
        config={},
        block_ratios=[ratio] * n,
        details={"magnitude_fallback": details["magnitude_fallback"]},
        timings={k: v for k, v in details.items() if k.endswith("_s")},
    )


def _needs_calibration(job: PruneJob, config) -> bool:
    return job.pruner != "magnitude"


for _pruner in ("magnitude", "wanda", "sparsegpt"):
    register(
        _pruner,
        NoOptions,
        f"uniform sparsity with the {_pruner} criterion",
        needs_calibration=_needs_calibration,
        default_pruner=_pruner,
    )(lambda job, config, _name=_pruner: _run(job, config, _name))

register(
    "uniform",
    NoOptions,
    "uniform sparsity with the --pruner criterion",
    needs_calibration=_needs_calibration,
)(lambda job, config: _run(job, config, "uniform"))
