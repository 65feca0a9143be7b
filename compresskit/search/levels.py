"""Sparsity levels as EvoPress defines them, and heuristics' allocations turned into level vectors.

Level ℓ of a matrix with ``numel`` entries prunes ``base + ℓ·Δ`` of them, ``base = int(numel·S)``
(S the mean target): every level step changes the count of zeros by the same Δ whatever the
matrix's shape (q/k/v/o, MLP, MoE experts alike), so a level switch (one matrix down, one up)
keeps the model's total count of zeros, and any vector whose levels sum to 0 prunes exactly
``Σ int(numel·S)`` weights. The reference (``prune.py``, ``src/pruner.py``) uses
``Δ = int(0.5·min(S, 1−S)/L·hidden²)`` and levels ``−L..L`` cut to what a matrix can hold
(``0 ≤ zeros ≤ numel``); so do we. Pure Python, no torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def default_level_step(sparsity: float, levels: int, hidden: int) -> int:
    """The reference's Δ (``weights_diff``): ``int(0.5·min(S, 1−S)/L·hidden²)`` zeros per level."""
    return int(0.5 * min(sparsity, 1.0 - sparsity) / levels * hidden * hidden)


@dataclass(frozen=True)
class LevelPlan:
    """Levels of every unit (matrix): ``zeros(i, ℓ) = base[i] + ℓ·step`` for ``low[i] ≤ ℓ ≤ high[i]``."""

    sparsity: float
    levels: int
    step: int
    numels: tuple[int, ...]
    base: tuple[int, ...]
    low: tuple[int, ...]
    high: tuple[int, ...]

    @classmethod
    def build(cls, numels: Sequence[int], sparsity: float, levels: int, step: int) -> LevelPlan:
        if not 0.0 < sparsity < 1.0:
            raise ValueError(f"sparsity must be in (0, 1), got {sparsity}")
        if levels < 1 or step < 1:
            raise ValueError(f"levels and step must be >= 1, got {levels} and {step}")
        base = tuple(int(n * sparsity) for n in numels)
        low = tuple(-min(levels, b // step) for b in base)
        high = tuple(min(levels, (n - b) // step) for n, b in zip(numels, base))
        return cls(sparsity, levels, step, tuple(int(n) for n in numels), base, low, high)

    def __len__(self) -> int:
        return len(self.numels)

    def zeros(self, unit: int, level: int) -> int:
        return self.base[unit] + level * self.step

    def level_zeros(self, unit: int) -> list[int]:
        """Zeros at every level of ``unit``, lowest level first (index ``ℓ - low``)."""
        return [self.zeros(unit, lv) for lv in range(self.low[unit], self.high[unit] + 1)]

    def movable(self) -> int:
        """How many units have more than one level (the others stay at level 0)."""
        return sum(1 for lo, hi in zip(self.low, self.high) if hi > lo)

    def total_zeros(self, levels: Sequence[int]) -> int:
        return sum(self.zeros(i, lv) for i, lv in enumerate(levels))

    def unit_sparsity(self, levels: Sequence[int]) -> list[float]:
        return [self.zeros(i, lv) / n for i, (lv, n) in enumerate(zip(levels, self.numels))]

    def mean_sparsity(self, levels: Sequence[int]) -> float:
        """Parameter-weighted sparsity of the targeted matrices at ``levels``."""
        return self.total_zeros(levels) / sum(self.numels)

    def from_ratios(self, ratios: Sequence[float]) -> list[int]:
        """A heuristic's per-matrix sparsities as levels spending exactly this plan's budget.

        Each ratio becomes the real level ``(ratio·numel − base)/Δ``, clipped to the matrix's
        range; the integer vector is the floor plus one extra level for the largest remainders
        (largest-remainder rounding) until the levels sum to 0, or minus one for the smallest
        remainders when the floors overshoot (a heuristic that spent more than the budget).
        """
        if len(ratios) != len(self):
            raise ValueError(f"{len(ratios)} ratios for {len(self)} matrices")
        real = [min(max((r * n - b) / self.step, lo), hi)
                for r, n, b, lo, hi in zip(ratios, self.numels, self.base, self.low, self.high)]
        return round_to_budget(real, self.low, self.high, 0)


def round_to_budget(real: Sequence[float], low: Sequence[int], high: Sequence[int], total: int) -> list[int]:
    """Integers within ``[low, high]`` summing to ``total``, nearest ``real`` by largest remainders.

    Floors first; then +1 to the units with the largest fractional parts (ties: lower index) while
    the sum is short, or −1 to those with the smallest while it is over; a unit moves at most once
    per sweep, sweeps repeat until the sum is met. ``ValueError`` when the bounds cannot reach it.
    """
    levels = [min(max(math.floor(x), lo), hi) for x, lo, hi in zip(real, low, high)]
    frac = [x - math.floor(x) for x in real]
    if not sum(low) <= total <= sum(high):
        raise ValueError(f"a level sum of {total} is outside the reachable [{sum(low)}, {sum(high)}]")
    while sum(levels) != total:
        short = total - sum(levels)
        if short > 0:
            order = sorted((i for i in range(len(levels)) if levels[i] < high[i]), key=lambda i: (-frac[i], i))
            for i in order[:short]:
                levels[i] += 1
        else:
            order = sorted((i for i in range(len(levels)) if levels[i] > low[i]), key=lambda i: (frac[i], i))
            for i in order[:-short]:
                levels[i] -= 1
    return levels
