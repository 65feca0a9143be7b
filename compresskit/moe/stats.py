"""Per-(layer, expert) routing statistics from one calibration pass.

For every MoE layer ℓ and routed expert e, over the calibration tokens (padding excluded):

* ``count[e]``  = number of tokens routed to e (a token counts once per expert it is routed to);
* ``sum_w[e]``  = Σ over those tokens of the routing weight g_e(x) the experts module receives;
* ``avg_w[e]``  = sum_w / count: CD-MoE's static expert weight (methods.md §7.1, ``dynamic_weight.json``);
* ``saliency[e]`` = (1/count) Σ p_e(x) · ‖f_e(x)‖₂: REAP's saliency (§7.7), f_e = the expert's output
  and p_e(x) = softmax(router logits)_e over *all* experts in fp32 — the REAP reference's gate
  (``observer.py``: ``F.softmax(router_logits)``, not renormalised), for every router kind: for a
  sigmoid / ``e_score_correction_bias`` router (DeepSeek-V3, GLM-4.5) it is not the weight the
  model applies (sigmoid, top-k normalised, times ``routed_scaling_factor``), for a softmax router
  without top-k normalisation it is exactly that weight. The tokens of an expert are those the
  model routes to it (its own top-k, with bias and groups).

``sum_w`` / ``avg_w`` hold the weights the layer really multiplies the expert outputs by (after top-k
normalisation and DeepSeek's ``routed_scaling_factor``), read by a forward pre-hook on the
layer's experts module, whose call is ``experts(hidden [T, H], top_k_index [T, k], top_k_weights
[T, k])`` in every transformers-5 MoE family and in :class:`UnfusedExperts`. The layer is known by
its module, not by a call counter (the reference's global ``global_layer % 27`` counter, §7.5).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..engine.distributed import all_reduce_sum, batch_share, is_active
from ..engine.sequential import SequentialRunner
from ..errors import UnsupportedArchitectureError
from ..models.adapters.moe import ExpertView, MoEView
from .choices import EXPERT_WEIGHTS



@dataclass
class ExpertStats:
    """Routing statistics of one MoE layer (float64 accumulators, CPU)."""

    num_experts: int
    count: torch.Tensor = field(init=False)
    sum_w: torch.Tensor = field(init=False)
    sum_saliency: torch.Tensor = field(init=False)
    tokens: int = 0  # real tokens that reached the layer

    def __post_init__(self) -> None:
        self.count = torch.zeros(self.num_experts, dtype=torch.float64)
        self.sum_w = torch.zeros(self.num_experts, dtype=torch.float64)
        self.sum_saliency = torch.zeros(self.num_experts, dtype=torch.float64)

    @property
    def avg_w(self) -> torch.Tensor:
        """sum_w / count; 0 for an expert that received no token."""
        return torch.where(self.count > 0, self.sum_w / self.count.clamp_min(1), torch.zeros_like(self.sum_w))

    @property
    def unconditional_w(self) -> torch.Tensor:
        """sum_w / tokens: the mean routed weight over *all* tokens of the layer (issue 21's constant;
        0 for an expert never routed to)."""
        return self.sum_w / max(self.tokens, 1)

    def expert_weights(self, kind: str) -> torch.Tensor:
        """The constant CD-MoE folds per expert: ``routed`` (avg_w, the paper's) or ``unconditional``."""
        if kind not in EXPERT_WEIGHTS:
            raise ValueError(f"expert weight must be one of {', '.join(EXPERT_WEIGHTS)}, got {kind!r}")
        return self.avg_w if kind == "routed" else self.unconditional_w

    @property
    def saliency(self) -> torch.Tensor:
        """REAP: mean over routed tokens of p_e(x)·‖f_e(x)‖₂ (p: :func:`reap_gate`); 0 for an expert
        never routed to."""
        return torch.where(self.count > 0, self.sum_saliency / self.count.clamp_min(1), torch.zeros_like(self.count))

    def all_reduce(self) -> None:
        """Sum the accumulators and the token count over data-parallel ranks (a no-op alone).

        Counts, weight sums and saliency sums are float64 sums over this rank's tokens, so the
        reduced values are the statistics of all ranks' tokens (``avg_w`` and ``saliency`` are
        divided afterwards), the same on every rank.
        """

        if not is_active():
            return
        for total in (self.count, self.sum_w, self.sum_saliency):
            all_reduce_sum(total)
        tokens = torch.tensor([self.tokens], dtype=torch.int64)
        all_reduce_sum(tokens)
        self.tokens = int(tokens)

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "count": [int(c) for c in self.count.tolist()],
                "sum_w": self.sum_w.tolist(), "avg_w": self.avg_w.tolist(), "saliency": self.saliency.tolist()}


def expert_act(view: MoEView) -> nn.Module:
    """The activation the routed experts use (fused module's ``act_fn``, or the first expert's)."""
    act = getattr(view.experts_module, "act_fn", None)
    if act is None and len(view.experts_module) > 0:
        act = getattr(view.experts_module[0], "act_fn", None)
    if act is None:
        raise UnsupportedArchitectureError(f"{view.path}: cannot find the experts' activation function (act_fn)")
    return act


