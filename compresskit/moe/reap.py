"""REAP-style expert removal (methods.md §7.7; llm-compressor ≥ 0.13).

Per MoE layer the experts with the lowest saliency S_j = mean over routed tokens of
g_j(x)·‖f_j(x)‖₂ (g = softmax of the router logits over all experts, the reference's gate,
also for sigmoid / bias-corrected routers: ``moe.stats.reap_gate``) are removed: their weights
(fused 3-D tensors or per-expert modules) and their router rows (``weight``, ``bias``,
``e_score_correction_bias``). Group-limited routers
(``n_group`` > 1) lose the same number of experts in every group, so the groups stay equal.
``top_k`` is kept; only the config's expert-count key changes, so the result is a stock
checkpoint. Every MoE layer loses the same count (the config holds one expert count).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InputError
from ..models.adapters.moe import MoEView

EXPERT_COUNT_KEYS = ("n_routed_experts", "num_local_experts", "num_experts")
_ROUTER_ROW_TENSORS = ("weight", "bias", "e_score_correction_bias")


def experts_to_remove(num_experts: int, fraction: float) -> int:
    """round(fraction · E), the per-layer count REAP removes."""
    return int(round(fraction * num_experts))


def kept_experts(saliency: torch.Tensor, remove: int, groups: int = 1) -> list[int]:
    """Indices (ascending) kept after dropping the ``remove`` lowest-saliency experts.

    With ``groups`` > 1 the experts are split into equal contiguous groups and ``remove / groups``
    are dropped from each (ties: the lower index is dropped first).
    """
    n = saliency.numel()
    if groups < 1 or n % groups or remove % groups:
        raise InputError(f"removing {remove} of {n} experts cannot be split evenly over {groups} router groups; "
                         f"choose a multiple of {groups}")
    size, per_group = n // groups, remove // groups
    keep: list[int] = []
    for g in range(groups):
        idx = list(range(g * size, (g + 1) * size))
        order = sorted(idx, key=lambda i: (float(saliency[i]), i))
        dropped = set(order[:per_group])
        keep += [i for i in idx if i not in dropped]
    return keep


def router_groups(config) -> int:
    groups = getattr(config, "n_group", None)
    return int(groups) if groups else 1


def check_removal(num_experts: int, remove: int, top_k: int, groups: int = 1, topk_group: int | None = None) -> None:
    """Refuse, from the config alone (before any calibration), a removal that leaves fewer experts than
    top_k, that a group-limited router cannot split evenly over its groups, or that leaves the groups
    it picks from too small to hold top_k experts."""
    left = num_experts - remove
    if remove < 1:
        raise InputError(f"--remove-experts removes round(fraction × {num_experts}) = {remove} experts per layer; "
                         f"use a fraction ≥ {0.5 / num_experts:.3g}")
    if left < top_k:
        raise InputError(f"removing {remove} of {num_experts} experts per layer leaves {left} < top_k = {top_k}; "
                         f"the router picks {top_k} experts per token")
    if groups > 1:
        size = num_experts // groups
        if remove % groups:
            fits = [r for r in range(groups, num_experts, groups) if num_experts - r >= top_k]
            hint = (f"; e.g. --remove-experts {min(fits, key=lambda r: abs(r - remove)) / num_experts:g}" if fits else "")
            raise InputError(f"removing {remove} of {num_experts} experts per layer: the router scores {groups} groups "
                             f"of {size} experts (n_group) and every group must lose the same number, so remove a "
                             f"multiple of {groups}{hint}")
        if topk_group and (left // groups) * topk_group < top_k:
            raise InputError(f"removing {remove} of {num_experts} experts leaves {left // groups} per group; the router "
                             f"picks its top_k = {top_k} experts only from the best topk_group = {topk_group} of its "
                             f"{groups} groups, which would then hold {(left // groups) * topk_group} < {top_k}")


@torch.no_grad()
def remove_experts(view: MoEView, keep: list[int]) -> None:
    """Keep only experts ``keep`` in this layer (weights and router rows), in place on the model."""
    index = torch.tensor(keep, dtype=torch.long)
    experts = view.experts_module
    if view.fused:
        for name in ("gate_up_proj", "down_proj"):
            old = getattr(experts, name)
            setattr(experts, name, nn.Parameter(old.data[index.to(old.device)].clone(), requires_grad=old.requires_grad))
        for bias in ("gate_up_proj_bias", "down_proj_bias"):
            old = getattr(experts, bias, None)
            if isinstance(old, torch.Tensor):
                setattr(experts, bias, nn.Parameter(old.data[index.to(old.device)].clone()))
    else:
        kept_modules = [experts[i] for i in keep]
        for i in range(len(experts) - 1, -1, -1):
            del experts[i]
        for m in kept_modules:
            experts.append(m)
    router = view.router
    for name in _ROUTER_ROW_TENSORS:
        old = getattr(router, name, None)
        if not isinstance(old, torch.Tensor):
            continue
        new = old.data[index.to(old.device)].clone()
        if isinstance(old, nn.Parameter):
            setattr(router, name, nn.Parameter(new, requires_grad=old.requires_grad))
        else:
            router.register_buffer(name, new)
    for module in (view.module, router, experts):
        for attr in ("num_experts", "n_routed_experts", "num_local_experts"):
            if isinstance(getattr(module, attr, None), int) and not isinstance(getattr(module, attr), bool):
                setattr(module, attr, len(keep))


def set_expert_count(config, count: int) -> str:
    """Rewrite the config's expert-count key (the first of EXPERT_COUNT_KEYS it really holds)."""
    text = config.get_text_config()
    own = text.to_dict()
    key = next((k for k in EXPERT_COUNT_KEYS if k in own), None)
    if key is None:
        raise InputError(f"{text.model_type}: no expert-count key ({', '.join(EXPERT_COUNT_KEYS)}) in the config")
    setattr(text, key, count)
    return key
