"""Forward hooks that feed calibration activations into statistic accumulators.

Linears that read the same input tensor (q/k/v, gate/up) share one accumulator: the Wanda norm or
the SparseGPT Hessian of that input is computed once per batch instead of once per linear, which
is most of the statistic cost. Sharing is detected at run time from the input tensor's identity
(storage pointer, shape, stride), with a reference held for the duration of the batch so the
pointer cannot be reused by another tensor meanwhile.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

StatFactory = Callable[[int, torch.device], object]


class InputStatsCollector:
    """Accumulates one statistic per linear from the inputs the linear receives."""

    def __init__(self, modules: dict[str, nn.Module], factory: StatFactory):
        self.modules = modules
        self.factory = factory
        self.stats: dict[str, object] = {}
        self.samples: dict[str, int] = {name: 0 for name in modules}
        self._by_input: dict[tuple, tuple[torch.Tensor, object]] = {}
        self._token_mask: torch.Tensor | None = None
        self._handles: list = []

    def new_batch(self, token_mask: torch.Tensor | None) -> None:
        self._by_input.clear()
        self._token_mask = token_mask

    def _hook(self, name: str):
        def hook(module, inputs, output):
            x = inputs[0].detach()
            key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()))
            shared = self._by_input.get(key)
            stat = self.stats.get(name)
            if stat is None:
                if shared is not None:
                    self.stats[name] = shared[1]
                    self.samples[name] += 1
                    return
                stat = self.stats[name] = self.factory(x.shape[-1], x.device)
            self.samples[name] += 1
            if shared is not None and shared[1] is stat:
                return
            mask = self._token_mask
            if mask is not None and tuple(x.shape[:-1]) != tuple(mask.shape):
                mask = None  # e.g. routed-expert inputs, already restricted to their tokens
            stat.add(x, mask)
            self._by_input[key] = (x, stat)

        return hook

    def __enter__(self) -> "InputStatsCollector":
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._by_input.clear()
