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
from .distributed import all_gather_objects, all_reduce_sum, is_active

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

    def all_reduce(self) -> None:
        """Sum every statistic and every hook count over the data-parallel ranks (no-op alone).

        Each accumulator holds a float64 *sum* (each batch's fp32 contribution added in fp64) and
        a sample count (``pruning.stats``); both are summed over ranks in fp64
        (``engine.distributed.all_reduce_sum``), so ``value()`` afterwards (rounded to fp32 once)
        is the statistic of all ranks' samples — the single-process number up to fp64 summation
        order, which the fp32 rounding hides in practice — and identical on every rank. Accumulators shared by linears reading the same
        input (q/k/v) are reduced once: the sharing groups of all ranks are merged first, and a
        rank that saw no token of a linear (a routed expert, or no batch at all) contributes
        zeros. Linears no rank saw stay without a statistic.
        """

        if not is_active():
            return
        names = list(self.modules)
        counts = torch.tensor([self.samples[n] for n in names], dtype=torch.int64)
        all_reduce_sum(counts)
        self.samples = {n: int(c) for n, c in zip(names, counts)}
        groups = _merge_groups(names, all_gather_objects(self._local_groups(names)))
        sums = []
        for group in groups:
            if self.samples[group[0]] == 0:
                continue
            held = {id(self.stats[n]): self.stats[n] for n in group if n in self.stats}
            if len(held) > 1:
                raise RuntimeError(f"statistic sharing of {group} differs between ranks")
            if held:
                stat = next(iter(held.values()))
            else:
                weight = self.modules[group[0]].weight
                stat = self.factory(weight.shape[1], weight.device)
            for n in group:
                self.stats[n] = stat
            sums.append(stat)
        sample_counts = torch.tensor([s.nsamples for s in sums], dtype=torch.int64)
        all_reduce_sum(sample_counts)
        for stat, n in zip(sums, sample_counts.tolist()):
            stat.nsamples = n
            all_reduce_sum(stat.running_sum(self._device_of(stat)))

    def _local_groups(self, names: list[str]) -> list[list[str]]:
        by_stat: dict[int, list[str]] = {}
        for n in names:
            if n in self.stats:
                by_stat.setdefault(id(self.stats[n]), []).append(n)
        return list(by_stat.values())

    def _device_of(self, stat) -> torch.device:
        name = next(n for n, s in self.stats.items() if s is stat)
        return self.modules[name].weight.device

    def __enter__(self) -> "InputStatsCollector":
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._by_input.clear()


def _merge_groups(names: list[str], per_rank: list[list[list[str]]]) -> list[list[str]]:
    """Union of the ranks' sharing groups (names that share an accumulator on any rank), in ``names`` order."""
    parent = {n: n for n in names}

    def find(n: str) -> str:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for groups in per_rank:
        for group in groups:
            for other in group[1:]:
                a, b = find(group[0]), find(other)
                if a != b:
                    parent[b] = a
    merged: dict[str, list[str]] = {}
    for n in names:
        merged.setdefault(find(n), []).append(n)
    return list(merged.values())
