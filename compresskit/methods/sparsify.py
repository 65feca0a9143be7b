"""The sequential unstructured / N:M pruning pass, given a sparsity (or N:M pattern) per block.

Every allocation method (uniform, OWL, AlphaPruning) ends here: it decides the per-block ratios
and this pass applies the within-matrix criterion of the chosen pruner (magnitude, Wanda,
SparseGPT) block by block, with the pruned block's outputs feeding the next block (methods.md
§1.3). All linears of a block are pruned from statistics of the same forward pass, as the
references do (no "true-sequential" inside a block).
"""

from __future__ import annotations

import re
import time
from contextlib import nullcontext
from typing import Callable

import torch
from torch import nn

from ..engine import SequentialRunner
from ..errors import InputError
from ..pruning import PRUNERS, Pattern, check_divisible
from .base import PruneJob


def target_linears(job: PruneJob, block_index: int) -> dict[str, nn.Linear]:
    """The block's prunable linears after --include / --exclude (regexes on full module names)."""
    adapter = job.adapter
    prefix = adapter.block_name(block_index)
    chosen = {}
    for local, module in adapter.prunable_linears(block_index).items():
        full = f"{prefix}.{local}"
        if job.include and not re.search(job.include, full):
            continue
        if job.exclude and re.search(job.exclude, full):
            continue
        chosen[local] = module
    return chosen


def validate_pattern(job: PruneJob, patterns: list[Pattern]) -> None:
    """N:M must divide the input dimension of every targeted linear; fail before any work."""
    for i in range(job.adapter.num_blocks):
        pattern = patterns[i]
        if pattern.kind != "nm":
            continue
        with _expert_scope(job, i):
            for local, module in target_linears(job, i).items():
                try:
                    check_divisible(module.in_features, pattern)
                except InputError as exc:
                    raise InputError(f"{job.adapter.block_name(i)}.{local}: {exc}") from None


def _expert_scope(job: PruneJob, i: int):
    unfuse = getattr(job.adapter, "unfused_experts", None)
    return unfuse(i) if unfuse is not None else nullcontext()


def _runner(job: PruneJob, calib, report) -> SequentialRunner:
    """The engine over the job's calibration samples, with fused experts presented per expert."""
    return SequentialRunner(
        job.adapter,
        calib.input_ids,
        calib.attention_mask,
        device=job.device,
        batch_size=job.batch_size,
        offload_activations=job.offload_activations,
        progress=report,
        block_context=lambda i: _expert_scope(job, i),
    )


def _stat_factory(needs: str):
    from ..pruning import HessianStat, SquaredNormStat

    if needs == "sq_norm":
        return lambda n, device: SquaredNormStat(n)
    if needs == "hessian":
        return lambda n, device: HessianStat(n)
    raise ValueError(needs)


def prune_blocks(
    job: PruneJob,
    ratios: list[float | dict[str, float]],
    patterns: list[Pattern] | None = None,
    pruner: str | None = None,
) -> dict:
    """Prune every block ``i`` to ``ratios[i]`` (or ``patterns[i]`` for N:M) with the job's pruner.

    ``ratios[i]`` is one sparsity for the whole block or a dict local-name → sparsity (per-matrix
    allocations such as AlphaPruning's ``matrix_wise`` mapping).

    Returns timing and diagnostic details (e.g. how many matrices fell back to magnitude because
    no calibration token reached them — a routed expert no sample was sent to).
    """
    spec = PRUNERS[pruner or job.pruner]
    n_blocks = job.adapter.num_blocks
    patterns = patterns or [job.pattern] * n_blocks
    details = {"magnitude_fallback": [], "prune_s": 0.0}

    def prune_matrix(block: int, local: str, module: nn.Linear, stat) -> None:
        ratio, pattern = ratios[block], patterns[block]
        if isinstance(ratio, dict):
            ratio = ratio[local]
        if pattern.kind != "nm" and ratio <= 0:
            return
        name = f"{job.adapter.block_name(block)}.{local}"
        t0 = time.perf_counter()
        if stat is None and spec.needs != "none":
            details["magnitude_fallback"].append(name)
            PRUNERS["magnitude"].prune(module.weight.data, None, ratio, pattern)
        else:
            spec.prune(module.weight.data, stat, ratio, pattern, **job.pruner_options)
        details["prune_s"] += time.perf_counter() - t0

    def report(done: int, total: int, label: str) -> None:
        if job.progress is not None:
            job.progress(f"prune ({spec.name})", done, total, label)

    if spec.needs == "none":
        # Magnitude needs no data: no forward passes at all.
        for i in range(n_blocks):
            with _expert_scope(job, i):
                for local, module in target_linears(job, i).items():
                    prune_matrix(i, local, module, None)
            report(i + 1, n_blocks, job.adapter.block_name(i))
        return details

    calib = job.calibration_data()
    factory = _stat_factory(spec.needs)

    def visit(ctx) -> bool:
        linears = target_linears(job, ctx.index)
        if not linears:
            return False
        collector = ctx.collect_input_stats(linears, factory)
        for local, module in linears.items():
            stat = collector.stats.get(local)
            value = stat.value() if stat is not None and collector.samples[local] > 0 else None
            prune_matrix(ctx.index, local, module, value)
        return True

    runner = _runner(job, calib, report)
    timings = runner.run(visit)
    runner.release()
    details.update(capture_s=timings.capture_s, forward_s=timings.forward_s)
    return details


def collect_block_statistics(
    job: PruneJob, reduce: Callable[[int, dict[str, nn.Linear], dict[str, torch.Tensor]], object], needs: str = "sq_norm"
) -> list:
    """A measuring pass over the *dense* model: per block, ``reduce(i, linears, stats)`` → value.

    Used by OWL's first pass (Wanda statistics → outlier ratio per block). Nothing is modified,
    so each block's outputs from the statistics forward are reused as the next block's inputs.
    """
    calib = job.calibration_data()
    factory = _stat_factory(needs)
    values: list = []

    def visit(ctx) -> bool:
        linears = target_linears(job, ctx.index)
        collector = ctx.collect_input_stats(linears, factory)
        stats = {k: s.value() for k, s in collector.stats.items() if collector.samples[k] > 0}
        values.append(reduce(ctx.index, linears, stats))
        return False

    def report(done: int, total: int, label: str) -> None:
        if job.progress is not None:
            job.progress("measure", done, total, label)

    runner = _runner(job, calib, report)
    runner.run(visit)
    runner.release()
    return values
