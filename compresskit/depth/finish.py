"""The one way a depth search's choice becomes the saved model: FinerCut and EvoPress share it.

After the search has installed its removal stubs (``depth/removal.remove_sublayer``), blocks
that are now identities are deleted and the rest renumbered (``depth/blocks.delete_blocks``),
transformers' ``per_layer_config`` is recorded for the blocks that keep one sublayer, the
rewritten config is checked to rebuild the kept blocks (``check_config_rebuilds``), and the
checkpoint's form is decided: only whole blocks gone → a stock checkpoint (plain
``from_pretrained``); any single sublayer gone → the ``removed_sublayers`` structure entry that
``compresskit.load`` rebuilds (``depth/structure.py``). methods.md §8.5.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from .blocks import check_config_rebuilds, delete_blocks, record_per_layer_config
from .removal import removed_kinds
from .structure import structure_entry

#: why a result holding single-sublayer removals is not a stock checkpoint
SUBLAYER_FORM_REASON = (
    "blocks without their attention or MLP have no stock transformers form yet (transformers builds every "
    "sublayer even with per_layer_config 'skip', recorded in config.json); compresskit.load puts the removed "
    "sublayers' stubs back")
#: why a result of whole-block removals only is stock
BLOCK_FORM_REASON = (
    "only whole blocks were removed: layers renumbered, num_hidden_layers lowered and every per-layer config "
    "field rewritten explicitly, so plain from_pretrained builds it")


@dataclass
class FinishedRemoval:
    """``kept_blocks``: old indices of the kept blocks (None: no block deleted); ``per_layer_config``:
    the recorded skips by new index; ``structure``: the manifest's structure entries; ``form_reason``."""

    kept_blocks: list[int] | None
    per_layer_config: dict
    structure: list[dict] = field(default_factory=list)
    form_reason: str = BLOCK_FORM_REASON


def delete_empty_blocks(adapter, level: str, removed_blocks: set[int]) -> list[int] | None:
    """Delete blocks that are now identities; returns the kept old indices (None: nothing deleted).

    At ``level == "block"`` the blocks the search removed go (their stubs are installed, they hold
    no parameter); otherwise every block with both sublayers stubbed and no parameter left."""

    drop = set(removed_blocks) if level == "block" else {
        i for i in range(adapter.num_blocks)
        if len(removed_kinds(adapter, i)) == 2 and not any(True for _ in adapter.block(i).parameters())
    }
    return delete_blocks(adapter, drop) if drop else None


def finish_removal(model, adapter, level: str, removed_blocks: set[int]) -> FinishedRemoval:
    """Delete identity blocks, record ``per_layer_config``, check the config rebuilds the model and
    say which checkpoint form the result has (see the module docstring)."""

    kept = delete_empty_blocks(adapter, level, removed_blocks)
    skips = record_per_layer_config(adapter)
    check_config_rebuilds(model, adapter)
    if not skips:
        return FinishedRemoval(kept, skips, [], BLOCK_FORM_REASON)
    structure = [structure_entry([int(i) for i, s in skips.items() if "attention" in s["skip"]],
                                 [int(i) for i, s in skips.items() if "mlp" in s["skip"]])]
    return FinishedRemoval(kept, skips, structure, SUBLAYER_FORM_REASON)
