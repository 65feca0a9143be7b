"""Measured sparsity of the decoder linears (the papers' ``check_sparsity``).

"Sparsity" in every paper here means the zero fraction of the decoder blocks' linear weights,
not of the whole model: embeddings, lm_head and norms are never counted. Each block is read
through ``models.placement.onload`` (on CPU), so a lazily loaded model is measured one block at
a time; parameter counts need no weights at all (``numel`` of meta tensors).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from ..models.placement import onload


def measure_sparsity(adapter) -> dict:
    """Zero fraction per module, per block and overall over every decoder linear (incl. routed experts)."""
    per_module: dict[str, float] = {}
    per_block: list[float] = []
    zeros_total = numel_total = 0
    for i in range(adapter.num_blocks):
        scope = adapter.unfused_experts(i) if hasattr(adapter, "unfused_experts") else nullcontext()
        with onload(adapter.block(i), "cpu"), scope:
            zeros_block = numel_block = 0
            prefix = adapter.block_name(i)
            for local, module in adapter.prunable_linears(i).items():
                w = module.weight
                zeros = int((w == 0).sum())
                per_module[f"{prefix}.{local}"] = zeros / w.numel()
                zeros_block += zeros
                numel_block += w.numel()
        per_block.append(zeros_block / max(numel_block, 1))
        zeros_total += zeros_block
        numel_total += numel_block
    return {
        "overall": zeros_total / max(numel_total, 1),
        "decoder_linear_params": numel_total,
        "decoder_linear_zeros": zeros_total,
        "per_block": per_block,
        "per_module": per_module,
    }


def count_parameters(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def trained_parameter_counts(total: int, trainable: int, measured: dict) -> dict:
    """The manifest's ``parameters`` of a fine-tuned or healed checkpoint (training changes no count):
    ``total`` before and after, the ``trainable`` ones, and the decoder linears' size and non-zeros
    from ``measured`` (:func:`measure_sparsity`)."""
    return {"total_before": total, "total_after": total, "trainable": trainable,
            "decoder_linear": measured["decoder_linear_params"],
            "decoder_linear_nonzero": measured["decoder_linear_params"] - measured["decoder_linear_zeros"]}
