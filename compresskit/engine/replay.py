"""Calibration activations at every block boundary, for structural searches (FinerCut, CD-MoE).

A greedy structural search scores many candidate edits of the model (a removed sublayer, a
condensed MoE layer). Re-running the whole model for each candidate wastes the part before the
first edited block, which is the same for every candidate. :class:`BlockReplay` runs the
unmodified model once, block by block (only the current block on the compute device, through
``models.placement.onload``), keeps the hidden state entering every block, and then answers
"what does the model output if these modules are swapped for those?" by replaying from the
first block the swap touches. Block calls (rotary embeddings, per-layer masks) are recorded once
by ``capture_block_inputs``, exactly as the sequential engine does.

Memory: ``num_blocks × nsamples × seqlen × hidden`` activations on ``store_device`` (CPU by
default); the structural methods' calibration sets are small (FinerCut: 10 × 256 tokens).

Data-parallel (``engine.distributed``): under torchrun each rank keeps only its ``batch_share``
of the samples (whole batches, the ones one process forms), so every hidden state here is this
rank's share; a score over them is a per-rank sum plus a token count that the scorer reduces over
ranks before comparing candidates (``depth.scoring.DistanceAccumulator``,
``moe.search.batched_distance``). One process keeps every sample, as before.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from ..models.placement import hold_reads, onload
from .capture import CapturedInputs, capture_block_inputs
from .distributed import batch_share


@contextmanager
def swapped(model: nn.Module, swaps: Mapping[str, nn.Module]) -> Iterator[None]:
    """Temporarily install ``swaps`` (full module path → replacement) in ``model``."""
    originals: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for path, replacement in swaps.items():
            parent_path, _, name = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            originals.append((parent, name, getattr(parent, name)))
            setattr(parent, name, replacement)
        yield
    finally:
        for parent, name, original in reversed(originals):
            setattr(parent, name, original)


class BlockReplay:
    """Hidden states entering every block on a fixed calibration set, and replays from any block."""

    def __init__(
        self,
        adapter,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        device: torch.device | str = "cpu",
        batch_size: int = 8,
        store_device: torch.device | str = "cpu",
        progress=None,
    ):
        self.adapter = adapter
        self.device = torch.device(device)
        self.store_device = torch.device(store_device)
        self.batch_size = max(1, int(batch_size))
        share = batch_share(input_ids.shape[0], self.batch_size)  # everything in one process
        self.input_ids = input_ids[share]
        self.attention_mask = None if attention_mask is None else attention_mask[share]
        self.progress = progress
        self.captured: CapturedInputs | None = None
        #: block_inputs[i][b]: hidden state entering block i for batch b (i == num_blocks: after the last block)
        self.block_inputs: list[list[torch.Tensor]] = []
        self._hold = None  # the lazily loaded model's read cache, held from capture to release
        self._hold_finalizer = None

    # ------------------------------------------------------------------ capture
    @torch.no_grad()
    def capture(self) -> "BlockReplay":
        """Record every block's call and the unmodified model's hidden state at every boundary.

        From here until ``release`` a lazily loaded model keeps the blocks it reads, converted, in
        host memory (``models.placement.hold_reads``: up to half the available memory), so every
        replay after the capture reads no weight file; a model in memory is unaffected."""
        adapter = self.adapter
        if self._hold is None:
            self._hold = hold_reads(adapter.model)
            self._hold_finalizer = weakref.finalize(self, self._hold.close)
        with ExitStack() as stack:
            for m in adapter.embedding_modules():
                stack.enter_context(onload(m, self.device))
            self.captured = capture_block_inputs(
                adapter.model, adapter.blocks, self.input_ids, self.attention_mask, self.device,
                self.batch_size, self.store_device,
            )
        hidden = list(self.captured.hidden)
        self.block_inputs = [hidden]
        n = adapter.num_blocks
        for i in range(n):
            hidden = self._run_block(i, hidden)
            self.block_inputs.append(hidden)
            if self.progress is not None:
                self.progress(i + 1, n, adapter.block_name(i))
        return self

    @property
    def num_batches(self) -> int:
        return len(self.block_inputs[0]) if self.block_inputs else 0

    def token_mask(self, batch: int) -> torch.Tensor | None:
        assert self.captured is not None
        return self.captured.token_masks[batch]

    def call(self, batch: int, block: int):
        """The recorded extra args / kwargs of ``block`` for ``batch`` (hidden states excluded)."""
        assert self.captured is not None
        return self.captured.calls[batch][block]

    # ------------------------------------------------------------------ replay
    @torch.no_grad()
    def _run_block(self, i: int, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        assert self.captured is not None
        with onload(self.adapter.block(i), self.device) as block:
            return self.captured.run_block(block, i, hidden, self.device, self.store_device)

    @torch.no_grad()
    def run_from(self, start: int, swaps: Mapping[str, nn.Module] | None = None,
                 stop: int | None = None) -> list[torch.Tensor]:
        """Hidden states after block ``stop - 1`` (default: the last block), running blocks
        ``start .. stop-1`` from the recorded input of ``start`` with ``swaps`` installed."""
        stop = self.adapter.num_blocks if stop is None else stop
        hidden = self.block_inputs[start]
        with swapped(self.adapter.model, swaps or {}):
            for i in range(start, stop):
                hidden = self._run_block(i, hidden)
        return hidden

    @torch.no_grad()
    def head(self, hidden: list[torch.Tensor], logits: bool = True) -> list[torch.Tensor]:
        """Apply the modules after the last block: final norm (and OPT's project_out), then the LM
        head when ``logits``; returns one tensor per batch on ``store_device`` (fp32 logits)."""
        modules = self.adapter.head_modules()
        if not logits:
            modules = modules[:-1]
        out = []
        with ExitStack() as stack:
            for m in modules:
                stack.enter_context(onload(m, self.device))
            for h in hidden:
                y = h.to(self.device)
                for m in modules:
                    y = m(y)
                out.append((y.float() if logits else y).to(self.store_device))
        return out

    def release(self) -> None:
        self.captured = None
        self.block_inputs = []
        if self._hold_finalizer is not None:
            self._hold_finalizer()  # closes the hold once
        self._hold = self._hold_finalizer = None
