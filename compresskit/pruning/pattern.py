"""Sparsity patterns: unstructured, or N:M.

N:M follows the Wanda / SparseGPT code base (methods.md §2.1): **N zeros in every M consecutive
input columns of each output row**, so "2:4" is 50 % sparse and "4:8" too. (NVIDIA's "2:4" reads
the other way round, 2 non-zeros per 4, and happens to coincide for 2:4 only.)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

from compresskit.errors import InputError

_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class Pattern:
    """Which entries may be compared with each other when choosing what to prune.

    ``kind="unstructured"``: the pruner's own comparison group (whole matrix, row, or block).
    ``kind="nm"``: in each row, every group of ``m`` consecutive input columns loses ``n`` entries.
    """

    kind: Literal["unstructured", "nm"] = "unstructured"
    n: int = 0
    m: int = 0

    def __post_init__(self) -> None:
        if self.kind == "unstructured":
            if self.n or self.m:
                raise InputError("an unstructured pattern takes no N:M numbers; use Pattern.nm(n, m)")
        elif self.kind == "nm":
            if not (isinstance(self.n, int) and isinstance(self.m, int) and 0 < self.n < self.m):
                raise InputError(
                    f"N:M pattern {self.n}:{self.m} is invalid: N (zeros per group) and M (group size) "
                    "must satisfy 0 < N < M, e.g. 2:4"
                )
        else:
            raise InputError(f"unknown pattern kind {self.kind!r}; use 'unstructured' or 'nm'")

    @classmethod
    def unstructured(cls) -> Pattern:
        return cls("unstructured")

    @classmethod
    def nm(cls, n: int, m: int) -> Pattern:
        return cls("nm", n, m)

    @classmethod
    def parse(cls, text: str | Pattern) -> Pattern:
        """``"unstructured"`` or ``"N:M"`` (e.g. ``"2:4"``, ``"4:8"``, ``"5:8"``); a Pattern passes through."""
        if isinstance(text, Pattern):
            return text
        if not isinstance(text, str):
            raise InputError(f"pattern must be a string such as 'unstructured' or '2:4', got {text!r}")
        if text.strip().lower() == "unstructured":
            return cls.unstructured()
        match = _NM_RE.match(text)
        if match is None:
            raise InputError(f"pattern {text!r} not understood: use 'unstructured' or N:M such as '2:4'")
        return cls.nm(int(match.group(1)), int(match.group(2)))

    @property
    def is_nm(self) -> bool:
        return self.kind == "nm"

    @property
    def sparsity(self) -> float | None:
        """N/M for an N:M pattern; None for unstructured (the caller chooses)."""
        return self.n / self.m if self.is_nm else None

    def resolve_sparsity(self, sparsity: float | None) -> float:
        """The sparsity a pruner should use: N/M for N:M, otherwise the validated argument.

        An N:M pattern fixes the sparsity; a different explicit value is a contradiction the user
        should hear about (the reference asserts ``sparsity_ratio == 0.5`` for N:M).
        """
        if self.is_nm:
            if sparsity is not None and not math.isclose(sparsity, self.n / self.m, abs_tol=1e-9):
                raise InputError(
                    f"sparsity {sparsity} conflicts with N:M pattern {self}, which fixes it at "
                    f"{self.n / self.m:g}; drop the sparsity or pass {self.n / self.m:g}"
                )
            return self.n / self.m
        if sparsity is None:
            raise InputError("unstructured pruning needs a sparsity in [0, 1), e.g. 0.5")
        return validate_sparsity(sparsity)

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else "unstructured"


def validate_sparsity(sparsity: float) -> float:
    """A fraction of entries to prune, in [0, 1) (1 would delete the whole matrix)."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not (0.0 <= sparsity < 1.0):
        raise InputError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    return float(sparsity)


def check_divisible(in_features: int, pattern: Pattern) -> None:
    """N:M groups tile the input columns exactly; a ragged last group has no valid N:M meaning."""
    if pattern.is_nm and in_features % pattern.m != 0:
        raise InputError(
            f"N:M pattern {pattern} needs the input dimension (here {in_features}) to be a multiple of "
            f"{pattern.m}; use unstructured sparsity or exclude this layer"
        )
