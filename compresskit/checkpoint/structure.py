"""Module replacements a checkpoint records (``structure``), and how each kind is rebuilt and described.

A compressed model may hold modules transformers does not know (low-rank factors, condensed MoE
layers, removed sublayers). Each such *kind* registers, in the module that defines it
(``lowrank/structure.py``, ``moe/structure.py``, ``depth/structure.py``),
a loader that re-installs the replacement on a freshly built model and a describer that reads the
manifest entry off a model. The reader installs the entries of a manifest before the weights are
matched (``install_structure``); the writer records what the model holds (``describe_structure``).
"""

from __future__ import annotations

import importlib
from typing import Callable

from torch import nn

#: the modules that define structure kinds; importing one registers its kinds
KIND_MODULES = ("compresskit.lowrank.structure", "compresskit.moe.structure", "compresskit.depth.structure")

# kind -> function(model, entry) that replaces modules so the saved tensors fit again.
_LOADERS: dict[str, Callable[[nn.Module, dict], None]] = {}
# kind -> (order, function(model) -> the entry for the model as it is now, or None when the kind is absent)
_DESCRIBERS: dict[str, tuple[int, Callable[[nn.Module], dict | None]]] = {}


class UnknownStructureKind(KeyError):
    """A manifest names a structure kind this compresskit does not define."""


def register_structure_kind(kind: str, describe: Callable[[nn.Module], dict | None] | None = None, order: int = 0):
    """Register the loader of ``kind`` and the function that reads its entry off a model.

    ``order``: entries are listed, and so installed on load, in ascending order: 0 for kinds
    that replace whole sublayers (condensed MoE, removed sublayers), 1 for kinds that replace
    linears inside them (low rank).
    """
    def deco(fn):
        _LOADERS[kind] = fn
        if describe is not None:
            _DESCRIBERS[kind] = (order, describe)
        return fn

    return deco


def import_structure_kinds() -> None:
    """Import the modules that define structure kinds (they register on import)."""
    for module in KIND_MODULES:
        importlib.import_module(module)


def known_structure_kinds() -> set[str]:
    """Every structure kind this compresskit can rebuild on load."""
    import_structure_kinds()
    return set(_LOADERS)


def install_structure(model: nn.Module, entries: list[dict]) -> None:
    """Re-install every module replacement of ``entries`` (a manifest's ``structure``) on ``model``,
    in their order. An unknown kind raises ``UnknownStructureKind``; what the kind's loader raises
    passes through (the caller words it: a meta skeleton that needs real tensors, a rank map that
    does not fit)."""
    for entry in entries:
        kind = entry.get("kind")
        if kind not in _LOADERS:
            import_structure_kinds()
        if kind not in _LOADERS:
            raise UnknownStructureKind(kind)
        _LOADERS[kind](model, entry)


def describe_structure(model: nn.Module) -> list[dict]:
    """The manifest's ``structure`` for ``model`` as it is now, read off its modules.

    This is the one source of the record: whatever a chain of methods did (blocks deleted and
    renumbered, more sublayers removed, layers condensed after a factorisation), the entries name
    the modules by their current paths and block indices, so the checkpoint rebuilds exactly.
    """
    import_structure_kinds()
    entries = []
    for kind, (_, describe) in sorted(_DESCRIBERS.items(), key=lambda item: (item[1][0], item[0])):
        entry = describe(model)
        if entry:
            entries.append(entry)
    return entries


def stage_structure(model: nn.Module, kinds_made: set[str]) -> list[dict]:
    """The ``structure`` a save of ``model`` records (``describe_structure``: the input checkpoint's
    replacements and this stage's, renumbered and merged as the model now holds them). A kind the
    stage made (``kinds_made``) that no describer reads back is a bug, not a user error."""
    structure = describe_structure(model)
    missing = set(kinds_made) - {e["kind"] for e in structure}
    if missing:
        raise RuntimeError(f"structure kind(s) {sorted(missing)} are not described by the model's modules")
    return structure


def form_reason(stage_reason: str | None, stage_structure: bool, structure: list[dict]) -> str | None:
    """The manifest's ``form_reason``: the stage's own reason, unless earlier stages left module
    replacements that keep the output from being stock although this stage's result alone would be
    (FinerCut stubs, then CD-MoE stock)."""
    if structure and not stage_structure:
        kinds = ", ".join(sorted({e["kind"] for e in structure}))
        return (f"not a stock checkpoint: an earlier stage's {kinds} stays (this stage alone"
                + (f": {stage_reason}" if stage_reason else " would be stock") + ")")
    return stage_reason
