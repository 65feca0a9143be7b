"""Distances between two models' outputs, as the structural methods' references compute them.

All functions compare ``ref`` and ``new`` along the last dimension (a distribution per token) and
return one float64 scalar tensor. Which dimension that is depends on the method:

* FinerCut (methods.md §8.2) compares softmax distributions over the **vocabulary** (logits).
  Its code computes ``½[kl_div(log p, m) + kl_div(log q, m)]`` with ``reduction="mean"``;
  PyTorch's ``kl_div(input=log P, target=T)`` is KL(T‖P), so that is ½[KL(m‖p) + KL(m‖q)]
  divided by batch·seq·vocab (``js_form="code"``), not the textbook ½[KL(p‖m) + KL(q‖m)]
  (``js_form="textbook"``, mean over tokens).
* CD-MoE (§7.2) compares softmax over the **hidden dimension** of hidden states: textbook JS
  with ε = 1e-10 inside the logs, averaged over tokens (``F.kl_div(..., "batchmean")``).

Padding: pass ``token_mask`` ([..., seq] bool, True = real token) to average over real tokens only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .names import DISTANCES, JS_FORMS


def _rows(x: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    x = x.double()
    if token_mask is not None:
        return x[token_mask.bool()]
    return x.reshape(-1, x.shape[-1])


def js_divergence(ref: torch.Tensor, new: torch.Tensor, token_mask: torch.Tensor | None = None,
                  form: str = "textbook", eps: float = 0.0) -> torch.Tensor:
    """Jensen–Shannon divergence between ``softmax(ref)`` and ``softmax(new)`` per row.

    ``form="textbook"``: mean over rows of ½[KL(p‖m) + KL(q‖m)] (``eps`` added inside the logs,
    CD-MoE uses 1e-10). ``form="code"``: FinerCut's ½[KL(m‖p) + KL(m‖q)] summed and divided by
    rows·dim (its ``reduction="mean"``).
    """
    if form not in JS_FORMS:
        raise ValueError(f"js form must be one of {JS_FORMS}, got {form!r}")
    a, b = _rows(ref, token_mask), _rows(new, token_mask)
    if form == "code":
        log_p, log_q = F.log_softmax(a, dim=-1), F.log_softmax(b, dim=-1)
        m = 0.5 * (log_p.exp() + log_q.exp())
        return 0.5 * (F.kl_div(log_p, m, reduction="mean") + F.kl_div(log_q, m, reduction="mean"))
    p, q = F.softmax(a, dim=-1), F.softmax(b, dim=-1)
    m = 0.5 * (p + q)
    log_m = (m + eps).log()
    kl_pm = (p * ((p + eps).log() - log_m)).sum(-1)
    kl_qm = (q * ((q + eps).log() - log_m)).sum(-1)
    return (0.5 * (kl_pm + kl_qm)).mean()


def kl_divergence(ref: torch.Tensor, new: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over rows of KL(softmax(ref) ‖ softmax(new))."""
    return token_kl(ref, new, token_mask).mean()


def top_k_logits(ref: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest logits of every row of ``ref`` and their vocabulary ids (what a top-K KL
    keeps of the reference model: ``k/vocab`` of the memory of its full logits)."""
    values, indices = ref.topk(min(int(k), ref.shape[-1]), dim=-1)
    return values, indices


def token_kl(ref: torch.Tensor | tuple[torch.Tensor, torch.Tensor], new: torch.Tensor,
             token_mask: torch.Tensor | None = None, dtype: torch.dtype = torch.float64,
             temperature: float = 1.0) -> torch.Tensor:
    """KL(p_ref ‖ p_new) per token, a 1-D tensor over the real tokens (``token_mask``), in ``dtype``.

    The one KL of the toolkit: EvoPress's fitness (methods.md §14, with ``reduction`` left to the
    caller, which averages over all tokens of a stage) and healing's distillation loss (any
    ``dtype``, differentiable in ``new``; ``temperature`` T divides both logits, as in Hinton et
    al.; callers scale the loss by T²).

    ``ref`` is either full logits ``[..., vocab]`` or ``(values, indices)`` from
    :func:`top_k_logits`: the top-K KL of EvoPress's reference (``compute_sparse_kl_div``), where
    the candidate's logits are gathered at the reference's top-K ids and both are renormalised
    over those K entries (softmax over K), so it is a KL between two distributions on K outcomes.
    """
    if isinstance(ref, tuple):
        values, indices = ref
        new = new.gather(-1, indices.to(new.device))
        ref = values
    a = ref.to(dtype) / temperature
    b = new.to(dtype) / temperature
    if token_mask is not None:
        keep = token_mask.bool().to(a.device)
        a, b = a[keep], b[keep]
    else:
        a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    log_p, log_q = F.log_softmax(a, dim=-1), F.log_softmax(b, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def angular_distance(ref: torch.Tensor, new: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over rows of arccos(cosine similarity) / π, the cosine clamped to [-1, 1]."""
    a, b = _rows(ref, token_mask), _rows(new, token_mask)
    cos = F.cosine_similarity(a, b, dim=-1).clamp(-1.0, 1.0)
    return (torch.arccos(cos) / torch.pi).mean()


def norm_distance(ref: torch.Tensor, new: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Frobenius norm of the difference (FinerCut's ``norm``)."""
    return torch.linalg.vector_norm(_rows(ref, token_mask) - _rows(new, token_mask))


def distance(name: str, ref: torch.Tensor, new: torch.Tensor, token_mask: torch.Tensor | None = None,
             js_form: str = "textbook", eps: float = 0.0) -> torch.Tensor:
    """Dispatch by name: ``js`` | ``angular`` | ``kl`` | ``norm``."""
    if name == "js":
        return js_divergence(ref, new, token_mask, form=js_form, eps=eps)
    if name == "angular":
        return angular_distance(ref, new, token_mask)
    if name == "kl":
        return kl_divergence(ref, new, token_mask)
    if name == "norm":
        return norm_distance(ref, new, token_mask)
    raise ValueError(f"unknown distance {name!r}; choose one of {DISTANCES}")
