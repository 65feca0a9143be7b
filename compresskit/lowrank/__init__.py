"""Low-rank compression (WeLore): rank planning, ``LowRankLinear``, fine-tuning helpers."""

from __future__ import annotations

from compresskit.lowrank.finetune_utils import cosine_with_warmup, freeze_all_but_lowrank
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
    "cosine_with_warmup",
    "find_global_tau",
    "freeze_all_but_lowrank",
    "install_lowrank_shells",
    "normalised_spectrum",
    "plan_ranks",
    "ranks_pruned",
    "replace_with_lowrank",
    "uniform_plan",
]
