"""Healing losses: next-token cross-entropy, logit distillation (KD) and their mix.

KD is Hinton et al.'s soft-target loss between the teacher's and the student's next-token
distributions at every real token, ``T² · mean_t KL(softmax(z_t / T) ‖ softmax(s_t / T))``,
computed with the toolkit's one KL, :func:`compresskit.analysis.distances.token_kl` (float32,
differentiable in the student's logits). With ``top_k`` the teacher is kept as its K largest
logits and their ids (``top_k_logits``); the KL is then over those K outcomes, both sides
renormalised (EvoPress's top-K form) — K/vocab of the memory of the full logits.

``kd+ce`` is ``kd_weight · KD + (1 − kd_weight) · CE``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..analysis.distances import token_kl, top_k_logits
from .settings import LOSSES, LossSpec  # noqa: F401 (LOSSES: the loss names, re-exported)


def kd_loss(teacher: torch.Tensor | tuple[torch.Tensor, torch.Tensor], student: torch.Tensor,
            token_mask: torch.Tensor | None = None, temperature: float = 1.0) -> torch.Tensor:
    """``T² · mean(token_kl(teacher, student, mask, dtype=float32, temperature=T))``."""
    kl = token_kl(teacher, student, token_mask, dtype=torch.float32, temperature=temperature)
    return temperature ** 2 * kl.mean()


def ce_loss(student: torch.Tensor, input_ids: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over real tokens (transformers' causal-LM loss)."""
    logits = student[:, :-1].float()
    labels = input_ids[:, 1:].clone()
    if token_mask is not None:
        labels[~token_mask[:, 1:].bool()] = -100
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def teacher_targets(logits: torch.Tensor, spec: LossSpec):
    """What the loss keeps of the teacher: its logits, or their top-K ``(values, ids)``."""
    return top_k_logits(logits, spec.top_k) if spec.top_k else logits


def healing_loss(spec: LossSpec, student: torch.Tensor, input_ids: torch.Tensor, token_mask: torch.Tensor | None,
                 teacher=None) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss to minimise and its parts (floats, for the log)."""
    parts: dict[str, float] = {}
    total = None
    if spec.kind in ("kd", "kd+ce"):
        kd = kd_loss(teacher, student, token_mask, spec.temperature)
        parts["kd"] = float(kd.detach())
        total = kd if spec.kind == "kd" else spec.kd_weight * kd
    if spec.kind in ("ce", "kd+ce"):
        ce = ce_loss(student, input_ids, token_mask)
        parts["ce"] = float(ce.detach())
        total = ce if spec.kind == "ce" else total + (1.0 - spec.kd_weight) * ce
    return total, parts
