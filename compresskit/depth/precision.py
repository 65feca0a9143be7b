"""Score in float32 whatever the checkpoint's dtype, as the reference does (methods.md §8.2).

The reference loads the model in float32 for the whole search. Here the model keeps its dtype
for saving: :func:`float32_scoring` casts every floating tensor of the embeddings, blocks and
head to float32 (a lazily loaded block is not read for this: its placeholders say float32 and each
read casts, so an unchanged block goes back to its source instead of being spilled in float32) and
casts each tensor back to its own original dtype on exit.
bf16 / fp16 → fp32 → bf16 / fp16 is exact, so the saved weights are bit-identical; tensors that
were float32 already (DeepSeek's router, rotary ``inv_freq``) stay float32.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..models.lazy_store import retype


def _modules(adapter) -> list[nn.Module]:
    return [*adapter.embedding_modules(), *adapter.blocks, *adapter.head_modules()]


def _cast(module: nn.Module, dtypes: dict[str, torch.dtype] | None) -> dict[str, torch.dtype]:
    """Cast floating tensors to float32 (``dtypes`` None) or back to ``dtypes``; returns the originals.
    Tensors of a lazily loaded block are not read: their placeholders change dtype and every later
    read casts (``models.lazy_store.retype``), so an unchanged block is never spilled in float32."""

    def want(name: str, tensor: torch.Tensor) -> torch.dtype:
        return torch.float32 if dtypes is None else dtypes.get(name, tensor.dtype)

    seen = retype(module, want)
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if not tensor.is_floating_point() or tensor.is_meta:
            continue
        seen[name] = tensor.dtype
        target = want(name, tensor)
        if tensor.dtype != target:
            tensor.data = tensor.data.to(target)
    return seen


def model_is_float32(adapter) -> bool:
    return all(p.dtype == torch.float32 for m in _modules(adapter) for p in m.parameters() if p.is_floating_point())


@contextmanager
def float32_scoring(adapter, enabled: bool = True) -> Iterator[None]:
    """Within the context every floating weight of the model is float32; restored on exit."""
    if not enabled or model_is_float32(adapter):
        yield
        return
    modules = _modules(adapter)
    originals = [_cast(m, None) for m in modules]
    try:
        yield
    finally:
        for module, dtypes in zip(modules, originals):
            _cast(module, dtypes)
