"""How much compute-device memory the calibration pass needs, and where the activations live.

The sequential engine holds, on the compute device, one block at a time plus the calibration
activations flowing between blocks. This module estimates both (pure functions of shapes, so
they are unit-tested without a GPU) and decides:

* activations on the device when one block's working set *and* all activations fit in the
  budget;
* activations offloaded to host memory (one batch at a time on the device) when they do not,
  or when ``--offload-activations`` forces it;
* a one-line ``InputError`` naming the memory needed when even one block does not fit.

The budget is ``--max-gpu-memory`` (e.g. ``20GiB``), else the free memory of the CUDA device;
on CPU without ``--max-gpu-memory`` nothing is planned (activations stay in host memory).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import InputError

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")

FP32 = 4
FP64 = 8


def parse_size(text: str | int, option: str = "--max-gpu-memory") -> int:
    """Bytes from ``"20GiB"``, ``"512MB"``, ``"1.5G"`` (G/GiB = 2^30, GB = 10^9) or a plain byte count."""
    if isinstance(text, bool):
        raise InputError(f"{option}: expected a size like 20GiB or 512MB, got {text!r}")
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE.match(str(text))
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise InputError(f"{option}: expected a size like 20GiB, 512MB or 1.5G, got {text!r}")
        value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise InputError(f"{option}: the size must be positive, got {text!r}")
    return value


def format_size(nbytes: float) -> str:
    """``1536 MiB`` → ``"1.50 GiB"``: binary units, 3 significant figures."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{int(nbytes)} B"


def activation_bytes(nsamples: int, seqlen: int, hidden: int, dtype_bytes: int) -> int:
    """Calibration activations held between blocks: ``2 · nsamples · seqlen · hidden · bytes``.

    Two copies: a block's inputs and the outputs it produces (the next block's inputs).
    """
    return 2 * nsamples * seqlen * hidden * dtype_bytes


def batch_working_bytes(batch: int, seqlen: int, hidden: int, widest: int, dtype_bytes: int) -> int:
    """One batch through one block: ``batch · seqlen · (4·hidden + 3·widest) · bytes``.

    Residual input and output, the attention's q/k/v-sized tensors (≈ 2 more of ``hidden``), and
    the MLP's gate / up / activation (3 of the widest linear output). Attention scores are not
    counted (SDPA kernels do not materialise them).
    """
    return batch * seqlen * (4 * hidden + 3 * widest) * dtype_bytes


def statistic_bytes(shapes: list[tuple[int, int]], needs: str) -> int:
    """The statistics of a block's linears (``[out, in]`` shapes) plus the solve of the largest.

    ``hessian`` (SparseGPT): per linear at most one fp64 ``[in, in]`` sum and its fp32 value
    (linears reading the same input share both), and for the largest solve the fp64 damped copy,
    inverse and inverse factor (``3·8·in²``) and the fp32 work copy of ``W`` and its mask
    (``5·out·in`` bytes). ``sq_norm`` (Wanda): one fp64 ``[in]`` sum and fp32 value per linear and
    the fp32 score matrix of the largest. ``none`` (magnitude): the largest score matrix.
    """
    if not shapes:
        return 0
    largest_wt = max(o * i for o, i in shapes)
    if needs == "hessian":
        largest_in = max(i for _, i in shapes)
        return (FP64 + FP32) * sum(i * i for _, i in shapes) + FP64 * 3 * largest_in**2 + 5 * largest_wt
    if needs == "sq_norm":
        return (FP64 + FP32) * sum(i for _, i in shapes) + FP32 * largest_wt
    return FP32 * largest_wt


@dataclass(frozen=True)
class MemoryPlan:
    """The chosen placement and the numbers behind it (recorded in the manifest)."""

    budget_bytes: int | None
    block_bytes: int
    activation_bytes: int
    offload_activations: bool
    reason: str

    def record(self) -> dict:
        return {
            "activations": "offloaded" if self.offload_activations else "device",
            "placement_reason": self.reason,
            "max_gpu_memory": None if self.budget_bytes is None else format_size(self.budget_bytes),
            "estimated_block_memory": format_size(self.block_bytes),
            "estimated_activation_memory": format_size(self.activation_bytes),
        }


def plan_memory(
    budget: int | None,
    parameter_bytes: int,
    batch_bytes: int,
    stat_bytes: int,
    activations: int,
    force_offload: bool = False,
    budget_name: str = "--max-gpu-memory",
) -> MemoryPlan:
    """Decide where activations live; ``InputError`` when one block cannot fit at all.

    One block needs ``parameter_bytes + batch_bytes + stat_bytes``. With ``activations`` beside
    it (all calibration activations on the device) it needs that plus ``activations``.
    """
    block = parameter_bytes + batch_bytes + stat_bytes
    if budget is not None and block > budget:
        raise InputError(
            f"one block needs {format_size(block)} of compute-device memory (parameters "
            f"{format_size(parameter_bytes)} + one batch's activations {format_size(batch_bytes)} + statistics "
            f"{format_size(stat_bytes)}) but {budget_name} allows {format_size(budget)}; "
            "raise it or lower --batch-size"
        )
    if force_offload:
        return MemoryPlan(budget, block, activations, True, "forced by --offload-activations")
    if budget is None:
        return MemoryPlan(None, block, activations, False, "no device memory budget")
    if block + activations > budget:
        return MemoryPlan(
            budget, block, activations, True,
            f"auto: activations {format_size(activations)} do not fit beside one block "
            f"({format_size(block)}) in {format_size(budget)}",
        )
    return MemoryPlan(budget, block, activations, False, f"fits: {format_size(block + activations)} of {format_size(budget)}")


def device_budget(device, max_gpu_memory: str | int | None) -> tuple[int | None, str]:
    """The budget to plan against and how to name it in errors: the option, else free CUDA memory."""
    if max_gpu_memory is not None:
        return parse_size(max_gpu_memory), f"--max-gpu-memory {max_gpu_memory}"
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free), f"the free memory of {device}"
    return None, "no budget"
