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
from contextlib import AbstractContextManager, nullcontext
from typing import Callable

import torch
from torch import nn

from ..engine import SequentialRunner
from ..engine.distributed import assign_owners, batch_share, broadcast_, is_active, rank
from ..engine.memory_plan import (
    MemoryPlan,
    activation_bytes,
    batch_working_bytes,
    plan_memory,
    statistic_bytes,
)
from ..errors import InputError
from ..models.placement import onload
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


def onloaded_weights(job: PruneJob, device=None, unfused: bool = True, only=None):
    """``(full name, weight)`` of every targeted linear (or of those in ``only``), block by block,
    each block materialised through ``onload`` only while its weights are consumed (consume the
    generator fully)."""
    for i in range(job.adapter.num_blocks):
        with onload(job.adapter.block(i), device or job.device), (expert_scope(job, i) if unfused else nullcontext()):
            prefix = job.adapter.block_name(i)
            for local, module in target_linears(job, i).items():
                if only is None or f"{prefix}.{local}" in only:
                    yield f"{prefix}.{local}", module.weight.detach()


def check_selection(job: PruneJob) -> None:
    """--include / --exclude must leave at least one decoder linear to compress; fail before any work."""
    for i in range(job.adapter.num_blocks):
        with expert_scope(job, i):
            if target_linears(job, i):
                return
    given = " and ".join(f"--{k} {v!r}" for k, v in (("include", job.include), ("exclude", job.exclude)) if v)
    example = f"{job.adapter.block_name(0)}.{next(iter(job.adapter.prunable_linears(0)), '')}"
    verb = "select" if job.include and job.exclude else "selects"
    raise InputError(f"{given} {verb} no decoder linear to compress (names look like {example!r})")


def validate_pattern(job: PruneJob, patterns: list[Pattern]) -> None:
    """N:M must divide the input dimension of every targeted linear; fail before any work."""
    for i in range(job.adapter.num_blocks):
        pattern = patterns[i]
        if pattern.kind != "nm":
            continue
        with expert_scope(job, i):
            for local, module in target_linears(job, i).items():
                try:
                    check_divisible(module.in_features, pattern)
                except InputError as exc:
                    raise InputError(f"{job.adapter.block_name(i)}.{local}: {exc}") from None


def expert_scope(job: PruneJob, i: int):
    unfuse = getattr(job.adapter, "unfused_experts", None)
    return unfuse(i) if unfuse is not None else nullcontext()


def _runner(job: PruneJob, calib, report) -> SequentialRunner:
    """The engine over this rank's calibration samples, with fused experts presented per expert.

    In one process that is every sample; under ``torchrun`` each rank keeps a contiguous run of
    whole batches (``distributed.batch_share``) and statistics are summed over ranks.
    """
    share = batch_share(calib.input_ids.shape[0], job.batch_size)
    mask = calib.attention_mask
    return SequentialRunner(
        job.adapter,
        calib.input_ids[share],
        None if mask is None else mask[share],
        device=job.device,
        batch_size=job.batch_size,
        offload_activations=job.offload_activations,
        progress=report,
        block_context=lambda i: expert_scope(job, i),
    )


def _stat_factory(needs: str):
    from ..pruning import HessianStat, SquaredNormStat

    if needs == "sq_norm":
        return lambda n, device: SquaredNormStat(n)
    if needs == "hessian":
        return lambda n, device: HessianStat(n)
    raise ValueError(needs)


def _solve_cost(needs: str, module: nn.Linear) -> float:
    """Relative work of pruning one matrix, to spread the solves of a block over ranks evenly."""
    rows, cols = module.weight.shape
    if needs == "hessian":  # Cholesky of [in, in] + the column sweep over [out, in]
        return float(cols) ** 3 + float(rows) * float(cols) ** 2
    return float(rows) * float(cols)


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

    def prune_matrix(block: int, local: str, module: nn.Linear, stat, solve: bool = True) -> None:
        """Prune one matrix; with ``solve=False`` (another rank solves it) only record the decision."""
        ratio, pattern = ratios[block], patterns[block]
        if isinstance(ratio, dict):
            ratio = ratio[local]
        if pattern.kind != "nm" and ratio <= 0:
            return
        name = f"{job.adapter.block_name(block)}.{local}"
        if stat is None and spec.needs != "none":
            details["magnitude_fallback"].append(name)
        if not solve:
            return
        t0 = time.perf_counter()
        if stat is None and spec.needs != "none":
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
            with onload(job.adapter.block(i), job.device), expert_scope(job, i):
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
        collector.all_reduce()
        values, by_stat = {}, {}
        for local in linears:
            stat = collector.stats.get(local)
            if stat is not None and collector.samples[local] > 0:
                if id(stat) not in by_stat:  # q/k/v share one statistic: one fp32 value for all three
                    by_stat[id(stat)] = stat.value()
                values[local] = by_stat[id(stat)]
            else:
                values[local] = None
        # Data-parallel: each rank solves its share of the matrices, then every result is
        # broadcast from its owner, so all ranks hold the same pruned block.
        owners = assign_owners([_solve_cost(spec.needs, m) for m in linears.values()])
        for (local, module), owner in zip(linears.items(), owners):
            prune_matrix(ctx.index, local, module, values[local], solve=owner == rank())
        if is_active():
            for module, owner in zip(linears.values(), owners):
                broadcast_(module.weight.data, src=owner)
        return True

    runner = _runner(job, calib, report)
    timings = runner.run(visit)
    runner.release()
    details.update(capture_s=timings.capture_s, forward_s=timings.forward_s)
    return details


