"""Rebuilding single-sublayer removals on load: the ``removed_sublayers`` structure kind.

A FinerCut checkpoint whose blocks lack only their attention or only their MLP has no stock
transformers form yet (methods.md §8.5): transformers builds every sublayer of every layer. The
manifest lists the removed sublayers by (renumbered) block index,
``{"kind": "removed_sublayers", "attention": [i, ...], "mlp": [j, ...]}``; ``compresskit.load``
lets transformers build the model, puts the parameter-free stubs back in those places (with
their norms) and then loads the state dict strictly. The config also carries the removal as
transformers' ``per_layer_config`` (``{"<i>": {"skip": ["attention"]}}``).
"""

from __future__ import annotations

from torch import nn

from compresskit.checkpoint.structure import register_structure_kind
from compresskit.depth.removal import install_removed_sublayers, removed_kinds
from compresskit.errors import CheckpointError
from compresskit.models import get_adapter

KIND = "removed_sublayers"


def structure_entry(attention: list[int], mlp: list[int]) -> dict:
    return {"kind": KIND, "attention": sorted(int(i) for i in attention), "mlp": sorted(int(i) for i in mlp)}


def describe_removed_sublayers(model: nn.Module) -> dict | None:
    """The entry for the stubs the model holds now, by current block index (None without stubs)."""

    adapter = get_adapter(model)
    kinds = {i: removed_kinds(adapter, i) for i in range(adapter.num_blocks)}
    attention = [i for i, k in kinds.items() if "attention" in k]
    mlp = [i for i, k in kinds.items() if "mlp" in k]
    return structure_entry(attention, mlp) if attention or mlp else None


@register_structure_kind(KIND, describe=describe_removed_sublayers)
def install_removed_sublayers_structure(model: nn.Module, entry: dict) -> None:

    adapter = get_adapter(model)
    lists = {}
    for key in ("attention", "mlp"):
        value = entry.get(key, [])
        if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
            raise CheckpointError(f"a '{KIND}' structure entry has a bad '{key}' list; the manifest is corrupt")
        bad = [i for i in value if not 0 <= i < adapter.num_blocks]
        if bad:
            raise CheckpointError(f"'{KIND}' entry names block {bad[0]}, but the model has {adapter.num_blocks} blocks")
        lists[key] = value
    install_removed_sublayers(adapter, lists["attention"], lists["mlp"])
