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
