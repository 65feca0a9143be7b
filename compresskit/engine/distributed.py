"""Data-parallel calibration over ``torch.distributed``: the one place that knows about ranks.

Launched by ``torchrun`` (``torchrun --nproc-per-node 4 -m compresskit prune ...``), every rank
runs the same program on the same model; :func:`init_from_env` joins the process group that
torchrun's environment describes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``) with NCCL for CUDA devices and gloo for CPU. Without those variables (or with
``WORLD_SIZE=1``) everything here is a no-op and the program is the ordinary single process.

The contract every calibration method follows:

* **Samples.** Every rank loads the same calibration samples (same seed ⇒ same samples) and
  keeps a contiguous share of whole *batches* (:func:`batch_share`): the batches are exactly the
  ones one process would form, so per-batch results (block outputs, per-batch sample counts)
  are bit-identical to the single-process run.
* **Statistics** are sums plus sample counts. Each rank accumulates over its batches; the
  float64 sums (``pruning.stats``: each batch's fp32 contribution added to an fp64 sum) and the
  counts are summed over ranks with one ``all_reduce(SUM)`` each (:func:`all_reduce_sum`)
  *before* any statistic is used, then rounded to fp32 once. The result is the single-process
  sum up to the order of fp64 additions (rank-partial sums added together instead of one
  running sum) — after the fp32 rounding the same bits in practice — and every rank holds the
  same bits afterwards.
* **Decisions** (masks, allocations, ranks) are computed from reduced statistics, so every rank
  takes the same decision; the per-matrix solves of a block are spread over ranks
  (:func:`assign_owners`) and each result is broadcast from its owner (:func:`broadcast_`).
* **Writing** (checkpoints, JSON, plots, tables) happens on rank 0 only (:func:`is_writer`).

Structural methods that score candidates on calibration data (CD-MoE, FinerCut, REAP's
saliency) follow the same contract: their passes (``moe.stats.collect_expert_stats``,
``engine.replay.BlockReplay``) keep this rank's :func:`batch_share`; routing statistics are
reduced with :func:`all_reduce_sum`; each candidate's distance is a per-rank sum plus a token
count reduced with :func:`all_reduce_floats` (or :func:`all_reduce_mean`, a token-weighted mean)
and divided after the reduction, before the argmin, so every rank chooses the same candidate.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence

import torch
import torch.distributed as dist

_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched() -> bool:
    """True when torchrun (or an equivalent launcher) started several ranks."""
    return all(k in os.environ for k in _ENV) and int(os.environ["WORLD_SIZE"]) > 1


def is_active() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    if is_active():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1")) if launched() else 1


def rank() -> int:
    if is_active():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0")) if launched() else 0


def is_writer() -> bool:
    """Only rank 0 writes checkpoints, JSON, plots and terminal tables."""
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """``cuda`` without an index becomes this rank's GPU (``LOCAL_RANK``); anything else is kept."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and launched():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def init_from_env(device: torch.device | str) -> bool:
    """Join torchrun's process group (NCCL for CUDA, gloo for CPU); False when not launched that way."""
    if not launched():
        return False
    if dist.is_initialized():
        return True
    device = local_device(torch.device(device))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # A long timeout: ranks wait for each other at every block; a block can take minutes.
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=60),
                            device_id=device if device.type == "cuda" else None)
    return True


