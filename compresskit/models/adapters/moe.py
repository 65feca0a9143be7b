"""Uniform views of Mixture-of-Experts layers, whatever the storage layout.

transformers ≥ 5 stores the routed experts of a layer *fused*: one ``gate_up_proj`` parameter
``[E, 2I, H]`` (gate rows first, then up rows: the forward does ``linear(x, W).chunk(2)`` →
``gate, up``) and one ``down_proj`` ``[E, H, I]``; a class flagged ``is_transposed`` stores
``[E, H, 2I]`` / ``[E, I, H]`` instead. Older and remote-code models (DeepSeekMoE-16B,
Qwen1.5-MoE, Mixtral in 4.x) keep one ``nn.Linear`` per expert (``gate_proj/up_proj/down_proj``
or Mixtral's ``w1/w3/w2``). :class:`ExpertView` exposes each expert's ``gate``, ``up`` and
``down`` weights as ``[I, H]``, ``[I, H]``, ``[H, I]`` tensors that alias the model's storage in
both layouts, so in-place edits (pruning masks, condensing) land in the model.

:class:`UnfusedExperts` is the per-expert ``nn.Linear`` stand-in that
:func:`unfuse_experts` swaps in temporarily so forward hooks see each expert's routed tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from compresskit.errors import UnsupportedArchitectureError

# Per-expert linear names: (gate, up, down). Mixtral 4.x: w1 = gate, w3 = up, w2 = down.
_PER_EXPERT_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))
_ROUTER_NAMES = ("gate", "router")
_SHARED_EXPERT_NAMES = ("shared_experts", "shared_expert")


@dataclass(frozen=True)
class ExpertView:
    """One routed expert: weight views aliasing the model (``gate``/``up`` ``[I, H]``, ``down`` ``[H, I]``)."""

    index: int
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor

    @property
    def intermediate_size(self) -> int:
        return self.gate.shape[0]


@dataclass(frozen=True)
class MoEView:
    """The MoE sublayer of one block, in one vocabulary for every family and layout.

    ``module`` is the MoE block (``mlp`` of the decoder layer), ``path`` its full module path;
    ``router`` is excluded from pruning everywhere; ``shared_expert_gate`` is Qwen-MoE's
    1-output linear whose sigmoid scales the shared expert per token.
    """

    path: str
    module: nn.Module
    router: nn.Module
    experts_module: nn.Module
    experts: list[ExpertView]
    num_experts: int
    top_k: int
    shared_experts: nn.Module | None
    shared_expert_gate: nn.Module | None
    fused: bool

    @property
    def experts_path(self) -> str:
        return f"{self.path}.experts"


def is_moe_module(mlp: nn.Module | None) -> bool:
    return mlp is not None and hasattr(mlp, "experts") and _router_of(mlp) is not None


def _router_of(mlp: nn.Module) -> nn.Module | None:
    for name in _ROUTER_NAMES:
        module = getattr(mlp, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


def router_and_gate_names(mlp: nn.Module) -> set[str]:
    """Child names of an MoE block that are routing, not computation (never pruned)."""
    names = {n for n in _ROUTER_NAMES if isinstance(getattr(mlp, n, None), nn.Module)}
    if isinstance(getattr(mlp, "shared_expert_gate", None), nn.Module):
        names.add("shared_expert_gate")
    return names


def is_fused_experts(experts: nn.Module) -> bool:
    gate_up = getattr(experts, "gate_up_proj", None)
    down = getattr(experts, "down_proj", None)
    return isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.dim() == 3


def _check_fused_layout(experts: nn.Module) -> None:
    """Refuse fused layouts whose gate/up split or extra terms we do not reproduce exactly."""
    from transformers.integrations import moe as hf_moe

    apply_gate = getattr(type(experts), "_apply_gate", None)
    default_gate = getattr(hf_moe, "_default_apply_gate", None)
    problems = []
    if apply_gate is None or apply_gate is not default_gate:
        problems.append("a custom gate/up split")
    if getattr(experts, "has_bias", False):
        problems.append("expert biases")
    if not getattr(experts, "has_gate", True):
        problems.append("no gate projection")
    if getattr(experts, "has_post_expert_norm", False):
        problems.append("a post-expert norm")
    if problems:
        raise UnsupportedArchitectureError(
            f"fused experts class {type(experts).__name__} uses {', '.join(problems)}; compresskit "
            "supports fused experts with concatenated [gate; up] weights and no biases"
        )


def _fused_expert_views(experts: nn.Module) -> list[ExpertView]:
    _check_fused_layout(experts)
    gate_up = experts.gate_up_proj.detach()
    down = experts.down_proj.detach()
    transposed = bool(getattr(experts, "is_transposed", False))
    views = []
    for e in range(gate_up.shape[0]):
        if transposed:  # [E, H, 2I] and [E, I, H]
            inter = gate_up.shape[2] // 2
            g, u, d = gate_up[e, :, :inter].T, gate_up[e, :, inter:].T, down[e].T
        else:  # [E, 2I, H] and [E, H, I]
            inter = gate_up.shape[1] // 2
            g, u, d = gate_up[e, :inter], gate_up[e, inter:], down[e]
        views.append(ExpertView(e, g, u, d))
    return views


def _per_expert_linears(expert: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
    for names in _PER_EXPERT_NAMES:
        mods = [getattr(expert, n, None) for n in names]
        if all(isinstance(m, nn.Linear) for m in mods):
            return mods[0], mods[1], mods[2]
    raise UnsupportedArchitectureError(
        f"expert module {type(expert).__name__} has neither gate_proj/up_proj/down_proj nor w1/w3/w2 linears"
    )


def expert_views(experts: nn.Module) -> list[ExpertView]:
    if is_fused_experts(experts):
        return _fused_expert_views(experts)
    views = []
    for e, expert in enumerate(experts):
        gate, up, down = _per_expert_linears(expert)
        views.append(ExpertView(e, gate.weight.detach(), up.weight.detach(), down.weight.detach()))
    return views


def build_moe_view(mlp: nn.Module, path: str, config_top_k: int | None) -> MoEView:
    router = _router_of(mlp)
    experts = mlp.experts
    views = expert_views(experts)
    top_k = getattr(router, "top_k", None) or getattr(mlp, "top_k", None) or config_top_k
    shared = next((getattr(mlp, n) for n in _SHARED_EXPERT_NAMES if isinstance(getattr(mlp, n, None), nn.Module)), None)
    return MoEView(
        path=path,
        module=mlp,
        router=router,
        experts_module=experts,
        experts=views,
        num_experts=len(views),
        top_k=int(top_k) if top_k is not None else 0,
        shared_experts=shared,
        shared_expert_gate=getattr(mlp, "shared_expert_gate", None),
        fused=is_fused_experts(experts),
    )


def _aliasing_linear(weight: torch.Tensor, requires_grad: bool) -> nn.Linear:
    """An ``nn.Linear`` whose weight *is* ``weight``'s storage (built on meta: no wasted init)."""
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=False, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=requires_grad)
    return linear


