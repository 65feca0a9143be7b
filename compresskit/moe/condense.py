"""CD-MoE's condensed layer, built exactly (methods.md §7.2, §7.5).

The reference's condensed layer gives every token the same experts with constant weights:
    y = Σ_{e∈E} avg_w[ℓ,e] · f_e(x) + S(x),   f_e(x) = W_down,e (act(W_gate,e x) ⊙ W_up,e x)

A sum of SwiGLU MLPs that read the same input is one SwiGLU MLP whose intermediate dimensions
are concatenated; a constant weight c on an expert's output is folded into its ``down_proj``
columns: c·W_down,e (act(W_gate,e x) ⊙ W_up,e x). So

    gate = [S.gate; e₁.gate; …],  up = [S.up; e₁.up; …],  down = [c_S·S.down | w₁·e₁.down | …]

with c_S = 1 for DeepSeek's shared experts. Qwen-MoE scales its shared expert per token by
σ(g·x), which no constant can reproduce: ``shared_gate="exact"`` keeps that shared expert and its
gate beside the folded routed part (exact); ``"constant"`` folds c_S = mean σ(g·x) over the
calibration tokens (an approximation whose cost the search measures). The router and the other
experts are not part of the module: replacing the MoE block by it removes them from the model.
"""

from __future__ import annotations

import torch
from torch import nn

from ..engine.distributed import all_reduce_floats
from ..errors import InputError, UnsupportedArchitectureError
from ..models.adapters.moe import MoEView
from .choices import SHARED_GATE_MODES
from .stats import expert_act



class SwiGLU(nn.Module):
    """``down(act(gate(x)) * up(x))`` without biases: the layout of every MoE family's dense MLP."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: nn.Module, dtype=None, device=None):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False, dtype=dtype, device=device)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False, dtype=dtype, device=device)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False, dtype=dtype, device=device)
        self.act_fn = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class CondensedMoE(nn.Module):
    """A condensed MoE layer: ``y = down(act(gate x) ⊙ up x) [+ σ(shared_expert_gate x) · shared_expert(x)]``.

    ``gate_proj``/``up_proj``/``down_proj`` hold the folded experts (absent when nothing was
    folded: CD-MoE-S with an exact gated shared expert). ``shared_expert``/``shared_expert_gate``
    exist only for a token-gated shared expert kept exactly.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, act: nn.Module,
                 gated_shared_intermediate: int = 0, dtype=None, device=None):
        super().__init__()
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.act_fn = act
        if intermediate_size > 0:
            self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False, dtype=dtype, device=device)
            self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False, dtype=dtype, device=device)
            self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False, dtype=dtype, device=device)
        if gated_shared_intermediate > 0:
            self.shared_expert = SwiGLU(hidden_size, gated_shared_intermediate, act, dtype, device)
            self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False, dtype=dtype, device=device)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states
        y = torch.zeros_like(x)
        if self.intermediate_size > 0:
            y = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        if hasattr(self, "shared_expert"):
            y = y + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return y


