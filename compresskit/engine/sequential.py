"""The sequential layer-by-layer engine every calibration-based method runs on.

Protocol of the papers (methods.md §1.3): calibration inputs of block 0 are captured once; for
each block in order, statistics are collected on the block's current inputs, the method
transforms the block, and the transformed block's outputs become the next block's inputs, so the
errors of earlier blocks propagate as intended. Only the current block lives on the compute
device (``models.placement.onload``, the one placement seam); the rest of the model stays where it
was loaded (normally CPU, or on disk for a lazily loaded model), so a model larger than GPU memory
can be compressed. Forwards are batched (the references loop over samples one by one).
"""

from __future__ import annotations

import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..models.placement import onload
from .capture import CapturedInputs, capture_block_inputs
from .collect import InputStatsCollector, StatFactory


@dataclass
class RunTimings:
    capture_s: float = 0.0
    forward_s: float = 0.0
    transform_s: float = 0.0
    per_block_s: list[float] = field(default_factory=list)


class BlockContext:
    """What a method's visitor sees for one block: the block on the compute device and its inputs."""

    def __init__(self, runner: "SequentialRunner", index: int, block: nn.Module):
        self.runner = runner
        self.index = index
        self.block = block
        self.name = runner.adapter.block_name(index)
        self.outputs: list[torch.Tensor] | None = None

    @property
    def device(self) -> torch.device:
        return self.runner.device

    @torch.no_grad()
    def forward(self, on_batch: Callable[[torch.Tensor | None], None] | None = None, keep_outputs: bool = True) -> None:
        """Run every calibration batch through the block (statistics come from hooks the visitor registered).

        ``on_batch(token_mask)`` is called before each batch. With ``keep_outputs`` the outputs are
        kept: if the visitor then leaves the block unchanged, they become the next block's inputs
        without a second forward.
        """
        t0 = time.perf_counter()
        self.outputs = self.runner._forward_block(self.block, self.index, on_batch=on_batch, keep=keep_outputs)
        self.runner.timings.forward_s += time.perf_counter() - t0

    def collect_input_stats(self, modules: dict[str, nn.Module], factory: StatFactory) -> InputStatsCollector:
        """Forward all batches once, accumulating ``factory``-made statistics of each module's input."""
        collector = InputStatsCollector(modules, factory)
        with collector:
            t0 = time.perf_counter()
            self.outputs = self.runner._forward_block(
                self.block, self.index, on_batch=collector.new_batch, keep=True
            )
            self.runner.timings.forward_s += time.perf_counter() - t0
        return collector


Visitor = Callable[[BlockContext], bool]


class SequentialRunner:
    """Runs a visitor over every decoder block with calibration activations flowing between them.

    ``visit(ctx)`` returns True if it changed the block (then its outputs are recomputed) and
    False if it only measured (then the outputs from its own ``ctx.forward`` are reused).
    """

    def __init__(
        self,
        adapter,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        device: torch.device | str = "cpu",
        batch_size: int = 8,
        offload_activations: bool = False,
        progress: Callable[[int, int, str], None] | None = None,
        block_context: Callable[[int], object] | None = None,
    ):
        self.adapter = adapter
        self.device = torch.device(device)
        self.batch_size = max(1, int(batch_size))
        self.store_device = torch.device("cpu") if offload_activations else self.device
        self.input_ids = input_ids
        self.attention_mask = attention_mask
        self.progress = progress
        self.block_context = block_context
        self.timings = RunTimings()
        self._captured: CapturedInputs | None = None
        self._inputs: list[torch.Tensor] | None = None

    # ------------------------------------------------------------------ capture
    def _capture(self) -> None:
        model, blocks = self.adapter.model, self.adapter.blocks
        t0 = time.perf_counter()
        with ExitStack() as stack:
            for m in self.adapter.embedding_modules():
                stack.enter_context(onload(m, self.device))
            self._captured = capture_block_inputs(
                model, blocks, self.input_ids, self.attention_mask, self.device, self.batch_size, self.store_device
            )
        self._inputs = self._captured.hidden
        self.timings.capture_s += time.perf_counter() - t0

    # ------------------------------------------------------------------ forward
    def _forward_block(self, block: nn.Module, index: int, on_batch=None, keep: bool = True):
        assert self._captured is not None and self._inputs is not None
        return self._captured.run_block(block, index, self._inputs, self.device, self.store_device,
                                        on_batch=on_batch, keep=keep)

    # ------------------------------------------------------------------ main loop
    @torch.no_grad()
    def run(self, visit: Visitor) -> RunTimings:
        if self._captured is None:
            self._capture()
        blocks = self.adapter.blocks
        n = len(blocks)
        for i in range(n):
            t0 = time.perf_counter()
            with onload(blocks[i], self.device) as block:
                scope = self.block_context(i) if self.block_context is not None else nullcontext()
                with scope:
                    ctx = BlockContext(self, i, block)
                    t1, f1 = time.perf_counter(), self.timings.forward_s
                    changed = visit(ctx)
                    # the visitor's own statistics forwards are counted in forward_s, not here
                    self.timings.transform_s += time.perf_counter() - t1 - (self.timings.forward_s - f1)
                if changed or ctx.outputs is None:
                    t1 = time.perf_counter()
                    ctx.outputs = self._forward_block(block, i)
                    self.timings.forward_s += time.perf_counter() - t1
                self._inputs = ctx.outputs
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.timings.per_block_s.append(time.perf_counter() - t0)
            if self.progress is not None:
                self.progress(i + 1, n, ctx.name)
        return self.timings

    def release(self) -> None:
        """Free the cached activations (they can take GBs)."""
        self._captured = None
        self._inputs = None
