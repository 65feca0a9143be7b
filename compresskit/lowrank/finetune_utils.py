"""Pure helpers for WeLore's LRC-only fine-tuning (methods.md §6.3).

WeLore fine-tunes only the low-rank factors (U, V) of the LRCs; dense (N-LRC) matrices,
embeddings, norms and the head stay frozen. Its continual fine-tuning uses AdamW with a cosine
schedule that decays to ``min_lr_ratio`` = 0.1 of the peak after a linear warmup (the ReLoRA
scheduler the reference imports, ``peft_pretraining/training_utils.py``, single cycle).
"""

from __future__ import annotations

import math

from torch import nn

from compresskit.lowrank.layer import LowRankLinear


def freeze_all_but_lowrank(model: nn.Module) -> tuple[int, int]:
    """Make only the U/V factors of every ``LowRankLinear`` trainable.

    The U bias (the original linear's bias) is frozen too: WeLore trains the factors only.
    Returns (trainable parameter count, total parameter count), counted in elements.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, LowRankLinear):
            module.U.weight.requires_grad_(True)
            module.V.weight.requires_grad_(True)
    params = list(model.parameters())  # deduplicated: tied weights count once
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return trainable, sum(p.numel() for p in params)


def cosine_with_warmup(step: int, total: int, warmup: int, min_lr_ratio: float = 0.1) -> float:
    """Learning-rate multiplier at ``step`` (0-based).

    * warmup (step < warmup): step / warmup, so 0 at step 0 and 1 at the end of warmup;
    * then r + (1 − r) · ½ · (1 + cos(π · t)), t = (step − warmup) / (total − warmup) clamped to
      [0, 1], r = ``min_lr_ratio``: 1 at the end of warmup, (1 + r)/2 halfway, r from ``total`` on.
    """
    if total <= 0 or not 0 <= warmup <= total:
        raise ValueError(f"need 0 <= warmup <= total, total > 0; got {warmup=}, {total=}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    if step < warmup:
        return step / warmup
    if total == warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / (total - warmup))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
