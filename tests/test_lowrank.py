"""WeLore rank planning, LowRankLinear and the fine-tuning helpers (compresskit.lowrank)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from compresskit.errors import CheckpointError, InputError
from compresskit.lowrank import (
    WELORE_TAU_TABLE,
    LowRankLinear,
    find_global_tau,
    install_lowrank_shells,
    normalised_spectrum,
    plan_ranks,
    ranks_pruned,
    replace_with_lowrank,
    uniform_plan,
)
from compresskit.lowrank.plan import achieved_rank_reduction, is_lowrank_component

# ------------------------------------------------------------------------------------------------
# spectra


def _decaying_spectra(seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, int]]]:
    """12 matrices, varied shapes, spectra from flat to fast-decaying (exponential, power law)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(64, 64), (96, 32), (32, 96), (128, 48), (48, 48), (80, 120),
              (40, 200), (200, 40), (72, 72), (100, 30), (64, 160), (56, 56)]
    spectra, shape_map = {}, {}
    for i, (m, n) in enumerate(shapes):
        r = min(m, n)
        x = torch.arange(r, dtype=torch.float64) / r
        if i % 2 == 0:
            base = torch.exp(-x * (0.5 + i))  # exponential decay, rate 0.5 … 10.5
        else:
            base = (1.0 + torch.arange(r, dtype=torch.float64)) ** (-0.2 * i)  # power law
        noise = 1.0 + 0.01 * torch.rand(r, generator=g, dtype=torch.float64)
        sigma = torch.sort((base * noise).float(), descending=True).values
        spectra[f"m{i}"] = sigma
        shape_map[f"m{i}"] = (m, n)
    return spectra, shape_map


def test_normalised_spectrum_endpoints_and_constant():
    s = normalised_spectrum(torch.tensor([5.0, 3.0, 1.0]))
    assert s.tolist() == [1.0, 0.5, 0.0]
    # constant spectrum: defined as all ones, so nothing is ever pruned for τ ≤ 1
    assert normalised_spectrum(torch.full((4,), 2.0)).tolist() == [1.0] * 4
    assert ranks_pruned(torch.full((4,), 2.0), 1.0) == 0
    # p = #{σ̂ < τ}, strict
    assert ranks_pruned(torch.tensor([5.0, 3.0, 1.0]), 0.5) == 1
    assert ranks_pruned(torch.tensor([5.0, 3.0, 1.0]), 0.5001) == 2


@pytest.mark.parametrize("target", [0.02, 0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9, 0.97])
def test_global_tau_hits_target_within_one_rank_per_matrix(target):
    spectra, _ = _decaying_spectra()
    total = sum(s.numel() for s in spectra.values())
    tau = find_global_tau(spectra, target)
    achieved = sum(ranks_pruned(s, tau) for s in spectra.values())
    assert abs(achieved - target * total) <= len(spectra)
    assert 0.0 <= tau <= 1.0
    assert achieved_rank_reduction(spectra, tau) == pytest.approx(achieved / total)

    # brute force over every threshold that can change the count: nothing is strictly closer
    pooled = torch.cat([normalised_spectrum(s) for s in spectra.values()])
    candidates = torch.cat([pooled, torch.tensor([0.0], dtype=torch.float64)])
    counts = (pooled[None, :] < candidates[:, None]).sum(1).double()
    best = (counts - target * total).abs().min().item()
    assert abs(achieved - target * total) == pytest.approx(best)


def test_achieved_reduction_is_monotone_in_tau():
    spectra, _ = _decaying_spectra(seed=1)
    values = [achieved_rank_reduction(spectra, t) for t in torch.linspace(0, 1, 201).tolist()]
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert values[0] == 0.0
    # τ = 1 prunes all but each matrix's top rank
    total = sum(s.numel() for s in spectra.values())
    assert values[-1] == pytest.approx((total - len(spectra)) / total)


def test_non_uniform_allocation_follows_spectral_decay():
    """Fast-decaying spectra lose more ranks than slow ones at the same τ (WeLore's point)."""
    slow = torch.exp(-torch.arange(64.0) / 64 * 0.5)
    fast = torch.exp(-torch.arange(64.0) / 64 * 10.0)
    tau = find_global_tau({"slow": slow, "fast": fast}, 0.5)
    assert ranks_pruned(fast, tau) > 2 * ranks_pruned(slow, tau)


