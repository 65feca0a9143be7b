"""EvoPress's fitness: KL(dense ‖ candidate) of next-token distributions on calibration tokens.

A candidate is a level vector; ``installed(i, levels)`` (the caller's) is a context in which block
``i`` is on the compute device with the candidate's weights swapped in (``levels=None``: the dense
block). No model is ever reloaded: blocks run one at a time through the engine's block loop
(``CapturedInputs.run_block``) from inputs captured once per minibatch by ``capture_block_inputs``.

* **Minibatches, as the reference's ``selection``.** Every call names a draw: ``(generation,
  stage)`` picks distinct calibration sequences at random until the stage's ``T`` tokens are reached,
  the last one cut to the exact count (``T`` at most one sequence: one random sequence's first ``T``
  tokens); the generator is seeded from the search seed and the draw, so a search is reproducible
  and resumable and every torchrun rank draws the same minibatch. ``draw=None`` is every
  calibration token (the final comparison, ``evolution.final_selection``).
* **Reference logits.** The dense model's logits on every calibration sequence, computed once and
  kept in host memory, as the reference does: full logits (fp32) when they fit ``FULL_KL_BYTES``
  (1 GiB), else the reference's top-K form (``analysis.distances.top_k_logits``, K = 1024 unless
  ``--kl-top-k`` says; the reference found K ≥ 512 as effective as the full KL). ``top_k=0``
  forces the full KL. A cut sequence's reference is the prefix of its sequence's (causal model).
* **Score.** The mean over tokens (the last position of every sequence excluded, as the
  reference) of ``analysis.distances.token_kl``; the LM head runs on ``HEAD_CHUNK`` positions at a
  time, so memory is one block plus one chunk of logits beside the reference.
* **Parent replay.** When a call names the current parent, the hidden state entering every block
  under the parent is computed once for that minibatch (when it fits ``CACHE_BYTES``), and every
  candidate is replayed from the first block where its levels differ from the parent's; the
  parent's own score (it joins the last stage) is then free.
* **torchrun.** Candidates are spread over ranks (rank r scores candidates r, r+W, ...) on all
  tokens, and the values are all-gathered, so every rank holds the same list and takes the same
  decisions (``engine.distributed``).
"""

from __future__ import annotations

import random
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


def kl_mode(tokens: int, vocab: int, top_k: int | None) -> int:
    """0 (full KL) or K: ``top_k`` None chooses full when the dense logits of ``tokens`` fit FULL_KL_BYTES."""
    if top_k is not None:
        return 0 if top_k <= 0 or top_k >= vocab else int(top_k)
    return 0 if tokens * vocab * 4 <= FULL_KL_BYTES else DEFAULT_TOP_K


