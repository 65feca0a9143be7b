"""Checkpoint forms of condensed MoE layers (methods.md §7.5, §7.8).

Two forms, the most standard one the architecture allows:

* **stock**: the condensed layers become the family's own dense MLP, so plain
  ``AutoModelForCausalLM.from_pretrained`` rebuilds them. Qwen2/3-MoE: the layer index joins
  ``mlp_only_layers`` and the MLP has the config's single ``intermediate_size``; DeepSeek-V2/V3:
  ``first_k_dense_replace`` grows to cover them, possible only when dense and condensed layers
  form a prefix. Smaller condensed MLPs are zero-padded (zero gate/up rows and zero down columns
  add act(0)·0 = 0: exact). Impossible when a token-gated shared expert is kept exactly (a dense
  MLP has no gate) or when a condensed MLP is wider than ``intermediate_size``.
* **structure** (``kind: "cdmoe_condensed"``): each condensed block is a :class:`CondensedMoE` whose
  sizes the manifest lists; ``compresskit.load`` installs the shells and loads the tensors strictly.
"""

from __future__ import annotations

import sys

import torch
from torch import nn
from transformers.activations import ACT2FN

from ..checkpoint.structure import register_structure_kind
from ..errors import CheckpointError
from .condense import CondensedMoE

KIND = "cdmoe_condensed"

# model_type -> (dense MLP class name in its modeling module, how dense layers are declared)
_STOCK_DENSE = {
    "qwen2_moe": ("Qwen2MoeMLP", "mlp_only_layers"),
    "qwen3_moe": ("Qwen3MoeMLP", "mlp_only_layers"),
    "deepseek_v2": ("DeepseekV2MLP", "first_k_dense_replace"),
    "deepseek_v3": ("DeepseekV3MLP", "first_k_dense_replace"),
}


def structure_entry(model: nn.Module, layers: dict[str, CondensedMoE]) -> dict:
    """The manifest entry that rebuilds ``layers`` (module path -> condensed module)."""
    return {"kind": KIND, "hidden_act": model.config.get_text_config().hidden_act,
            "layers": {path: {"intermediate_size": m.intermediate_size,
                              "gated_shared_intermediate": m.shared_expert.gate_proj.out_features
                              if hasattr(m, "shared_expert") else 0}
                       for path, m in layers.items()}}


def describe_condensed(model: nn.Module) -> dict | None:
    """The entry for the :class:`CondensedMoE` layers the model holds now (None without any)."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, CondensedMoE)}
    return structure_entry(model, layers) if layers else None


@register_structure_kind(KIND, describe=describe_condensed)
def install_condensed_shells(model: nn.Module, entry: dict) -> None:
    """Replace each listed MoE block by a zero-filled :class:`CondensedMoE` of the recorded sizes."""
    layers = entry.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise CheckpointError(f"a '{KIND}' structure entry has no 'layers' map; the manifest is corrupt")
    act = ACT2FN[entry.get("hidden_act", "silu")]
    hidden = model.config.get_text_config().hidden_size
    dtype = next(model.parameters()).dtype
    for path, sizes in layers.items():
        try:
            inter, shared = int(sizes["intermediate_size"]), int(sizes["gated_shared_intermediate"])
            parent_path, _, name = path.rpartition(".")
            parent = model.get_submodule(parent_path)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"'{KIND}' entry {path!r} does not fit this model: {exc}") from None
        shell = CondensedMoE(hidden, inter, act, shared, dtype=dtype)
        for p in shell.parameters():
            nn.init.zeros_(p)
        setattr(parent, name, shell)


def stock_form_problem(model: nn.Module, blocks: dict[int, CondensedMoE], num_blocks: int,
                       dense_blocks: set[int]) -> str | None:
    """Why the condensed ``blocks`` cannot be a stock checkpoint (None when they can)."""
    config = model.config.get_text_config()
    kind = _STOCK_DENSE.get(config.model_type)
    if kind is None:
        return f"{config.model_type} has no config key for dense layers at chosen positions"
    if any(hasattr(m, "shared_expert") for m in blocks.values()):
        return ("the token-gated shared expert is kept exactly (--shared-gate exact) and a dense MLP has no gate; "
                "--shared-gate constant folds it (an approximation) and allows the stock form")
    widest = max(m.intermediate_size for m in blocks.values())
    if widest > config.intermediate_size:
        return (f"a condensed MLP ({widest}) is wider than the dense MLPs' intermediate_size "
                f"({config.intermediate_size}) the config allows")
    if kind[1] == "first_k_dense_replace":
        dense = dense_blocks | set(blocks)
        if dense != set(range(len(dense))):
            return (f"{config.model_type} declares dense layers only as a prefix (first_k_dense_replace) and the "
                    f"dense + condensed layers {sorted(dense)} are not one")
    return None


@torch.no_grad()
def padded_dense_mlp(model: nn.Module, condensed: CondensedMoE) -> nn.Module:
    """The family's dense MLP of ``intermediate_size``, holding ``condensed`` zero-padded (exact)."""
    config = model.config.get_text_config()
    cls = getattr(sys.modules[type(model).__module__], _STOCK_DENSE[config.model_type][0])
    width = config.intermediate_size
    ref = condensed.gate_proj.weight if condensed.intermediate_size else next(condensed.parameters(), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None else next(model.parameters()).dtype
    with torch.device("meta"):
        mlp = cls(config, intermediate_size=width)
    inter, hidden = condensed.intermediate_size, condensed.hidden_size
    gate = torch.zeros(width, hidden, dtype=dtype, device=device)
    up = torch.zeros(width, hidden, dtype=dtype, device=device)
    down = torch.zeros(hidden, width, dtype=dtype, device=device)
    if inter:
        gate[:inter] = condensed.gate_proj.weight
        up[:inter] = condensed.up_proj.weight
        down[:, :inter] = condensed.down_proj.weight
    mlp.gate_proj.weight = nn.Parameter(gate, requires_grad=False)
    mlp.up_proj.weight = nn.Parameter(up, requires_grad=False)
    mlp.down_proj.weight = nn.Parameter(down, requires_grad=False)
    return mlp


def declare_dense_layers(model: nn.Module, blocks: list[int], dense_blocks: set[int]) -> str:
    """Rewrite the config so ``blocks`` are built as dense MLPs; returns the key that changed."""
    config = model.config.get_text_config()
    key = _STOCK_DENSE[config.model_type][1]
    if key == "mlp_only_layers":
        config.mlp_only_layers = sorted(set(config.mlp_only_layers or []) | set(blocks))
    else:
        config.first_k_dense_replace = len(dense_blocks | set(blocks))
    return key
