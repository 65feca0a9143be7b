"""OWL's outlier ratio and layerwise allocation (methods.md §3.1) on hand-computed cases."""

from __future__ import annotations

import pytest
import torch

from compresskit.allocation.owl import (
    MIN_BLOCK_SPARSITY,
    allocate_owl,
    allocate_owl_nm,
    block_outlier_ratio,
    outlier_ratio,
)
from compresskit.errors import InputError
from compresskit.pruning.wanda import wanda_scores

# ---------------------------------------------------------------- outlier ratio


def test_outlier_ratio_hand_vector():
    # mean 2.8, threshold 1.5 * 2.8 = 4.2: only the 10 is above -> 1 of 5
    assert outlier_ratio(torch.tensor([1.0, 1.0, 1.0, 1.0, 10.0]), 1.5) == 20.0


def test_outlier_ratio_is_strictly_above_and_flattens():
    # all equal to the threshold (m = 1): none is *above*
    assert outlier_ratio(torch.full((2, 2), 2.0), 1.0) == 0.0
    # mean 4/3: entries 1 are below, the 2 is above -> 1 of 3
    assert outlier_ratio(torch.tensor([[1.0], [1.0], [2.0]]), 1.0) == pytest.approx(100 / 3, abs=1e-12)


def test_block_outlier_ratio_uses_the_block_mean_not_per_matrix_means():
    # scores: matrix 1 = [[1, 10], [1, 10]], matrix 2 = [[3, 4]]; block mean 29/6 = 4.83
    # above it: the two 10s -> 2 of 6. Per-matrix means (5.5 and 3.5) would also count the 4.
    weights = [torch.ones(2, 2), torch.tensor([[3.0, 4.0]])]
    act_sq = [torch.tensor([1.0, 100.0]), torch.tensor([1.0, 1.0])]
    assert block_outlier_ratio(weights, act_sq, 1.0) == pytest.approx(100 * 2 / 6, abs=1e-12)


def test_block_outlier_ratio_is_sign_blind_in_weights():
    # |W| is used: the -10 counts like a 10
    weights = [torch.tensor([[1.0, -10.0, 1.0, 1.0, 1.0]])]
    assert block_outlier_ratio(weights, [torch.ones(5)], 1.5) == 20.0


@pytest.mark.parametrize("m", [1.5, 3.0, 5.0, 7.0])
def test_block_outlier_ratio_equals_concatenated_definition(m):
    gen = torch.Generator().manual_seed(int(m * 10))
    shapes = [(48, 32), (48, 32), (48, 32), (32, 48), (96, 32), (96, 32), (32, 96)]
    # heavy-tailed weights and activations so that some blocks have many outliers
    weights = [torch.randn(s, generator=gen) ** 3 for s in shapes]
    act_sq = [torch.rand(s[1], generator=gen) ** 4 * 50 for s in shapes]
    concatenated = torch.cat([wanda_scores(w, a).reshape(-1) for w, a in zip(weights, act_sq)])
    expected = outlier_ratio(concatenated, m)
    assert 0 < expected < 100
    assert block_outlier_ratio(weights, act_sq, m) == expected


# ---------------------------------------------------------------- allocate_owl


def test_allocate_owl_hand_values():
    # D' = (D - 1) / 9 * 0.16 = [0, .0178, .0356, .0533, .16], mean(D') = 0.16 / 3;
    # sparsity = S + mean(D') - D' = 0.7 + 0.05333 - D'
    ratios = allocate_owl([1.0, 2.0, 3.0, 4.0, 10.0], sparsity=0.7, lam=0.08)
    expected = [0.7533333333, 0.7355555556, 0.7177777778, 0.7, 0.5933333333]
    assert ratios == pytest.approx(expected, abs=1e-9)


def test_allocate_owl_mean_is_s_and_spread_is_two_lambda():
    outliers = [3.1, 0.4, 7.9, 5.5, 2.2, 6.0, 1.3, 4.4]
    ratios = allocate_owl(outliers, sparsity=0.6, lam=0.08)
    assert sum(ratios) / len(ratios) == pytest.approx(0.6, abs=1e-12)
    assert max(ratios) - min(ratios) == pytest.approx(0.16, abs=1e-12)


