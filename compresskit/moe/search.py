"""CD-MoE's two greedy searches (methods.md §7.2, §7.3), on cached activations.

**Experts, per MoE layer ℓ** (the other layers unchanged): grow E one expert at a time, adding
the candidate c that minimises D(h_ref, h_E∪{c}), where h is the output of decoder block ℓ and
D is by default the textbook Jensen–Shannon divergence over the *hidden* dimension with ε = 1e-10
(``analysis.distances.js_divergence``), averaged over tokens:

    h_E = r + Σ_{e∈E} avg_w[e] f_e(a) + S(a),   r = h_ref − MoE(a)

where a is the MoE input and r the residual the block adds it to (both cached from one forward of
the unmodified block), so a candidate costs one expert forward on the cached tokens, not a model
forward. The order is greedy, so a smaller budget is a prefix.

**Layers** (each condensed with its expert prefix): greedy over the MoE layers, adding the layer
that minimises D on the final hidden state after the final norm, replayed by
``engine.replay.BlockReplay.run_from(candidate block, swaps)``: after each choice the cached block
inputs from the chosen block on are recomputed with the chosen layers condensed (as FinerCut's
``OutputScorer.refresh`` does), so a candidate costs the blocks from its own on, not from the
first chosen layer on; the distances are the same as replaying every trial from its first block.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from typing import Callable

import torch
from torch import nn

from ..analysis.distances import DISTANCES, distance as distance_fn
from ..engine.distributed import all_reduce_floats
from ..models.adapters.moe import MoEView
from ..models.placement import onload
from .choices import EXPERT_STOPS
from .condense import shared_output
from .stats import expert_act, expert_forward

JS_EPS = 1e-10  # CD-MoE's ε inside the logs


def batched_distance(name: str, refs: list[torch.Tensor], news: list[torch.Tensor],
                     masks: list[torch.Tensor | None]) -> float:
    """D over all batches' real tokens: the token-weighted mean of per-batch means (js, kl, angular)
    or the Frobenius norm of all differences (norm).

    Data-parallel: the batches are this rank's share; the sum (``Σ rows · mean`` or ``Σ norm²``)
    and the token count are summed over ranks (``engine.distributed.all_reduce_floats``) before
    dividing, so every rank gets D over all samples and picks the same candidate. Every rank
    must call it the same number of times (the greedy loops do: their choices agree).
    """
    total, n = 0.0, 0
    for ref, new, mask in zip(refs, news, masks):
        rows = int(mask.sum()) if mask is not None else ref.numel() // ref.shape[-1]
        if rows == 0:
            continue
        d = float(distance_fn(name, ref, new, mask, js_form="textbook", eps=JS_EPS))
        total += d * d if name == "norm" else d * rows
        n += rows
    total, n = all_reduce_floats(total, n)
    if name == "norm":
        return math.sqrt(total)
    return total / max(n, 1)


@torch.no_grad()
def greedy_experts(view: MoEView, inputs: list[torch.Tensor], outputs: list[torch.Tensor],
                   block_outputs: list[torch.Tensor], masks: list[torch.Tensor | None], avg_w: list[float],
                   budget: int, shared_gate: str, gate_mean: float | None, distance: str = "js",
                   device="cpu", stop: str = "budget", post: list[nn.Module] | None = None
                   ) -> tuple[list[int], list[float]]:
    """Greedy expert order of one MoE layer and the distance after each step.

    ``inputs`` / ``outputs``: the MoE module's input and output per batch; ``block_outputs``: the
    block's output per batch (the reference hidden state). ``avg_w``: the constant each candidate
    is weighted by, the one that will be folded (``--expert-weight``). ``stop``: ``budget`` adds
    experts until ``budget`` (the reference always adds one); ``objective`` stops earlier when the
    best next expert does not lower D (a layer without shared experts always keeps one). ``post``:
    modules applied to both hidden states before D (the final norm for the model's last block: the
    reference compares ``output_hidden_states``, whose last entry is after the final norm).
    Computed in fp32 on ``device``.
    """
    if stop not in EXPERT_STOPS:
        raise ValueError(f"expert stop must be one of {', '.join(EXPERT_STOPS)}, got {stop!r}")
    if budget <= 0:
        return [], []
    act = expert_act(view)
    dev = torch.device(device)
    xs = [x.to(dev, torch.float32) for x in inputs]
    refs = [h.to(dev, torch.float32) for h in block_outputs]
    ms = [None if m is None else m.to(dev) for m in masks]
    # base = r + S(a): the block output with no routed expert condensed in
    bases = [h - y.to(dev, torch.float32) + shared_output(view, x, shared_gate, gate_mean)
             for h, y, x in zip(refs, outputs, xs)]
    with ExitStack() as stack:
        post = [stack.enter_context(onload(m, dev)) for m in post or []]

        def after(hs: list[torch.Tensor]) -> list[torch.Tensor]:
            for m in post:
                hs = [m(h) for h in hs]
            return hs

        return _grow(view, act, xs, after(refs), bases, ms, avg_w, budget, distance, stop, after)


def _grow(view, act, xs, refs, bases, ms, avg_w, budget, distance, stop, after) -> tuple[list[int], list[float]]:
    chosen: list[int] = []
    dists: list[float] = []
    # D with no routed expert: the bar the first one must clear (none without shared experts)
    current = math.inf
    if stop == "objective" and view.shared_experts is not None:
        current = batched_distance(distance, refs, after(bases), ms)
    for _ in range(min(budget, view.num_experts)):
        best: tuple[float, int] | None = None
        for c in range(view.num_experts):
            if c in chosen:
                continue
            w = float(avg_w[c])
            news = [b + w * expert_forward(view.experts[c], act, x) for b, x in zip(bases, xs)]
            d = batched_distance(distance, refs, after(news), ms)
            if best is None or d < best[0]:
                best = (d, c)
        d, c = best
        if stop == "objective" and d >= current:
            break
        current = d
        chosen.append(c)
        dists.append(d)
        w = float(avg_w[c])
        bases = [b + w * expert_forward(view.experts[c], act, x) for b, x in zip(bases, xs)]
    return chosen, dists


@torch.no_grad()
def greedy_layers(replay, mlp_paths: dict[int, str], condensed: dict[int, nn.Module], budget: int,
                  distance: str = "js", progress: Callable[[int, int, str], None] | None = None
                  ) -> tuple[list[int], list[float]]:
    """Greedy order of MoE blocks (length ``budget``) by D on the final hidden state after the final norm.

    ``condensed[i]`` is block i's condensed module, swapped in at ``mlp_paths[i]``.
    """
    refs = replay.head(replay.block_inputs[-1], logits=False)
    masks = [replay.token_mask(b) for b in range(replay.num_batches)]
    chosen: list[int] = []
    dists: list[float] = []
    num_blocks = replay.adapter.num_blocks
    for step in range(min(budget, len(condensed))):
        best: tuple[float, int] | None = None
        for cand in sorted(condensed):
            if cand in chosen:
                continue
            swaps = {mlp_paths[i]: condensed[i] for i in [*chosen, cand]}
            # replay.block_inputs already hold the chosen layers' effect (refreshed below), so a
            # candidate replays from its own block, not from the first chosen one
            hidden = replay.run_from(cand, swaps)
            d = batched_distance(distance, refs, replay.head(hidden, logits=False), masks)
            if best is None or d < best[0]:
                best = (d, cand)
        chosen.append(best[1])
        dists.append(best[0])
        if len(chosen) < min(budget, len(condensed)):  # refresh the cached inputs after the new layer
            swaps = {mlp_paths[i]: condensed[i] for i in chosen}
            for i in range(best[1], num_blocks):
                replay.block_inputs[i + 1] = replay.run_from(i, swaps, stop=i + 1)
        if progress is not None:
            progress(step + 1, budget, f"layer {best[1]} (D={best[0]:.3g})")
    return chosen, dists


def check_distance(name: str) -> str:
    if name not in DISTANCES:
        raise ValueError(f"unknown distance {name!r}; choose one of {', '.join(DISTANCES)}")
    return name