def draw_sequences(tokens: int | None, nsamples: int, seqlen: int, seed: int,
                   draw: tuple[int, int] | None) -> list[tuple[int, int]]:
    """The minibatch of a draw: ``[(sequence, length), ...]`` — distinct random sequences until
    ``tokens`` are reached, the last cut to the exact count (the reference's ``selection``);
    ``draw=None``: every sequence whole."""
    if draw is None:
        return [(i, seqlen) for i in range(nsamples)]
    need = -(-int(tokens) // seqlen)
    if need > nsamples:
        raise InputError(f"a selection stage of {tokens} tokens needs {need} calibration samples of {seqlen} tokens; "
                         f"there are {nsamples}: raise --nsamples or lower --tokens")
    rng = random.Random(f"evopress-draw:{seed}:{draw[0]}:{draw[1]}")
    chosen = rng.sample(range(nsamples), need)
    out, left = [], int(tokens)
    for i in chosen:
        out.append((i, min(seqlen, left)))
        left -= out[-1][1]
    return out


@dataclass
class _Minibatch:
    tokens: int
    captured: CapturedInputs
    reference: list  # per batch: fp32 logits [b, L-1, V] or (values [b, L-1, K], int32 ids)
    masks: list  # per batch: bool [b, L-1] or None


class KLFitness:
    """``fitness(candidates, tokens, draw=..., parent=...) -> list[float]`` for ``evolution.evolve``."""

    def __init__(self, adapter, installed: Installed, unit_blocks: Sequence[int], input_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None, stage_tokens: Sequence[int], *, device, batch_size: int = 8,
                 top_k: int | None = None, seed: int = 0, cache_parent: bool = True, progress=None):
        self.adapter = adapter
        self.installed = installed
        self.unit_blocks = list(unit_blocks)
        self.device = torch.device(device)
        self.store = torch.device("cpu")
        self.batch_size = max(1, int(batch_size))
        self.num_blocks = adapter.num_blocks
        self.progress = progress
        self.seed = int(seed)
        self.cache_parent = cache_parent
        self.block_runs = 0
        self.scored = 0
        self.seconds = 0.0
        # a lazily loaded model keeps its converted block reads in host memory while the search
        # re-runs the blocks (models.placement.hold_reads, as BlockReplay does); closed by release()
        self._hold = hold_reads(adapter.model)
        self._hold_finalizer = weakref.finalize(self, self._hold.close)
        self.input_ids, self.attention_mask = input_ids, attention_mask
        nsamples, seqlen = input_ids.shape
        for t in stage_tokens:  # one line before any work when a stage cannot be drawn
            draw_sequences(int(t), nsamples, seqlen, self.seed, (0, 0))
        vocab = adapter.model.get_output_embeddings().weight.shape[0]
        self.top_k = kl_mode(nsamples * seqlen, vocab, top_k)
        hidden = adapter.model.get_input_embeddings().weight.shape[-1]
        self._state_bytes = hidden * adapter.model.get_input_embeddings().weight.element_size()
        self.reference, self.masks = self._dense_reference()

    # ---------------------------------------------------------------- setup
    @torch.no_grad()
    def _dense_reference(self) -> tuple[list, list]:
        """The dense model's reference and token mask of every calibration sequence (``[L-1, ...]``)."""
        batch = self._minibatch([(i, self.input_ids.shape[1]) for i in range(self.input_ids.shape[0])], reference=False)
        hidden = list(batch.captured.hidden)
        for i in range(self.num_blocks):
            with self.installed(i, None) as block:
                hidden = batch.captured.run_block(block, i, hidden, self.device, self.store)
            if self.progress is not None:
                self.progress("reference logits", i + 1, self.num_blocks, self.adapter.block_name(i))
        reference, masks = [], []
        for b, h in enumerate(hidden):
            ref = self._logits(h, self.top_k)
            token_mask = batch.captured.token_masks[b]
            for row in range(h.shape[0]):
                reference.append((ref[0][row], ref[1][row]) if isinstance(ref, tuple) else ref[row])
                masks.append(None if token_mask is None else token_mask[row, :-1].bool().cpu())
        return reference, masks

    @torch.no_grad()
    def _minibatch(self, sequences: list[tuple[int, int]], reference: bool = True) -> _Minibatch:
        """Block inputs of ``sequences`` (equal lengths batched together) and their references."""
        adapter = self.adapter
        parts: list[CapturedInputs] = []
        refs, masks = [], []
        groups: dict[int, list[int]] = {}
        for i, length in sequences:
            groups.setdefault(length, []).append(i)
        with ExitStack() as stack:
            for m in adapter.embedding_modules():
                stack.enter_context(onload(m, self.device))
            for length, rows in groups.items():
                ids = self.input_ids[rows, :length]
                mask = None if self.attention_mask is None else self.attention_mask[rows, :length]
                parts.append(capture_block_inputs(adapter.model, adapter.blocks, ids, mask, self.device,
                                                  self.batch_size, self.store))
                if reference:
                    for start in range(0, len(rows), self.batch_size):
                        chunk = rows[start:start + self.batch_size]
                        refs.append(self._stack([self.reference[r] for r in chunk], length - 1))
                        got = [self.masks[r] for r in chunk]
                        masks.append(None if got[0] is None else torch.stack([m[:length - 1] for m in got]))
        captured = parts[0]
        for extra in parts[1:]:
            captured.hidden.extend(extra.hidden)
            captured.calls.extend(extra.calls)
            captured.token_masks.extend(extra.token_masks)
        return _Minibatch(tokens=sum(length for _, length in sequences), captured=captured, reference=refs, masks=masks)

    @staticmethod
    def _stack(refs: list, length: int):
        if isinstance(refs[0], tuple):
            return torch.stack([r[0][:length] for r in refs]), torch.stack([r[1][:length] for r in refs])
        return torch.stack([r[:length] for r in refs])

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
    def _run(self, batch: _Minibatch, levels: Sequence[int], start: int = 0, hidden=None, keep_all: bool = False):
        hidden = list(batch.captured.hidden) if hidden is None else hidden
        states = [hidden] if keep_all else None
        for i in range(start, self.num_blocks):
            with self.installed(i, levels) as block:
                hidden = batch.captured.run_block(block, i, hidden, self.device, self.store)
            self.block_runs += 1
            if keep_all:
                states.append(hidden)
        return states if keep_all else hidden

    @torch.no_grad()
    def _kl(self, batch: _Minibatch, hidden: list[torch.Tensor]) -> float:
        total, count = 0.0, 0
        for b, h in enumerate(hidden):
            ref, mask = batch.reference[b], batch.masks[b]
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

    def _score_all(self, batch: _Minibatch, candidates: Sequence[Sequence[int]], mine: list[int],
                   parent: Sequence[int] | None) -> dict[int, float]:
        """Scores of ``candidates[i]`` for ``i`` in ``mine``: from the parent's block inputs when
        the parent is named and its states fit ``CACHE_BYTES``, else each from block 0."""
        fits = (self.num_blocks + 1) * batch.tokens * self._state_bytes <= CACHE_BYTES
        states = None
        out: dict[int, float] = {}
        for i in mine:
            levels = list(candidates[i])
            if parent is not None and self.cache_parent and fits:
                if states is None:
                    states = self._run(batch, parent, keep_all=True)
                start = self._block_levels_differ(parent, levels)
                hidden = states[-1] if start == self.num_blocks else self._run(batch, levels, start, states[start])
            else:
                hidden = self._run(batch, levels)
            out[i] = self._kl(batch, hidden)
        return out

    def release(self) -> None:
        """Let the lazy read cache go and drop the reference logits."""
        self._hold.close()
        self.reference, self.masks = [], []

    def __call__(self, candidates: Sequence[Sequence[int]], tokens: int | None, *,
                 draw: tuple[int, int] | None = None, parent: Sequence[int] | None = None) -> list[float]:
        t0 = time.perf_counter()
        nsamples, seqlen = self.input_ids.shape
        batch = self._minibatch(draw_sequences(tokens, nsamples, seqlen, self.seed, draw))
        world, me = distributed.world_size(), distributed.rank()
        mine = self._score_all(batch, candidates, [i for i in range(len(candidates)) if i % world == me],
                               None if parent is None else list(parent))
        values: dict[int, float] = {}
        for part in distributed.all_gather_objects(mine):
            values.update(part)
        self.scored += len(candidates)
        self.seconds += time.perf_counter() - t0
        return [values[i] for i in range(len(candidates))]