def test_allocate_owl_more_outliers_means_less_sparsity():
    outliers = [3.1, 0.4, 7.9, 5.5, 2.2, 6.0, 1.3, 4.4]
    ratios = allocate_owl(outliers, sparsity=0.7, lam=0.1)
    by_outliers = sorted(range(len(outliers)), key=lambda i: outliers[i])
    by_sparsity = sorted(range(len(ratios)), key=lambda i: -ratios[i])
    assert by_outliers == by_sparsity
    assert ratios[2] == min(ratios) and ratios[1] == max(ratios)


def test_allocate_owl_clamps_non_positive_to_one_percent():
    # D' = [0, 0.2], mean 0.1 -> sparsities [0.05 + 0.1, 0.05 - 0.1] -> second clamped to 0.01
    ratios = allocate_owl([0.0, 1.0], sparsity=0.05, lam=0.1)
    assert ratios == pytest.approx([0.15, MIN_BLOCK_SPARSITY], abs=1e-12)


def test_allocate_owl_rejects_ratio_of_one_or_more():
    # D' = [0, 0.2], mean 0.1 -> sparsities [1.05, 0.85]
    with pytest.raises(InputError, match=r"max 1\.05.*--owl-lambda"):
        allocate_owl([0.0, 1.0], sparsity=0.95, lam=0.1)


def test_allocate_owl_equal_outlier_ratios_give_uniform_sparsity():
    assert allocate_owl([4.2, 4.2, 4.2], sparsity=0.7, lam=0.08) == [0.7, 0.7, 0.7]


def test_allocate_owl_lambda_zero_is_uniform():
    assert allocate_owl([1.0, 5.0, 2.0], sparsity=0.5, lam=0.0) == pytest.approx([0.5, 0.5, 0.5], abs=1e-15)


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5])
def test_allocate_owl_rejects_bad_sparsity(sparsity):
    with pytest.raises(InputError, match="sparsity"):
        allocate_owl([1.0, 2.0], sparsity=sparsity, lam=0.08)


# ---------------------------------------------------------------- allocate_owl_nm


def test_allocate_owl_nm_readme_setting():
    # 5:8, lambda 2: D' = D / 10 * 2 = [0, .2, .4, .6, .8, 2], mean 2/3,
    # centred [-.67, -.47, -.27, -.07, .13, 1.33] -> rounded [-1, 0, 0, 0, 0, 1] -> N = 5 - that
    assert allocate_owl_nm([0.0, 1.0, 2.0, 3.0, 4.0, 10.0], n=5, m=8, lam=2.0) == [6, 5, 5, 5, 5, 4]


def test_allocate_owl_nm_rounds_half_to_even_like_numpy():
    # D' = [0, .5, 1], centred [-.5, 0, .5] -> round half to even -> [0, 0, 0]
    assert allocate_owl_nm([0.0, 1.0, 2.0], n=5, m=8, lam=1.0) == [5, 5, 5]
    # D' = [0, 1.5, 3], centred [-1.5, 0, 1.5] -> [-2, 0, 2]
    assert allocate_owl_nm([0.0, 1.0, 2.0], n=5, m=8, lam=3.0) == [7, 5, 3]


def test_allocate_owl_nm_rejects_zeros_outside_range():
    # D' = [0, 4], centred [-2, 2] -> N = [3, -1]
    with pytest.raises(InputError, match=r"-1\.\.3 zeros per 4.*--owl-lambda"):
        allocate_owl_nm([0.0, 1.0], n=1, m=4, lam=4.0)
    # N = 8 of 8 would empty the block
    with pytest.raises(InputError, match="zeros per 8"):
        allocate_owl_nm([0.0, 1.0], n=6, m=8, lam=4.0)


def test_allocate_owl_nm_equal_outliers_and_bad_pattern():
    assert allocate_owl_nm([2.0, 2.0], n=2, m=4, lam=2.0) == [2, 2]
    with pytest.raises(InputError, match="0 < N < M"):
        allocate_owl_nm([1.0, 2.0], n=4, m=4, lam=1.0)