def _shared_weights(shared: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mods = [getattr(shared, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    if not all(isinstance(m, nn.Linear) for m in mods):
        raise UnsupportedArchitectureError(f"shared expert {type(shared).__name__} is not a gate/up/down SwiGLU MLP")
    if any(m.bias is not None for m in mods):
        raise UnsupportedArchitectureError("shared experts with biases are not supported by CD-MoE condensation")
    return mods[0].weight, mods[1].weight, mods[2].weight


def folded_weights(view: MoEView, experts: list[int], avg_w: list[float], shared_coef: float | None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate [I, H], up [I, H], down [H, I]) of the folded MLP, in fp32.

    ``shared_coef``: the constant on the shared expert (1.0 for an ungated one, mean σ for the
    constant-gate approximation), or None to leave the shared expert out (kept exactly elsewhere).
    """
    gates, ups, downs = [], [], []
    if shared_coef is not None and view.shared_experts is not None:
        g, u, d = _shared_weights(view.shared_experts)
        gates.append(g.float())
        ups.append(u.float())
        downs.append(d.float() * shared_coef)
    for e in experts:
        if not 0 <= e < view.num_experts:
            raise InputError(f"{view.path}: expert {e} does not exist (the layer has {view.num_experts})")
        ex = view.experts[e]
        gates.append(ex.gate.float())
        ups.append(ex.up.float())
        downs.append(ex.down.float() * float(avg_w[e]))
    hidden = view.experts[0].gate.shape[1]
    if not gates:
        empty = torch.zeros(0, hidden)
        return empty, empty, empty.T
    return torch.cat(gates, 0), torch.cat(ups, 0), torch.cat(downs, 1)


@torch.no_grad()
def build_condensed(view: MoEView, experts: list[int], avg_w: list[float], shared_gate: str = "exact",
                    gate_mean: float | None = None, dtype=None, device=None, reuse_shared: bool = False
                    ) -> CondensedMoE:
    """The condensed module of one MoE layer (weights copied; ``reuse_shared`` moves the original
    gated shared expert into it instead of copying it)."""
    if shared_gate not in SHARED_GATE_MODES:
        raise InputError(f"--shared-gate must be one of {', '.join(SHARED_GATE_MODES)}, got {shared_gate!r}")
    ref = view.experts[0].gate
    dtype = dtype or ref.dtype
    device = device or ref.device
    gated = view.shared_expert_gate is not None and view.shared_experts is not None
    if gated and shared_gate == "constant" and gate_mean is None:
        raise InputError(f"{view.path}: --shared-gate constant needs the calibration mean of the shared gate")
    shared_coef = None if (gated and shared_gate == "exact") else (gate_mean if gated else 1.0)
    gate, up, down = folded_weights(view, experts, avg_w, shared_coef)
    hidden = ref.shape[1]
    keep_gated = gated and shared_gate == "exact"
    shared_inter = _shared_weights(view.shared_experts)[0].shape[0] if keep_gated else 0
    act = expert_act(view)
    module = CondensedMoE(hidden, gate.shape[0], act, 0 if reuse_shared else shared_inter, dtype=dtype, device=device)
    if gate.shape[0] > 0:
        module.gate_proj.weight.copy_(gate)
        module.up_proj.weight.copy_(up)
        module.down_proj.weight.copy_(down)
    if keep_gated:
        if reuse_shared:
            module.shared_expert = view.shared_experts
            module.shared_expert_gate = view.shared_expert_gate
        else:
            g, u, d = _shared_weights(view.shared_experts)
            module.shared_expert.gate_proj.weight.copy_(g)
            module.shared_expert.up_proj.weight.copy_(u)
            module.shared_expert.down_proj.weight.copy_(d)
            module.shared_expert_gate.weight.copy_(view.shared_expert_gate.weight)
    return module


def shared_output(view: MoEView, x: torch.Tensor, shared_gate: str, gate_mean: float | None) -> torch.Tensor:
    """S(x) as the condensed layer computes it: σ(g·x)·shared(x) exactly, or gate_mean·shared(x)."""
    if view.shared_experts is None:
        return torch.zeros_like(x)
    g, u, d = (w.to(x.dtype) for w in _shared_weights(view.shared_experts))
    act = expert_act(view)
    out = nn.functional.linear(act(nn.functional.linear(x, g)) * nn.functional.linear(x, u), d)
    if view.shared_expert_gate is None:
        return out
    if shared_gate == "constant":
        return out * gate_mean
    return torch.sigmoid(nn.functional.linear(x, view.shared_expert_gate.weight.to(x.dtype))) * out


def shared_gate_mean(view: MoEView, inputs: list[torch.Tensor], masks: list[torch.Tensor | None]) -> float | None:
    """Mean of σ(shared_expert_gate(x)) over the real calibration tokens (None without a gate).

    Data-parallel: ``inputs`` are this rank's batches; the sum and the token count are summed over
    ranks (``engine.distributed.all_reduce_floats``) before dividing, so every rank gets the mean
    over all tokens (one process: unchanged).
    """

    gate = view.shared_expert_gate
    if gate is None:
        return None
    total, n = 0.0, 0
    for x, mask in zip(inputs, masks):
        s = torch.sigmoid(nn.functional.linear(x.float(), gate.weight.float().to(x.device))).squeeze(-1)
        if mask is not None:
            s = s[mask.to(s.device).bool()]
        total += float(s.double().sum())
        n += s.numel()
    total, n = all_reduce_floats(total, n)
    return total / max(n, 1)


def condensed_intermediate(view: MoEView, num_experts: int, shared_gate: str) -> tuple[int, int]:
    """(folded intermediate size, kept gated-shared intermediate size) of a layer condensed to ``num_experts``."""
    inter = view.experts[0].intermediate_size * num_experts
    shared = _shared_weights(view.shared_experts)[0].shape[0] if view.shared_experts is not None else 0
    gated = view.shared_expert_gate is not None and view.shared_experts is not None
    if gated and shared_gate == "exact":
        return inter, shared
    return inter + shared, 0