def collect_block_statistics(
    job: PruneJob, reduce: Callable[[int, dict[str, nn.Linear], dict[str, torch.Tensor]], object], needs: str = "sq_norm",
    propagate: Callable[[int, dict[str, nn.Linear]], AbstractContextManager] | None = None,
) -> list:
    """A measuring pass: per block, ``reduce(i, linears, stats)`` → value.

    Used by OWL's first pass (Wanda statistics → outlier ratio per block) and EvoPress's level
    database. Nothing is modified: without ``propagate`` each block's outputs from the statistics
    forward (the dense model's) are the next block's inputs; with it, the block is run again inside
    ``propagate(i, linears)`` (a context that swaps weights in and puts the same Parameters back)
    and those outputs go on, so later blocks see the inputs of the model ``propagate`` describes.
    """
    calib = job.calibration_data()
    factory = _stat_factory(needs)
    values: list = []

    def visit(ctx) -> bool:
        linears = target_linears(job, ctx.index)
        collector = ctx.collect_input_stats(linears, factory)
        collector.all_reduce()
        stats = {k: s.value() for k, s in collector.stats.items() if collector.samples[k] > 0}
        values.append(reduce(ctx.index, linears, stats))
        if propagate is not None:
            with propagate(ctx.index, linears):
                ctx.forward()
        return False

    def report(done: int, total: int, label: str) -> None:
        if job.progress is not None:
            job.progress("measure", done, total, label)

    runner = _runner(job, calib, report)
    runner.run(visit)
    runner.release()
    return values


def plan_activation_memory(job: PruneJob, budget: int | None, needs: str,
                           budget_name: str = "--max-gpu-memory") -> MemoryPlan:
    """Estimate the calibration pass's device memory for ``job`` and choose the activations' place.

    Shapes only (works on a lazily loaded model's meta tensors): the largest block's parameters
    and buffers, the widest linear output, the statistics of the pruner (``needs``) over the
    block's targeted linears, and this rank's share of the calibration samples.
    ``InputError`` naming the memory needed when one block does not fit in ``budget``.
    """
    adapter = job.adapter
    embeddings = adapter.model.get_input_embeddings().weight
    hidden, dtype_bytes = int(embeddings.shape[-1]), embeddings.element_size()
    spec = job.calibration
    nsamples, seqlen = (spec.nsamples, spec.seqlen) if spec is not None else (0, 0)
    share = batch_share(nsamples, job.batch_size)
    local = share.stop - share.start
    parameter_bytes, widest, stats = 0, hidden, 0
    for i in range(adapter.num_blocks):
        block = adapter.blocks[i]
        size = sum(t.numel() * t.element_size() for t in [*block.parameters(), *block.buffers()])
        parameter_bytes = max(parameter_bytes, size)
        with expert_scope(job, i):
            shapes = [tuple(m.weight.shape) for m in target_linears(job, i).values()]
        widest = max([widest, *(o for o, _ in shapes)])
        stats = max(stats, statistic_bytes(shapes, needs))
    return plan_memory(
        budget,
        parameter_bytes,
        batch_working_bytes(min(job.batch_size, max(local, 1)), seqlen, hidden, widest, dtype_bytes),
        stats,
        activation_bytes(local, seqlen, hidden, dtype_bytes),
        force_offload=job.offload_activations,
        budget_name=budget_name,
    )


def prepare_job(job: PruneJob, entry, config, pattern: Pattern, pruner: str, budget: int | None,
                budget_name: str = "--max-gpu-memory") -> MemoryPlan | None:
    """What the loaded model decides before a method runs, one line each: the pattern fits every block,
    ``--include`` / ``--exclude`` match, and, for a method that calibrates, the calibration length
    fitted to the model's context and the device memory planned (the plan, recorded in the manifest;
    the activations' place is set on the job). None: the method does not calibrate."""
    validate_pattern(job, [pattern] * job.adapter.num_blocks)
    if job.include or job.exclude:
        check_selection(job)
    if not entry.needs_calibration(job, config):
        return None
    job.fit_calibration()  # an unset --seqlen fits the model's context before the memory plan reads it
    memory = plan_activation_memory(job, budget, PRUNERS[pruner].needs if entry.kind == "sparsity" else "none",
                                    budget_name)
    job.offload_activations = memory.offload_activations
    return memory


def calibration_record(job: PruneJob) -> dict:
    """The manifest's ``calibration`` of a job that calibrated: the spec used, the samples' hash and
    provenance, and the default length an unset ``--seqlen`` was lowered from."""
    data = job.calibration_data()  # loaded once, by the method's run
    return dict(job.calibration.to_dict(), hash=data.hash, **data.provenance(),
                **({"seqlen_default": job.seqlen_default} if job.seqlen_default is not None else {}))
