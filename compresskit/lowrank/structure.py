"""Rebuilding low-rank checkpoints on load: the ``lowrank`` structure kind.

A WeLore checkpoint stores each factorised matrix as ``<name>.V.weight [k, in]`` and
``<name>.U.weight [out, k]`` (plus ``<name>.U.bias`` when the linear had a bias) and lists the
rank map in the manifest: ``{"kind": "lowrank", "ranks": {"model.layers.0.self_attn.q_proj": k}}``.
The reference saves a bare state dict that can only be reloaded by recomputing the same rank plan
from the singular-value cache, τ and min_ratio (methods.md §6.5); here the map alone rebuilds the
module shapes, and ``compresskit.load`` then loads the state dict strictly into them.
"""

from __future__ import annotations

from torch import nn

from compresskit.checkpoint.structure import register_structure_kind
from compresskit.errors import CheckpointError
from compresskit.lowrank.layer import LowRankLinear, install_lowrank_shells

KIND = "lowrank"


def rank_map_of(entry: dict) -> dict[str, int]:
    """The validated ``ranks`` of a manifest structure entry (module name -> positive int)."""
    ranks = entry.get("ranks")
    if not isinstance(ranks, dict) or not ranks:
        raise CheckpointError("a 'lowrank' structure entry has no 'ranks' map; the manifest is corrupt")
    for name, rank in ranks.items():
        if not isinstance(name, str) or isinstance(rank, bool) or not isinstance(rank, int):
            raise CheckpointError(f"lowrank rank map entry {name!r}: {rank!r} is not name -> integer rank")
    return dict(ranks)


def describe_lowrank(model: nn.Module) -> dict | None:
    """The entry for the ``LowRankLinear`` modules the model holds now (None without any)."""
    ranks = {name: int(m.rank) for name, m in model.named_modules() if isinstance(m, LowRankLinear)}
    return {"kind": KIND, "ranks": ranks} if ranks else None


# order 1: the factorised linears may sit inside modules that other kinds rebuild first
@register_structure_kind(KIND, describe=describe_lowrank, order=1)
def install_lowrank_structure(model: nn.Module, entry: dict) -> None:
    """Swap the mapped ``nn.Linear`` modules for zero-filled ``LowRankLinear`` shells."""
    install_lowrank_shells(model, rank_map_of(entry))
