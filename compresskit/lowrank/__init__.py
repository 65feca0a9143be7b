"""Low-rank compression (WeLore): rank planning and ``LowRankLinear`` (its fine-tuning is
``compresskit heal`` / ``finetune``: ``heal.trainables`` picks the factors, ``heal.loop`` trains them)."""

from __future__ import annotations

from compresskit.lowrank.layer import LowRankLinear, install_lowrank_shells, replace_with_lowrank
from compresskit.lowrank.plan import (
    WELORE_TAU_TABLE,
    RankPlan,
    WeLorePlan,
    find_global_tau,
    normalised_spectrum,
    plan_ranks,
    ranks_pruned,
    uniform_plan,
)

__all__ = [
    "WELORE_TAU_TABLE",
    "LowRankLinear",
    "RankPlan",
    "WeLorePlan",
    "find_global_tau",
    "install_lowrank_shells",
    "normalised_spectrum",
    "plan_ranks",
    "ranks_pruned",
    "replace_with_lowrank",
    "uniform_plan",
]