def expert_forward(expert: ExpertView, act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """f_e(x) = W_down · (act(W_gate x) ⊙ W_up x), in ``x``'s dtype (weights cast to it)."""
    g = nn.functional.linear(x, expert.gate.to(x.dtype))
    u = nn.functional.linear(x, expert.up.to(x.dtype))
    return nn.functional.linear(act(g) * u, expert.down.to(x.dtype))


def reap_gate(router: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """REAP's gate p(x) = softmax(W_r x + b_r) over all experts, fp32 [T, E] (the reference's
    ``F.softmax(router_logits, dtype=float)``; a router's own sigmoid, correction bias, top-k
    normalisation and scaling are not part of it)."""
    weight = getattr(router, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise UnsupportedArchitectureError(f"router {type(router).__name__} has no [experts, hidden] weight; "
                                           "REAP's gate needs the router logits")
    bias = getattr(router, "bias", None)
    bias = bias.float().to(hidden.device) if isinstance(bias, torch.Tensor) else None
    logits = nn.functional.linear(hidden.float(), weight.float().to(hidden.device), bias)
    return torch.softmax(logits, dim=-1)


def routing_call(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden [T, H], top_k_index [T, k], top_k_weights [T, k]) from an experts-module call."""
    names = ("hidden_states", "top_k_index", "top_k_weights")
    values = list(args[:3]) + [kwargs.get(n) for n in names[len(args[:3]):]]
    if len(values) < 3 or any(not isinstance(v, torch.Tensor) for v in values):
        raise UnsupportedArchitectureError(
            "the experts module is not called as experts(hidden, top_k_index, top_k_weights); "
            "expert statistics need the transformers-5 MoE call convention")
    return values[0], values[1], values[2]


class ExpertStatsHook:
    """Accumulates :class:`ExpertStats` for one MoE layer from its experts-module calls."""

    def __init__(self, view: MoEView, saliency: bool = True, record_io: bool = False):
        self.view = view
        self.stats = ExpertStats(view.num_experts)
        self.saliency = saliency
        self.act = expert_act(view) if saliency else None
        self.token_mask: torch.Tensor | None = None
        #: with ``record_io``: the MoE module's input and output per batch (CPU), for CD-MoE's search
        self.record_io = record_io
        self.inputs: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []
        self.masks: list[torch.Tensor | None] = []
        self._handles: list = []

    def new_batch(self, token_mask: torch.Tensor | None) -> None:
        self.token_mask = token_mask

    @torch.no_grad()
    def _hook(self, module, args, kwargs):
        hidden, index, weights = routing_call(args, kwargs)
        keep = None
        if self.token_mask is not None and self.token_mask.numel() == hidden.shape[0]:
            keep = self.token_mask.reshape(-1).to(hidden.device)
        self.accumulate(hidden, index, weights, keep)

    def accumulate(self, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor,
                   keep: torch.Tensor | None) -> None:
        s = self.stats
        s.tokens += int(hidden.shape[0] if keep is None else keep.sum())
        views = self.view.experts
        gate = reap_gate(self.view.router, hidden) if self.saliency else None
        for e in range(s.num_experts):
            routed = index == e  # [T, k]
            if keep is not None:
                routed = routed & keep[:, None]
            token_idx, slot = torch.where(routed)
            if token_idx.numel() == 0:
                continue
            w = weights[token_idx, slot].double()
            s.count[e] += token_idx.numel()
            s.sum_w[e] += w.sum().cpu()
            if self.saliency:
                out = expert_forward(views[e], self.act, hidden[token_idx])
                norms = torch.linalg.vector_norm(out.double(), dim=-1)
                s.sum_saliency[e] += (gate[token_idx, e].double() * norms).sum().cpu()

    def _io_hook(self, module, args, output):
        self.inputs.append(args[0].detach().cpu())
        self.masks.append(None if self.token_mask is None else self.token_mask.cpu())
        self.outputs.append((output[0] if isinstance(output, (tuple, list)) else output).detach().cpu())

    def __enter__(self) -> "ExpertStatsHook":
        self._handles.append(self.view.experts_module.register_forward_pre_hook(self._hook, with_kwargs=True))
        if self.record_io:
            self._handles.append(self.view.module.register_forward_hook(self._io_hook))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def collect_expert_stats(adapter, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                         device="cpu", batch_size: int = 8, saliency: bool = True,
                         on_layer=None, progress=None, record_io: bool = False) -> dict[int, ExpertStats]:
    """One sequential calibration pass over the unmodified model; block index -> :class:`ExpertStats`.

    ``on_layer(ctx, view, hook)`` (optional) runs for each MoE block while it is on the device,
    after its statistics are complete; with ``record_io`` the hook holds the MoE module's inputs
    and outputs and ``ctx.outputs`` the block's (CD-MoE's per-layer expert search uses them).

    Data-parallel (``engine.distributed``): under torchrun each rank runs the pass on its
    ``batch_share`` of the samples and the statistics are summed over ranks
    (:meth:`ExpertStats.all_reduce`) before ``on_layer`` and before they are returned, so every
    rank holds the statistics of all samples; the recorded inputs / outputs stay this rank's
    share (scores computed from them must be reduced too). One process: all samples, as before.
    """

    share = batch_share(input_ids.shape[0], batch_size)
    input_ids = input_ids[share]
    attention_mask = None if attention_mask is None else attention_mask[share]
    found: dict[int, ExpertStats] = {}

    def visit(ctx) -> bool:
        view = adapter.moe(ctx.index)
        if view is None:
            return False
        hook = ExpertStatsHook(view, saliency=saliency, record_io=record_io)
        with hook:
            ctx.forward(on_batch=hook.new_batch)
        hook.stats.all_reduce()
        found[ctx.index] = hook.stats
        if on_layer is not None:
            on_layer(ctx, view, hook)
        return False  # measured only: the unmodified outputs feed the next block

    runner = SequentialRunner(adapter, input_ids, attention_mask, device=device, batch_size=batch_size,
                              offload_activations=True, progress=progress)
    try:
        runner.run(visit)
    finally:
        runner.release()
    return found