class ExpertMLP(nn.Module):
    """One expert as three linears: ``down(act(gate(x)) * up(x))``, the fused module's math."""

    def __init__(self, gate_proj: nn.Linear, up_proj: nn.Linear, down_proj: nn.Linear, act_fn: nn.Module):
        super().__init__()
        self.gate_proj = gate_proj
        self.up_proj = up_proj
        self.down_proj = down_proj
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class UnfusedExperts(nn.ModuleList):
    """Drop-in for a fused experts module: same ``forward(hidden_states, top_k_index, top_k_weights)``.

    Children are ``ExpertMLP`` modules named ``0..E-1``, so inside a block the linears are named
    ``mlp.experts.3.gate_proj`` exactly like per-expert checkpoints. Each expert only sees the
    tokens routed to it (an expert that receives no token is not called, so its hooks do not fire),
    and its output is scaled by the routing weight after ``down_proj``, as in transformers' eager
    experts forward.
    """

    def __init__(self, experts: list[ExpertMLP], hidden_dim: int, intermediate_dim: int):
        super().__init__(experts)
        self.num_experts = len(experts)
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        final = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            token_idx, top_k_pos = torch.where(top_k_index == e)
            if token_idx.numel() == 0:
                continue
            out = expert(hidden_states[token_idx]) * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final


def build_unfused(fused: nn.Module) -> UnfusedExperts:
    """Per-expert linears whose weights alias the fused tensors (no copy, no extra memory)."""
    views = _fused_expert_views(fused)
    requires_grad = fused.gate_up_proj.requires_grad
    experts = [
        ExpertMLP(
            _aliasing_linear(v.gate, requires_grad),
            _aliasing_linear(v.up, requires_grad),
            _aliasing_linear(v.down, requires_grad),
            fused.act_fn,
        )
        for v in views
    ]
    return UnfusedExperts(experts, hidden_dim=views[0].gate.shape[1], intermediate_dim=views[0].gate.shape[0])


@torch.no_grad()
def write_back(unfused: UnfusedExperts, fused: nn.Module) -> None:
    """Copy the per-expert weights into the fused tensors, following the block's device and dtype.

    The linears alias the fused storage, so in-place edits are already there; the copy catches
    weights that were *replaced* (``linear.weight = ...``) or moved with the block (``.to(cuda)``
    moves the swapped-in module, not the detached fused one).
    """
    ref = unfused[0].gate_proj.weight
    fused.to(device=ref.device, dtype=ref.dtype)
    for view, expert in zip(_fused_expert_views(fused), unfused):
        for dst, linear in ((view.gate, expert.gate_proj), (view.up, expert.up_proj), (view.down, expert.down_proj)):
            if linear.weight.data_ptr() != dst.data_ptr() or linear.weight.stride() != dst.stride():
                dst.copy_(linear.weight)


@contextmanager
def unfuse_experts(moe_module: nn.Module) -> Iterator[nn.Module]:
    """Swap ``moe_module.experts`` for :class:`UnfusedExperts` while the context is open.

    Yields the experts module in use (the unfused one, or the original when it is already
    per-expert: then this is a no-op). On exit, even after an exception, weights are written back
    and the fused module is restored in its place.
    """
    fused = moe_module.experts
    if not is_fused_experts(fused):
        yield fused
        return
    unfused = build_unfused(fused)
    moe_module.experts = unfused
    try:
        yield unfused
    finally:
        current = moe_module.experts
        write_back(current if isinstance(current, UnfusedExperts) else unfused, fused)
        moe_module.experts = fused
