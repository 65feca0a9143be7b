"""FinerCut's candidate set: which sublayers (or whole blocks) the greedy search may remove.

methods.md §8.1. At the default level ``sublayer`` every attention sublayer and every MLP (or
MoE) sublayer is one candidate: 2L candidates for L blocks. ``attn`` / ``mlp`` keep one kind only
(L candidates), ``block`` makes each whole block one candidate (the ShortGPT-style baseline).

Front exclusion (the reference's ``-x``): with ``x > 0`` the first ``int(2L·x/2) + 1`` blocks
are withheld from the search and put back once ``int(N·x) + 1`` candidates have been removed,
N being the number of candidates at the level (N = 2L for ``sublayer``; Llama-3-8B, x = 0.4:
blocks 0–12 withheld, put back after 26 removals). For the one-kind and block levels this
generalisation (same withheld blocks, threshold over their own N) is ours; the reference only
documents the sublayer level.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from ..errors import InputError
from .removal import sublayer_modules

LEVELS = ("sublayer", "block", "attn", "mlp")
KINDS = ("attn", "mlp", "block")


@dataclass(frozen=True)
class Candidate:
    """One removable unit: the attention or MLP sublayer of block ``block``, or the whole block."""

    block: int
    kind: str  # "attn" | "mlp" | "block"
    name: str  # full module path (the block's path for kind "block")
    params: int  # parameters removed with it (the sublayer and its norms)

    def label(self) -> str:
        return f"{self.kind}{self.block}"


def _numel(modules: list[nn.Module]) -> int:
    seen: set[int] = set()
    total = 0
    for module in modules:
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()  # shapes only: works on meta / lazily loaded tensors
    return total


def build_candidates(adapter, level: str, keep: str | None = None) -> list[Candidate]:
    """All candidates at ``level`` in block order, minus those whose name matches ``keep``.

    Parameter counts come from shapes only (no weight is read). Raises ``InputError`` for an
    unknown level, a bad regex, or a ``keep`` that protects every candidate.
    """

    if level not in LEVELS:
        raise InputError(f"unknown --level {level!r}; choose one of: {', '.join(LEVELS)}")
    kinds = {"sublayer": ("attn", "mlp"), "attn": ("attn",), "mlp": ("mlp",), "block": ("block",)}[level]
    out: list[Candidate] = []
    for i in range(adapter.num_blocks):
        for kind in kinds:
            if kind == "block":
                name = adapter.block_name(i)
                params = _numel([adapter.block(i)])
            else:
                modules = sublayer_modules(adapter, i, kind)
                if not modules:
                    continue  # already removed by an earlier stage
                name = adapter.attention_path(i) if kind == "attn" else _mlp_name(adapter, i)
                params = _numel([adapter.block(i).get_submodule(local) for local in modules])
            out.append(Candidate(i, kind, name, params))
    if keep:
        try:
            pattern = re.compile(keep)
        except re.error as exc:
            raise InputError(f"invalid --keep regex {keep!r}: {exc}") from None
        if out and not any(pattern.search(c.name) for c in out):  # a typo would protect nothing, silently
            raise InputError(f"--keep {keep!r} matches no candidate at --level {level}; their names look like "
                             f"{out[0].name} ... {out[-1].name}")
        out = [c for c in out if not pattern.search(c.name)]
    if not out:
        raise InputError(f"nothing left to remove at --level {level}" + (f" after --keep {keep!r}" if keep else ""))
    return out


def _mlp_name(adapter, i: int) -> str:
    if adapter.has_mlp_module(i):
        return adapter.mlp_path(i)
    return f"{adapter.block_name(i)}.mlp"  # OPT: fc1 / fc2 sit in the block; a stable label


def excluded_front_blocks(num_blocks: int, x: float) -> int:
    """Number of leading blocks withheld: ``int(2L·x/2) + 1`` — also at ``x == 0``, where the
    reference withholds block 0 (from the first step only, :func:`put_back_after`)."""
    return min(num_blocks, int(2 * num_blocks * x / 2) + 1)


def put_back_after(num_candidates: int, x: float) -> int:
    """Removed-candidate count at which withheld blocks return: ``int(N·x) + 1`` (1 at ``x == 0``)."""
    return int(num_candidates * x) + 1


def target_count(num_candidates: int, ratio: float) -> int:
    """Candidates to remove for a fraction ``ratio`` of them: ``int(N·r)``, as the reference's masks."""
    return int(num_candidates * ratio + 1e-9)
