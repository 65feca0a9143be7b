"""EvoPress's fitness: KL(dense ‖ candidate) of next-token distributions on calibration tokens.

A candidate is a level vector; ``installed(i, levels)`` (the caller's) is a context in which block
``i`` is on the compute device with the candidate's weights swapped in (``levels=None``: the dense
block). No model is ever reloaded: blocks run one at a time through the engine's block loop
(``CapturedInputs.run_block``) from inputs recorded once per stage by ``capture_block_inputs``.

* **Stages.** Each selection stage's token count ``T`` maps to a fixed token set: the first ``T``
  tokens of calibration sample 0 when ``T`` is at most one sample, else the first ``⌈T/seqlen⌉``
  whole samples (``tokens`` records what was used). Fixed sets make the fitness deterministic for a
  stage (``evolution.evolve``'s contract); the reference draws a random minibatch per stage call.
* **Reference.** The dense model's logits on each stage's tokens, kept in host memory: full
  logits (fp32) when all stages' logits fit in ``FULL_KL_BYTES`` (1 GiB), else the top-K form of
  the reference (``analysis.distances.top_k_logits``, K = 1024 unless ``--kl-top-k`` says; the
  reference found K ≥ 512 as effective as the full KL). ``top_k=0`` forces the full KL.
* **Score.** The mean over tokens (the last position of every sequence excluded, as the
  reference) of ``analysis.distances.token_kl``; the LM head runs on ``HEAD_CHUNK`` positions at a
  time, so memory is one block plus one chunk of logits beside the reference.
* **Parent cache (first stage).** The hidden state entering every block under the current parent
  is kept for the first stage's tokens (when it fits ``CACHE_BYTES``), so a candidate is replayed
  from the first block where its levels differ from the parent's; ``set_parent`` refreshes it
  from the first block the new parent changed.
* **torchrun.** Candidates are spread over ranks (rank r scores candidates r, r+W, ...) on all
  tokens, and the values are all-gathered, so every rank holds the same list and takes the same
  decisions (``engine.distributed``).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass

import torch
from torch import nn

from ..analysis.distances import token_kl, top_k_logits
from ..engine import distributed
from ..engine.capture import CapturedInputs, capture_block_inputs
from ..errors import InputError
from ..models.placement import hold_reads, onload

FULL_KL_BYTES = 1 << 30
CACHE_BYTES = 1 << 30
DEFAULT_TOP_K = 1024
HEAD_CHUNK = 256

Installed = Callable[[int, "Sequence[int] | None"], AbstractContextManager[nn.Module]]


def kl_mode(stage_tokens: Sequence[int], vocab: int, top_k: int | None) -> int:
    """0 (full KL) or K: ``top_k`` None chooses full when the logits of all stages fit FULL_KL_BYTES."""
    if top_k is not None:
        return 0 if top_k <= 0 or top_k >= vocab else int(top_k)
    return 0 if sum(stage_tokens) * vocab * 4 <= FULL_KL_BYTES else DEFAULT_TOP_K


@dataclass
class _Stage:
    tokens: int
    captured: CapturedInputs
    reference: list  # per batch: fp32 logits [b, L-1, V] or (values [b, L-1, K], int32 ids)
    masks: list  # per batch: bool [b, L-1] or None
    cache: list[list[torch.Tensor]] | None = None  # cache[i]: parent's hidden entering block i


class KLFitness:
    """``fitness(candidates, tokens) -> list[float]`` for ``evolution.evolve``."""

    def __init__(self, adapter, installed: Installed, unit_blocks: Sequence[int], input_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None, stage_tokens: Sequence[int], *, device, batch_size: int = 8,
                 top_k: int | None = None, cache_first: bool = True, progress=None):
        self.adapter = adapter
        self.installed = installed
        self.unit_blocks = list(unit_blocks)
        self.device = torch.device(device)
        self.store = torch.device("cpu")
        self.batch_size = max(1, int(batch_size))
        self.num_blocks = adapter.num_blocks
        self.progress = progress
        self.parent: list[int] | None = None
        self.block_runs = 0
        self.scored = 0
        self.seconds = 0.0
        # a lazily loaded model keeps its converted block reads in host memory while the search
        # re-runs the blocks (models.placement.hold_reads, as BlockReplay does); closed by release()
        self._hold = hold_reads(adapter.model)
        self._hold_finalizer = weakref.finalize(self, self._hold.close)
        nsamples, seqlen = input_ids.shape
        vocab = adapter.model.get_output_embeddings().weight.shape[0]
        wanted = sorted(set(int(t) for t in stage_tokens))
        plans = {t: self._token_plan(t, nsamples, seqlen) for t in wanted}
        self.top_k = kl_mode([n * length for n, length in plans.values()], vocab, top_k)
        self.stages: dict[int, _Stage] = {}
        for index, t in enumerate(wanted):
            n, length = plans[t]
            ids = input_ids[:n, :length]
            mask = None if attention_mask is None else attention_mask[:n, :length]
            self.stages[t] = self._build_stage(ids, mask, f"reference logits {index + 1}/{len(wanted)}")
        first = self.stages[int(stage_tokens[0])]
        hidden = adapter.model.get_input_embeddings().weight.shape[-1]
        itemsize = adapter.model.get_input_embeddings().weight.element_size()
        if cache_first and (self.num_blocks + 1) * first.tokens * hidden * itemsize <= CACHE_BYTES:
            first.cache = []

    # ---------------------------------------------------------------- setup
    @staticmethod
    def _token_plan(tokens: int, nsamples: int, seqlen: int) -> tuple[int, int]:
        if tokens <= seqlen:
            return 1, tokens
        need = -(-tokens // seqlen)
        if need > nsamples:
            raise InputError(f"a selection stage of {tokens} tokens needs {need} calibration samples of {seqlen} tokens; "
                             f"there are {nsamples}: raise --nsamples or lower --tokens")
        return need, seqlen

    @torch.no_grad()
    def _build_stage(self, ids: torch.Tensor, mask: torch.Tensor | None, label: str) -> _Stage:
        adapter = self.adapter
        with ExitStack() as stack:
            for m in adapter.embedding_modules():
                stack.enter_context(onload(m, self.device))
            captured = capture_block_inputs(adapter.model, adapter.blocks, ids, mask, self.device,
                                            self.batch_size, self.store)
        hidden = list(captured.hidden)
        for i in range(self.num_blocks):
            with self.installed(i, None) as block:
                hidden = captured.run_block(block, i, hidden, self.device, self.store)
            if self.progress is not None:
                self.progress(label, i + 1, self.num_blocks, adapter.block_name(i))
        reference, masks = [], []
        for b, h in enumerate(hidden):
            token_mask = captured.token_masks[b]
            keep = None if token_mask is None else token_mask[:, :-1].bool().cpu()
            reference.append(self._logits(h, self.top_k))
            masks.append(keep)
        tokens = int(ids.shape[0] * ids.shape[1])
        return _Stage(tokens=tokens, captured=captured, reference=reference, masks=masks)

    @torch.no_grad()
    def _logits(self, hidden: torch.Tensor, top_k: int = 0):
        """The reference of one batch on the CPU: fp32 logits of every position but the last,
        ``[b, L-1, V]``, or with ``top_k`` their K largest values and int32 ids (chunk by chunk: the
        full logits of a batch never exist at once)."""
        b, length = hidden.shape[0], hidden.shape[1] - 1
        values = ids = None
        for row, start, logits in self._head_chunks(hidden):
            end = start + logits.shape[0]
            if top_k:
                v, i = top_k_logits(logits, top_k)
                if values is None:
                    values = torch.empty((b, length, v.shape[-1]), dtype=torch.float32, device=self.store)
                    ids = torch.empty((b, length, v.shape[-1]), dtype=torch.int32, device=self.store)
                values[row, start:end], ids[row, start:end] = v.to(self.store), i.to(self.store, torch.int32)
            else:
                if values is None:
                    values = torch.empty((b, length, logits.shape[-1]), dtype=torch.float32, device=self.store)
                values[row, start:end] = logits.to(self.store)
        return (values, ids) if top_k else values

    def _head_chunks(self, hidden: torch.Tensor):
        """``(row, start, logits [w, V])``: fp32 logits on the compute device of positions
        ``start .. start+w-1`` (never the last) of every sequence, ``HEAD_CHUNK`` positions at a time,
        so the KL's float64 work holds ``HEAD_CHUNK × vocab`` values, not a batch's."""
        modules = self.adapter.head_modules()
        length = hidden.shape[1] - 1
        with ExitStack() as stack:
            for m in modules:
                stack.enter_context(onload(m, self.device))
            for row in range(hidden.shape[0]):
                for start in range(0, length, HEAD_CHUNK):
                    y = hidden[row, start:min(start + HEAD_CHUNK, length)].to(self.device)
                    for m in modules:
                        y = m(y)
                    yield row, start, y.float()

    # ---------------------------------------------------------------- scoring
    def _block_levels_differ(self, a: Sequence[int], b: Sequence[int]) -> int:
        """The first block where two level vectors differ (num_blocks when they are equal)."""
        first = self.num_blocks
        for unit, (x, y) in enumerate(zip(a, b)):
            if x != y:
                first = min(first, self.unit_blocks[unit])
        return first

    @torch.no_grad()
    def _run(self, stage: _Stage, levels: Sequence[int], start: int, keep_all: bool = False):
        hidden = stage.cache[start] if start > 0 else list(stage.captured.hidden)
        states = []
        for i in range(start, self.num_blocks):
            with self.installed(i, levels) as block:
                hidden = stage.captured.run_block(block, i, hidden, self.device, self.store)
            self.block_runs += 1
            if keep_all:
                states.append(hidden)
        return states if keep_all else hidden

    @torch.no_grad()
    def _kl(self, stage: _Stage, hidden: list[torch.Tensor]) -> float:
        total, count = 0.0, 0
        for b, h in enumerate(hidden):
            ref, mask = stage.reference[b], stage.masks[b]
            for row, pos, logits in self._head_chunks(h):
                end = pos + logits.shape[0]
                if isinstance(ref, tuple):
                    part = (ref[0][row, pos:end].to(self.device), ref[1][row, pos:end].to(self.device).long())
                else:
                    part = ref[row, pos:end].to(self.device)
                m = None if mask is None else mask[row, pos:end].to(self.device)
                kl = token_kl(part, logits, m)
                total += float(kl.sum())
                count += int(kl.numel())
        return total / max(count, 1)

    def set_parent(self, levels: Sequence[int]) -> None:
        """The current parent: the first stage's cached block inputs follow it."""
        levels = list(levels)
        for stage in self.stages.values():
            if stage.cache is None:
                continue
            if not stage.cache or self.parent is None:
                start = 0
                stage.cache = [list(stage.captured.hidden)]
            else:
                start = self._block_levels_differ(self.parent, levels)
                stage.cache = stage.cache[: start + 1]
            if start < self.num_blocks:
                stage.cache.extend(self._run(stage, levels, start, keep_all=True))
        self.parent = levels

    def score(self, levels: Sequence[int], tokens: int) -> float:
        stage = self.stages[int(tokens)]
        start = 0
        if stage.cache and self.parent is not None:
            start = self._block_levels_differ(self.parent, levels)
            if start == self.num_blocks:
                return self._kl(stage, stage.cache[self.num_blocks])
        return self._kl(stage, self._run(stage, levels, start))

    def release(self) -> None:
        """Let the lazy read cache go and drop the stages' activations and reference logits."""
        self._hold.close()
        self.stages.clear()

    def tokens_of(self, tokens: int) -> int:
        """The tokens a stage of ``tokens`` really scores (whole samples past one sample)."""
        return self.stages[int(tokens)].tokens

    def __call__(self, candidates: Sequence[Sequence[int]], tokens: int) -> list[float]:
        t0 = time.perf_counter()
        world, me = distributed.world_size(), distributed.rank()
        mine = {i: self.score(c, tokens) for i, c in enumerate(candidates) if i % world == me}
        values: dict[int, float] = {}
        for part in distributed.all_gather_objects(mine):
            values.update(part)
        self.scored += len(candidates)
        self.seconds += time.perf_counter() - t0
        return [values[i] for i in range(len(candidates))]
