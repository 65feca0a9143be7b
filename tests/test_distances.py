"""analysis/distances.py against direct formulas and the references' torch calls."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from compresskit.analysis.distances import angular_distance, distance, js_divergence, kl_divergence


def test_js_textbook_matches_cdmoe_reference_form():
    # CD-MoE: F.kl_div(log m, p, batchmean) style with eps 1e-10, i.e. textbook JS averaged over tokens.
    torch.manual_seed(0)
    a, b = torch.randn(7, 32), torch.randn(7, 32)
    p, q = F.softmax(a.double(), -1), F.softmax(b.double(), -1)
    m = (p + q) / 2
    eps = 1e-10
    ref = 0.5 * F.kl_div((m + eps).log(), p + eps, reduction="batchmean") \
        + 0.5 * F.kl_div((m + eps).log(), q + eps, reduction="batchmean")
    got = js_divergence(a, b, form="textbook", eps=eps)
    assert math.isclose(got.item(), ref.item(), rel_tol=1e-6)


def test_js_code_form_is_finercuts_reverse_kl_mean():
    torch.manual_seed(1)
    a, b = torch.randn(2, 5, 50), torch.randn(2, 5, 50)
    log_p, log_q = F.log_softmax(a.double(), -1), F.log_softmax(b.double(), -1)
    m = 0.5 * (log_p.exp() + log_q.exp())
    ref = 0.5 * (F.kl_div(log_p, m, reduction="mean") + F.kl_div(log_q, m, reduction="mean"))
    assert math.isclose(js_divergence(a, b, form="code").item(), ref.item(), rel_tol=1e-9)
    # the code form is a different number from the textbook form (and the argmin may differ)
    assert not math.isclose(js_divergence(a, b, form="code").item(), js_divergence(a, b).item(), rel_tol=1e-3)


def test_zero_for_identical_and_bounded_by_ln2():
    x = torch.randn(4, 16)
    for name in ("js", "angular", "kl", "norm"):
        assert distance(name, x, x).abs().item() < 1e-6
    far = torch.zeros(1, 2)
    far[0, 0] = 200.0
    near = far.flip(-1)
    assert math.isclose(js_divergence(far, near).item(), math.log(2), rel_tol=1e-6)
    assert math.isclose(angular_distance(torch.tensor([[1.0, 0]]), torch.tensor([[0, 1.0]])).item(), 0.5)


def test_token_mask_ignores_padding():
    torch.manual_seed(2)
    a, b = torch.randn(1, 6, 8), torch.randn(1, 6, 8)
    mask = torch.tensor([[True, True, True, False, False, False]])
    b_pad = b.clone()
    b_pad[0, 3:] = 1e3  # garbage in padded positions
    assert math.isclose(js_divergence(a, b_pad, mask).item(), js_divergence(a[:, :3], b[:, :3]).item(), rel_tol=1e-12)
    assert math.isclose(kl_divergence(a, b_pad, mask).item(), kl_divergence(a[:, :3], b[:, :3]).item(), rel_tol=1e-12)


def test_token_kl_is_zero_for_equal_logits_and_matches_the_full_kl():
    import torch

    from compresskit.analysis.distances import token_kl

    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 5, 11, generator=g)
    b = torch.randn(2, 5, 11, generator=g)
    assert token_kl(a, a).abs().max().item() < 1e-12
    assert token_kl(a, b).shape == (10,)
    assert math.isclose(token_kl(a, b).mean().item(), kl_divergence(a, b).item(), rel_tol=1e-12)
    # by hand, one row
    p, q = torch.softmax(a[0, 0].double(), -1), torch.softmax(b[0, 0].double(), -1)
    assert math.isclose(token_kl(a, b)[0].item(), (p * (p / q).log()).sum().item(), rel_tol=1e-12)


def test_top_k_kl_renormalises_both_over_the_references_top_k_like_evopress():
    import torch

    from compresskit.analysis.distances import token_kl, top_k_logits

    g = torch.Generator().manual_seed(1)
    a = torch.randn(3, 7, 50, generator=g)
    b = torch.randn(3, 7, 50, generator=g)
    values, ids = top_k_logits(a, 4)
    got = token_kl((values, ids), b)
    p = torch.softmax(values.double(), -1)
    q = torch.softmax(b.double().gather(-1, ids), -1)
    want = (p * (p / q).log()).sum(-1).reshape(-1)
    assert torch.allclose(got, want, rtol=1e-12, atol=0)
    # K = vocab is the full KL
    assert torch.allclose(token_kl(top_k_logits(a, 50), b), token_kl(a, b), rtol=1e-10, atol=1e-12)


def test_token_kl_gradient_matches_a_finite_difference_with_temperature():
    import torch

    from compresskit.analysis.distances import token_kl

    g = torch.Generator().manual_seed(2)
    a = torch.randn(4, 9, generator=g, dtype=torch.float64)
    b = torch.randn(4, 9, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: token_kl(a, x, temperature=2.0).sum(), (b,))