def shutdown() -> None:
    """Leave the process group (after everybody arrived, so no rank exits while others wait)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# --------------------------------------------------------------------------- sharing the samples
def batch_share(nsamples: int, batch_size: int, ranks: int | None = None, index: int | None = None) -> slice:
    """The sample range this rank keeps: a contiguous run of whole batches.

    The ``ceil(nsamples / batch_size)`` batches one process would form are split into ``ranks``
    contiguous runs whose lengths differ by at most one (earlier ranks get the extra batch).
    A rank may get no batch at all (fewer batches than ranks); it still takes part in every
    reduction, contributing zeros.
    """
    ranks = world_size() if ranks is None else ranks
    index = rank() if index is None else index
    batch_size = max(1, int(batch_size))
    nbatches = -(-nsamples // batch_size)
    per, extra = divmod(nbatches, ranks)
    first = index * per + min(index, extra)
    count = per + (1 if index < extra else 0)
    return slice(min(first * batch_size, nsamples), min((first + count) * batch_size, nsamples))


# --------------------------------------------------------------------------- reductions
def _backend_device() -> torch.device:
    if dist.get_backend() == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _collective_(tensor: torch.Tensor, op) -> torch.Tensor:
    """Run ``op(buffer)`` on a contiguous buffer on the backend's device, then write it back into ``tensor``."""
    where = _backend_device()
    buffer = tensor if (tensor.device == where and tensor.is_contiguous()) else tensor.detach().to(where).contiguous()
    op(buffer)
    if buffer is not tensor:
        tensor.copy_(buffer)
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks, in place (identity in a single process). Returns it.

    Use for statistic sums *and* their counts: reduce both, then divide, so the result equals
    the single-process statistic up to float summation order.
    """
    if is_active():
        _collective_(tensor, lambda t: dist.all_reduce(t, op=dist.ReduceOp.SUM))
    return tensor


def all_reduce_mean(value: torch.Tensor, count: torch.Tensor | float) -> torch.Tensor:
    """The mean over all ranks' data of per-rank means ``value`` taken over ``count`` items each.

    ``Σ_r count_r · value_r / Σ_r count_r`` (float64 accumulation), i.e. what one process gets
    from all items at once. A rank with ``count = 0`` contributes nothing (its ``value`` may be
    NaN). Returns a new tensor with ``value``'s shape and dtype.
    """
    count_t = torch.as_tensor(count, dtype=torch.float64, device=value.device)
    weighted = torch.where(count_t > 0, value.double() * count_t, torch.zeros((), dtype=torch.float64,
                                                                               device=value.device))
    total = all_reduce_sum(weighted.clone())
    n = all_reduce_sum(count_t.clone().reshape(1)).reshape(())
    return (total / n).to(value.dtype)


def all_reduce_floats(*values: float) -> tuple[float, ...]:
    """Python numbers (per-rank partial sums and counts) summed over all ranks in float64.

    One ``all_reduce`` for all of them; in a single process the very same values come back
    untouched, so single-process scores stay bit-for-bit what they were. The structural searches
    (CD-MoE, FinerCut) reduce a candidate's distance this way: each rank sums the distance
    contributions of its own batches (``Σ rows · per-chunk mean``, or ``Σ ‖Δ‖²`` for the norm)
    and its token count; after the reduction every rank divides the same totals, so every rank
    compares the same numbers and picks the same candidate. The order of the additions differs
    from one process's running sum (rank partial sums added together), hence "up to fp64 rounding".
    """
    if not is_active():
        return tuple(values)
    buffer = torch.tensor([float(v) for v in values], dtype=torch.float64)
    all_reduce_sum(buffer)
    return tuple(buffer.tolist())


def all_gather_objects(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in a single process."""
    if not is_active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_(tensor: torch.Tensor, src: int) -> torch.Tensor:
    """Overwrite ``tensor`` on every rank with rank ``src``'s, in place (views into fused weights work)."""
    if is_active():
        _collective_(tensor, lambda t: dist.broadcast(t, src=src))
    return tensor


def barrier() -> None:
    if is_active():
        dist.barrier()


# --------------------------------------------------------------------------- spreading the solves
def assign_owners(costs: Sequence[float], ranks: int | None = None) -> list[int]:
    """Which rank solves each job: longest-processing-time-first over ``costs``, ties by index.

    Deterministic (every rank computes the same answer from the same costs): jobs sorted by
    decreasing cost, each given to the rank with the least work so far (lowest rank on ties).
    """
    ranks = world_size() if ranks is None else ranks
    load = [0.0] * ranks
    owners = [0] * len(costs)
    for job in sorted(range(len(costs)), key=lambda j: (-float(costs[j]), j)):
        r = min(range(ranks), key=lambda k: (load[k], k))
        owners[job] = r
        load[r] += float(costs[job])
    return owners