def test_tau_table_is_the_reference_llama2_table():
    assert WELORE_TAU_TABLE == {10: 0.0225, 20: 0.084, 30: 0.115, 40: 0.145,
                                50: 0.175, 60: 0.215, 70: 0.26}


# ------------------------------------------------------------------------------------------------
# exact low rank and the LowRankLinear factorisation


def test_exact_rank_r_matrix_prunes_exactly_the_null_ranks():
    g = torch.Generator().manual_seed(0)
    m, n, r = 48, 32, 5
    w = torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g)
    sigma = torch.linalg.svdvals(w)
    s_hat = normalised_spectrum(sigma)
    assert int((s_hat < 1e-5).sum()) == min(m, n) - r
    assert ranks_pruned(sigma, 1e-3) == min(m, n) - r  # kept rank r

    linear = nn.Linear(n, m, bias=False)
    with torch.no_grad():
        linear.weight.copy_(w)
    low = LowRankLinear.from_linear(linear, r)
    rel = (low.merged_weight() - w).norm() / w.norm()
    assert rel < 1e-5


def test_lowrank_linear_is_the_rank_k_svd_truncation():
    g = torch.Generator().manual_seed(1)
    linear = nn.Linear(24, 40, bias=True)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(40, 24, generator=g))
        linear.bias.copy_(torch.randn(40, generator=g))
    k = 7
    low = LowRankLinear.from_linear(linear, k)

    u, s, vh = torch.linalg.svd(linear.weight.detach(), full_matrices=False)
    w_k = u[:, :k] @ torch.diag(s[:k]) @ vh[:k]
    torch.testing.assert_close(low.merged_weight(), w_k, atol=1e-5, rtol=1e-5)
    # symmetric split: both factors carry √S
    torch.testing.assert_close(low.V.weight.norm(dim=1), s[:k].sqrt(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(low.U.weight.norm(dim=0), s[:k].sqrt(), atol=1e-5, rtol=1e-5)

    x = torch.randn(5, 24, generator=g)
    torch.testing.assert_close(low(x), x @ w_k.T + linear.bias, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(low.to_linear()(x), low(x), atol=1e-5, rtol=1e-5)

    sd = low.state_dict()
    assert {k_: tuple(v.shape) for k_, v in sd.items()} == {
        "V.weight": (7, 24), "U.weight": (40, 7), "U.bias": (40,)}
    assert (low.in_features, low.out_features, low.rank) == (24, 40, 7)
    assert "rank=7" in repr(low) and "bias=True" in repr(low)


def test_from_linear_keeps_dtype_and_rejects_a_stale_sigma_cache():
    linear = nn.Linear(16, 12, bias=False).to(torch.bfloat16)
    sigma = torch.linalg.svdvals(linear.weight.float())
    low = LowRankLinear.from_linear(linear, 4, sigma_cache=sigma)
    assert low.U.weight.dtype == torch.bfloat16 and low.V.weight.dtype == torch.bfloat16
    assert low.U.bias is None
    with pytest.raises(InputError, match="stale"):
        LowRankLinear.from_linear(linear, 4, sigma_cache=sigma * 1.1)


# ------------------------------------------------------------------------------------------------
# LRC rule and reported reductions


def test_lrc_rule_ratio_and_parameter_break_even():
    # 1536×576: k·2112 < 884736 ⇔ k < 418.9
    assert is_lowrank_component((1536, 576), pruned=576 - 418, min_ratio=0.0)
    assert not is_lowrank_component((1536, 576), pruned=576 - 419, min_ratio=0.0)
    # with min_ratio 0.5 the ratio binds first: p must exceed 288
    assert not is_lowrank_component((1536, 576), pruned=288, min_ratio=0.5)
    assert is_lowrank_component((1536, 576), pruned=289, min_ratio=0.5)
    # square 64×64: k = 32 is exactly break-even (4096 = 4096), not a saving
    assert not is_lowrank_component((64, 64), pruned=32, min_ratio=0.0)
    assert is_lowrank_component((64, 64), pruned=33, min_ratio=0.0)
    # ratio passes (30/64 > 0.3) but k = 34 would grow the matrix
    assert not is_lowrank_component((64, 64), pruned=30, min_ratio=0.3)
    # tall 1000×10: break-even k < 9.9
    assert is_lowrank_component((1000, 10), pruned=1, min_ratio=0.0)


def test_plan_reports_rank_and_parameter_reduction_separately():
    # A (8×8): σ̂ = σ;  B (16×4): σ̂ = [1, 2/3, 1/3, 0].  N = 12, target 0.5 ⇒ 6 ranks.
    # Pooled counts: τ ∈ (0.04, 0.05] prunes 6 (A: 5, B: 1) ⇒ τ = 0.045.
    spectra = {
        "A": torch.tensor([1.0, 0.9, 0.05, 0.04, 0.03, 0.02, 0.01, 0.0]),
        "B": torch.tensor([4.0, 3.0, 2.0, 1.0]),
    }
    plan = plan_ranks(spectra, {"A": (8, 8), "B": (16, 4)}, 0.5, min_ratio=0.5)
    assert plan.tau == pytest.approx(0.045, abs=1e-6)
    a, b = plan.matrices
    # A: p = 5 (5/8 > 0.5, 3·16 = 48 < 64) ⇒ LRC with k = 3
    assert (a.pruned, a.kept_rank, a.is_lowrank, a.params_after) == (5, 3, True, 48)
    # B: p = 1 (1/4 ≤ 0.5) ⇒ stays dense, its planned rank 3 is not applied
    assert (b.pruned, b.planned_rank, b.kept_rank) == (1, 3, 4)
    assert (b.is_lowrank, b.params_after) == (False, 64)
    assert plan.planned_rank_reduction == pytest.approx(6 / 12)
    assert plan.applied_rank_reduction == pytest.approx(5 / 12)
    assert plan.applied_param_reduction == pytest.approx(1 - 112 / 128)  # 0.125
    assert plan.planned_param_reduction == pytest.approx(1 - (48 + 3 * 20) / 128)  # 0.15625
    assert plan.rank_map == {"A": 3}
    summary = plan.summary()
    assert summary["applied_rank_reduction"] == pytest.approx(5 / 12)
    assert [mat["kept_rank"] for mat in summary["matrices"]] == [3, 4]


def test_uniform_plan_reduces_every_matrix_by_the_same_fraction():
    _, shapes = _decaying_spectra()
    for target in (0.3, 0.6, 0.8):
        plan = uniform_plan(shapes, target, min_ratio=0.0)
        for p in plan.matrices:
            assert abs(p.pruned - target * p.full_rank) <= 1
        assert plan.tau is None and plan.method == "uniform"
    plan = uniform_plan({"a": (1536, 576)}, 0.3, min_ratio=0.2)
    (p,) = plan.matrices
    # p = round(172.8) = 173, k = 403, 403·2112 = 851136 < 884736
    assert (p.pruned, p.kept_rank, p.is_lowrank, p.params_after) == (173, 403, True, 851136)


# ------------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("target", [0.0, -0.1, 1.0, 1.5])
def test_target_outside_open_unit_interval_is_an_input_error(target):
    spectra, shapes = _decaying_spectra()
    with pytest.raises(InputError, match=r"\(0, 1\)"):
        find_global_tau(spectra, target)
    with pytest.raises(InputError):
        plan_ranks(spectra, shapes, target)
    with pytest.raises(InputError):
        uniform_plan(shapes, target, 0.5)


def test_no_matrix_qualifies_is_an_input_error():
    spectra, shapes = _decaying_spectra()
    msg = ("no matrix qualifies for low rank at rank reduction 0.1 with --min-ratio 0.5; "
           "raise --rank-reduction or lower --min-ratio")
    with pytest.raises(InputError) as err:
        plan_ranks(spectra, shapes, 0.1, min_ratio=0.5)
    assert str(err.value) == msg
    with pytest.raises(InputError, match="no matrix qualifies"):
        uniform_plan(shapes, 0.1, 0.5)


def test_stale_spectrum_length_is_an_input_error():
    with pytest.raises(InputError, match="stale"):
        plan_ranks({"a": torch.ones(5)}, {"a": (8, 6)}, 0.5)


# ------------------------------------------------------------------------------------------------
# swapping into a model, shells for loading


def _tiny_llama(seed: int, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).to(dtype).eval()


def _proj_spectra(model: nn.Module):
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and "proj" in n}
    spectra = {n: torch.linalg.svdvals(m.weight.float()) for n, m in linears.items()}
    shapes = {n: tuple(m.weight.shape) for n, m in linears.items()}
    return spectra, shapes


def test_replace_then_shells_plus_state_dict_reproduce_outputs_exactly():
    model = _tiny_llama(seed=0)
    spectra, shapes = _proj_spectra(model)
    plan = plan_ranks(spectra, shapes, 0.6, min_ratio=0.5)
    rank_map = replace_with_lowrank(model, plan, spectra=spectra)
    assert rank_map == plan.rank_map and rank_map
    for name, rank in rank_map.items():
        module = model.get_submodule(name)
        assert isinstance(module, LowRankLinear) and module.rank == rank
        assert module.U.weight.dtype == torch.bfloat16
    state = model.state_dict()
    first = next(iter(rank_map))
    assert f"{first}.U.weight" in state and f"{first}.V.weight" in state
    assert f"{first}.weight" not in state

    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits

    fresh = _tiny_llama(seed=1)
    install_lowrank_shells(fresh, rank_map)
    fresh.load_state_dict(state, strict=True)
    assert fresh.get_submodule(first).V.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, expected)


def test_shells_on_meta_device_load_with_assign():
    def build() -> nn.Module:
        layers = nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 8, bias=False))
        return layers.to(torch.bfloat16)

    torch.manual_seed(0)
    source = build()
    replace_with_lowrank(source, {"0": 5, "2": 3})
    state = source.state_dict()
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = source(x)

    with torch.device("meta"):
        target = build()
    install_lowrank_shells(target, {"0": 5, "2": 3})
    assert target[0].U.weight.is_meta
    target.load_state_dict(state, strict=True, assign=True)
    assert target[0].U.weight.dtype == torch.bfloat16 and target[2].U.bias is None
    with torch.no_grad():
        assert torch.equal(target(x), expected)


