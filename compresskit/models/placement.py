"""Where a module's weights are while a method works on it: the one seam for device placement.

Every piece of code that needs a block's (or the embeddings' / head's) weights as real tensors
on the compute device asks for them through :func:`onload`, never with ``module.to(device)``:

    with onload(block, device) as block:
        ... run it, measure it, transform it in place ...

Inside the context the module's parameters and buffers are real tensors on ``device``; on exit
they go back where they were (CPU for a model in host memory). In-place changes made inside
(pruned weights, replaced submodules) are kept. A model loaded lazily (its weights still on
disk) is materialised here and released again on exit, so methods written against this seam
work unchanged for models larger than host RAM.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..compat import apply_to_tensors
from .lazy_store import ReadHold, store_of


def _home(module: nn.Module) -> torch.device | None:
    tensor = next(iter(module.parameters()), None)
    if tensor is None:
        tensor = next(iter(module.buffers()), None)
    return None if tensor is None else tensor.device


@contextmanager
def onload(module: nn.Module, device: torch.device | str) -> Iterator[nn.Module]:
    """Yield ``module`` with its weights on ``device``; put them back (or release them) on exit."""
    device = torch.device(device)
    lazy = lazy_hooks(module)
    if lazy is not None:
        materialise, release = lazy
        session = materialise(module, device)
        try:
            yield module
        finally:
            release(module, session)
        return
    home = _home(module)
    module.to(device)
    try:
        yield module
    finally:
        if home is not None and home.type != "meta" and home != device:
            module.to(home)


def lazy_hooks(module: nn.Module):
    """The lazy loader's ``(materialise(module, device) -> session, release(module, session))`` pair
    when some of ``module``'s tensors are still on disk (``models.lazy``), else None."""
    store = store_of(module)
    return None if store is None else (store.materialise, store.release)


def hold_reads(model: nn.Module, budget: int | None = None):
    """For callers that run the same blocks many times (``engine.replay.BlockReplay``): a lazily loaded
    ``model`` keeps the blocks it reads, converted, in host memory (up to ``budget`` bytes, default
    half the available memory; ``models.lazy_store.ReadCache``) until the returned hold is closed, so
    a replay costs what it costs in memory. A model in memory: a hold that does nothing."""
    store = getattr(model, "_compresskit_lazy_store", None)
    return ReadHold(None) if store is None else store.hold_reads(budget)


def move_model(model: nn.Module, device: torch.device | str) -> nn.Module:
    """``model.to(device)`` for whole-model work (evaluation, generation). A lazily loaded model keeps
    its blocks on disk: only the tensors in memory move, and each block is materialised on the device
    of its inputs by the lazy loader's forward hooks. Returns ``model``."""
    device = torch.device(device)
    if getattr(model, "_compresskit_lazy_store", None) is None:
        return model.to(device)
    return apply_to_tensors(model, lambda t: t if t.is_meta else t.to(device))

