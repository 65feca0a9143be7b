"""Capture what every decoder block receives, so blocks can be replayed one at a time.

The reference "Catcher" stores block 0's hidden states plus ``attention_mask`` / ``position_ids``
and raises. That breaks on current transformers (wanda issue #87): blocks also receive rotary
``position_embeddings`` and ``cache_position``, and some families (Gemma 2/3, Qwen 2/3) hand each
block a *different* mask (sliding vs. full attention). So every block is temporarily replaced by a
recorder that stores its exact call (positional args and kwargs) and returns its input unchanged;
the last recorder stops the forward pass. Running the model costs only the embeddings and the
mask / rotary computations. Identical kwargs are shared between blocks and batches, so the
per-block records cost almost no memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..models.context import check_token_ids


class _StopForward(Exception):
    """Raised by the last recorder: nothing after the decoder blocks needs to run."""


@dataclass
class BlockCall:
    """Extra positional args and kwargs one block receives (hidden states excluded)."""

    args: tuple
    kwargs: dict[str, Any]


def block_output(out):
    """The hidden states a decoder block returns (blocks return them alone or first in a tuple)."""
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class CapturedInputs:
    """Block-0 hidden states per calibration batch and each block's call signature per batch."""

    hidden: list[torch.Tensor]
    calls: list[list[BlockCall]]  # calls[batch][block]
    token_masks: list[torch.Tensor | None] = field(default_factory=list)  # [b, L] bool, True = real token

    def run_block(self, block: nn.Module, index: int, hidden: list[torch.Tensor], device: torch.device,
                  store_device: torch.device, on_batch=None, keep: bool = True) -> list[torch.Tensor] | None:
        """Run ``block`` (already on ``device``) as block ``index`` over every batch of ``hidden`` with
        the call recorded for it; the outputs on ``store_device`` (None unless ``keep``). The one
        block loop of the engine: ``SequentialRunner`` and ``BlockReplay`` both run blocks through it.
        ``on_batch(token_mask)`` is called before each batch (statistics collectors start a batch)."""
        outputs: list[torch.Tensor] = []
        for b, h in enumerate(hidden):
            if on_batch is not None:
                on_batch(self.token_masks[b])
            call = self.calls[b][index]  # recorded on the compute device already
            out = block_output(block(h.to(device), *call.args, **call.kwargs))
            if keep:
                outputs.append(out.to(store_device))
        return outputs if keep else None


class _Recorder(nn.Module):
    def __init__(self, index: int, last: bool, sink: dict):
        super().__init__()
        self.index, self.last, self.sink = index, last, sink

    def forward(self, *args, **kwargs):
        if args:
            hidden, rest = args[0], args[1:]
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        kwargs.pop("past_key_values", None)
        kwargs.pop("past_key_value", None)
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        if self.index == 0:
            self.sink["hidden"] = hidden
        self.sink["calls"][self.index] = BlockCall(rest, kwargs)
        if self.last:
            raise _StopForward
        return hidden


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    try:
        return bool(a == b)
    except Exception:
        return False


def _dedupe(call: BlockCall, seen: list[BlockCall]) -> BlockCall:
    for other in seen:
        if other is call or (_same(other.args, call.args) and _same(other.kwargs, call.kwargs)):
            return other
    seen.append(call)
    return call


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    blocks: nn.ModuleList,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    device: torch.device,
    batch_size: int,
    store_device: torch.device,
) -> CapturedInputs:
    """Run the model's pre-block part on ``device`` for every calibration batch and record inputs.

    The embedding modules must already be on ``device``; blocks may stay anywhere (they are
    swapped out for recorders and never run).
    """
    check_token_ids(model, input_ids, "the calibration data")
    originals = list(blocks)
    sink: dict[str, Any] = {}
    n = len(originals)
    for i in range(n):
        blocks[i] = _Recorder(i, i == n - 1, sink)
    captured = CapturedInputs(hidden=[], calls=[])
    seen: list[BlockCall] = []
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[start : start + batch_size].to(device)
            mask = None if attention_mask is None else attention_mask[start : start + batch_size].to(device)
            sink["calls"] = [None] * n
            try:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            except _StopForward:
                pass
            if any(c is None for c in sink["calls"]):
                raise RuntimeError("calibration forward did not reach every decoder block")
            captured.hidden.append(sink.pop("hidden").to(store_device))
            captured.calls.append([_dedupe(c, seen) for c in sink["calls"]])
            captured.token_masks.append(None if mask is None else mask.bool())
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
    return captured