def test_shells_reject_a_rank_map_that_does_not_fit():
    model = nn.Sequential(nn.Linear(16, 24), nn.GELU())
    with pytest.raises(CheckpointError, match="not a Linear"):
        install_lowrank_shells(model, {"1": 2})
    with pytest.raises(CheckpointError, match="not a module"):
        install_lowrank_shells(model, {"5": 2})
    with pytest.raises(CheckpointError, match="corrupt"):
        install_lowrank_shells(model, {"0": 17})


# ------------------------------------------------------------------------------------------------
# fine-tuning helpers


def test_freeze_all_but_lowrank_trains_only_u_and_v():
    from compresskit.heal.loop import freeze_all_but
    from compresskit.heal.trainables import lowrank_parameters

    model = _tiny_llama(seed=0, dtype=torch.float32)
    total_before = sum(p.numel() for p in model.parameters())
    spectra, shapes = _proj_spectra(model)
    rank_map = replace_with_lowrank(model, plan_ranks(spectra, shapes, 0.6, min_ratio=0.5))
    trainable, total = freeze_all_but(model, lowrank_parameters(model))
    expected = sum(k * sum(shapes[n]) for n, k in rank_map.items())
    assert trainable == expected
    saved = sum(shapes[n][0] * shapes[n][1] - k * sum(shapes[n]) for n, k in rank_map.items())
    assert total == total_before - saved
    trainable_names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable_names == {f"{n}.{f}.weight" for n in rank_map for f in ("U", "V")}


def test_cosine_with_warmup_hand_values():
    from compresskit.heal.loop import cosine_with_warmup

    # total 100, warmup 10, r = 0.1
    assert cosine_with_warmup(0, 100, 10) == 0.0
    assert cosine_with_warmup(5, 100, 10) == pytest.approx(0.5)
    assert cosine_with_warmup(10, 100, 10) == pytest.approx(1.0)
    assert cosine_with_warmup(55, 100, 10) == pytest.approx(0.55)  # (1 + 0.1) / 2
    assert cosine_with_warmup(100, 100, 10) == pytest.approx(0.1)
    assert cosine_with_warmup(150, 100, 10) == pytest.approx(0.1)
    # quarter of the decay: 0.1 + 0.9·½·(1 + cos(π/4))
    quarter = 0.1 + 0.45 * (1 + math.cos(math.pi / 4))  # total 110, warmup 10: step 35 is t = 1/4
    assert cosine_with_warmup(35, 110, 10) == pytest.approx(quarter)
    assert cosine_with_warmup(0, 100, 0, min_lr_ratio=0.0) == pytest.approx(1.0)
