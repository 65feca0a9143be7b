"""AlphaPruning's Hill estimator and allocation (methods.md §5) against hand values and the
reference repository's cached LLaMA-7B α values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from compresskit import paths
from compresskit.allocation.alpha import (
    allocate_alpha,
    block_ratios,
    esd_metric,
    hill_alpha_mid,
    hill_alpha_xmin_peak,
    xmin_peak_candidates,
)
from compresskit.errors import InputError

# ---------------------------------------------------------------- golden: LLaMA-7B alpha_peak.npy

GOLDEN = paths.shared_data_dir() / "golden" / "alphapruning" / "llama-7b-hf.alpha_peak.npy"
HIDDEN, INTERMEDIATE = 4096, 11008
# q, k, v, o, gate, up, down in the reference's find_layers order
LLAMA_7B_BLOCK_NUMEL = [HIDDEN * HIDDEN] * 4 + [INTERMEDIATE * HIDDEN] * 3


@pytest.fixture(scope="module")
def llama7b():
    if not GOLDEN.is_file():
        pytest.skip(f"golden file missing: {GOLDEN} (set COMPRESSKIT_SHARED_DIR)")
    alphas = np.load(GOLDEN)
    assert alphas.shape == (224,)
    blocks = [i // 7 for i in range(224)]
    numel = LLAMA_7B_BLOCK_NUMEL * 32
    return alphas, blocks, numel


def test_golden_raw_alphas_of_block_0(llama7b):
    alphas, _, _ = llama7b
    assert np.round(alphas[:7], 4).tolist() == [1.3288, 1.3080, 3.9167, 3.8405, 1.7195, 4.4723, 1.7693]


def test_golden_block_ratios_epsilon_02(llama7b):
    ratios = np.round(block_ratios(*llama7b, sparsity=0.7, epsilon=0.2), 3)
    assert len(ratios) == 32
    assert ratios[:4].tolist() == [0.570, 0.618, 0.632, 0.631]
    assert ratios.min() == 0.568 and int(np.argmin(ratios)) == 9
    assert ratios.max() == 0.852 and int(np.argmax(ratios)) == 25
    assert ratios[-1] == 0.732


def test_golden_block_ratios_epsilon_03(llama7b):
    ratios = np.round(block_ratios(*llama7b, sparsity=0.7, epsilon=0.3), 3)
    assert (ratios.min(), ratios.max()) == (0.501, 0.930)


@pytest.mark.parametrize("mapping", ["block_wise", "matrix_wise"])
def test_golden_parameter_weighted_mean_is_exactly_s(llama7b, mapping):
    alphas, blocks, numel = llama7b
    ratios = np.array(allocate_alpha(alphas, blocks, numel, sparsity=0.7, epsilon=0.2, mapping=mapping))
    weights = np.array(numel, dtype=np.float64)
    assert abs((ratios * weights).sum() / weights.sum() - 0.7) < 1e-9
    if mapping == "block_wise":  # all 7 linears of a block share one ratio
        assert np.all(ratios.reshape(32, 7) == ratios.reshape(32, 7)[:, :1])


# ---------------------------------------------------------------- allocate_alpha by hand


def test_allocate_alpha_hand_values_matrix_wise():
    # r = [0.5, 1.0, 1.5] (s1 = 0.5, s2 = 1.5); scale = 0.5 * 3 / 3 -> [0.25, 0.5, 0.75]
    ratios = allocate_alpha([1.0, 2.0, 3.0], [0, 1, 2], [10, 10, 10], sparsity=0.5, epsilon=0.5)
    assert ratios == pytest.approx([0.25, 0.5, 0.75], abs=1e-12)


def test_allocate_alpha_weights_by_parameter_count():
    # r = [0.5, 1.5], sum n r = 3 * 0.5 + 1 * 1.5 = 3, scale = 0.3 * 4 / 3 = 0.4 -> [0.2, 0.6]
    ratios = allocate_alpha([1.0, 3.0], [0, 1], [3, 1], sparsity=0.3, epsilon=0.5, mapping="matrix_wise")
    assert ratios == pytest.approx([0.2, 0.6], abs=1e-12)


def test_allocate_alpha_block_wise_uses_block_means():
    # block means 2, 5, 2 -> r = [0.9, 0.9, 1.1, 1.1, 0.9, 0.9] before scaling; S * 6 / 6.0
    alphas = [1.0, 3.0, 4.0, 6.0, 2.0, 2.0]
    ratios = allocate_alpha(alphas, [0, 0, 1, 1, 2, 2], [1] * 6, sparsity=0.6, epsilon=0.1)
    scale = 0.6 * 6 / (0.9 * 4 + 1.1 * 2)
    assert ratios == pytest.approx([0.9 * scale] * 2 + [1.1 * scale] * 2 + [0.9 * scale] * 2, abs=1e-12)
    assert block_ratios(alphas, [0, 0, 1, 1, 2, 2], [1] * 6, 0.6, 0.1) == pytest.approx(
        [0.9 * scale, 1.1 * scale, 0.9 * scale], abs=1e-12
    )


def test_allocate_alpha_larger_alpha_is_pruned_more():
    alphas = [2.5, 4.0, 1.5, 3.0]
    ratios = allocate_alpha(alphas, [0, 1, 2, 3], [5] * 4, sparsity=0.5, epsilon=0.2)
    assert np.argsort(ratios).tolist() == np.argsort(alphas).tolist()


def test_allocate_alpha_rejects_ratios_of_one_or_more():
    # r = [0.1, 1.9] -> scaled by 0.8 * 2 / 2 -> [0.08, 1.52]
    with pytest.raises(InputError, match=r"ε=0\.9.*1\.52.*--alpha-epsilon"):
        allocate_alpha([1.0, 2.0], [0, 1], [1, 1], sparsity=0.8, epsilon=0.9)


def test_allocate_alpha_equal_alphas_are_uniform_and_bad_inputs():
    assert allocate_alpha([3.0, 3.0], [0, 1], [4, 9], sparsity=0.7, epsilon=0.3) == [0.7, 0.7]
    with pytest.raises(InputError, match="mapping"):
        allocate_alpha([1.0, 2.0], [0, 1], [1, 1], 0.5, 0.2, mapping="per_row")
    with pytest.raises(InputError, match="sparsity"):
        allocate_alpha([1.0, 2.0], [0, 1], [1, 1], 1.0, 0.2)


# ---------------------------------------------------------------- Hill estimator by hand


def _hand_fit(eigs: list[float], i: int) -> tuple[float, float]:
    """α_i and the KS distance D_i in float64, written out from the formulas in methods.md §5.1."""
    tail = eigs[i:]
    n = len(tail)
    alpha = 1 + n / (sum(math.log(x) for x in tail) - n * math.log(eigs[i]))
    distance = max(abs(1 - (x / eigs[i]) ** (1 - alpha) - k / n) for k, x in enumerate(tail))
    return alpha, distance


def test_hill_single_candidate_by_hand():
    # log10 λ = 0, .30, .60, .90: one per bin, the first bin wins -> xmin2 = 1, only λ = 1 <= 1.5
    eigs = [1.0, 2.0, 4.0, 8.0]
    assert xmin_peak_candidates(torch.tensor(eigs)) == [0]
    # α = 1 + 4 / (ln 64 - 4 ln 1) = 1 + 4 / (6 ln 2)
    assert hill_alpha_xmin_peak(eigs) == pytest.approx(1 + 4 / (6 * math.log(2)), rel=1e-6)


def test_hill_picks_the_candidate_with_smallest_ks_distance():
    eigs = [1.0, 1.1, 1.2, 1.3, 5.0, 20.0]
    # peak bin 0 -> xmin2 = 1 -> candidates λ <= 1.5 -> i = 0..3
    assert xmin_peak_candidates(torch.tensor(eigs)) == [0, 1, 2, 3]
    fits = [_hand_fit(eigs, i) for i in range(4)]
    best_alpha = min(fits, key=lambda fit: fit[1])[0]
    assert best_alpha != pytest.approx(fits[0][0], rel=1e-3)  # the choice matters here
    assert hill_alpha_xmin_peak(eigs) == pytest.approx(best_alpha, rel=1e-5)
    # input order and type do not matter (sorted internally; fp32 like the reference)
    assert hill_alpha_xmin_peak(np.array(eigs[::-1])) == hill_alpha_xmin_peak(torch.tensor(eigs))


def test_xmin_peak_keeps_the_reference_log_lower_bound_quirk():
    # peak bin around 1000 -> xmin2 in (930, 1000]; upper bound 1.5 * xmin2 < 1500 stops at 2000.
    # Lower bound is log10(0.95 * xmin2) ~ 2.97 compared with *raw* eigenvalues: λ = 2 is skipped,
    # λ = 3.5 stays a candidate although it is far below xmin2.
    eigs = torch.tensor([2.0, 3.5, 1000.0, 1000.1, 1000.2, 1000.3, 2000.0, 3000.0])
    assert xmin_peak_candidates(eigs) == [1, 2, 3, 4, 5]


def test_hill_alpha_mid_by_hand():
    # i = int(5 / 2) = 2, xmin = 4, n = 3: α = 1 + 3 / (ln 512 - 3 ln 4) = 1 + 1 / ln 2
    assert hill_alpha_mid([1.0, 2.0, 4.0, 8.0, 16.0]) == pytest.approx(1 + 1 / math.log(2), rel=1e-6)


@pytest.mark.parametrize("alpha", [2.0, 3.0, 4.0])
def test_hill_recovers_power_law_exponent(alpha):
    # density ∝ λ^{-α} on [1, ∞): CDF 1 - λ^{1-α}, inverse-CDF sampling
    u = np.random.default_rng(1234).random(4000)
    eigs = (1 - u) ** (-1 / (alpha - 1))
    assert hill_alpha_xmin_peak(eigs) == pytest.approx(alpha, rel=0.05)
    assert hill_alpha_mid(eigs) == pytest.approx(alpha, rel=0.05)


def test_zero_eigenvalues_are_dropped_and_flat_spectra_rejected():
    eigs = [1.0, 1.1, 1.2, 1.3, 5.0, 20.0]
    assert hill_alpha_xmin_peak([0.0, 0.0] + eigs) == hill_alpha_xmin_peak(eigs)
    with pytest.raises(InputError, match="flat or empty spectrum"):
        hill_alpha_xmin_peak([2.0, 2.0, 2.0])
    with pytest.raises(InputError, match="flat or empty spectrum"):
        hill_alpha_mid([0.0, 3.0])


def test_esd_metric_dispatch():
    eigs = [1.0, 1.1, 1.2, 1.3, 5.0, 20.0]
    assert esd_metric(eigs) == hill_alpha_xmin_peak(eigs)
    assert esd_metric(eigs, "alpha_mid") == hill_alpha_mid(eigs)
    with pytest.raises(InputError, match="unknown AlphaPruning metric 'alpha_max'"):
        esd_metric(eigs, "alpha_max")


def test_weightwatcher_metrics_name_the_missing_package():
    try:
        import weightwatcher  # noqa: F401
    except ImportError:
        with pytest.raises(InputError, match="pip install weightwatcher"):
            esd_metric([1.0, 2.0, 3.0], "stable_rank")
    else:
        pytest.skip("weightwatcher is installed")


def test_feasible_allocation_keeps_epsilon_when_it_fits_and_lowers_it_to_the_edge_when_not():
    import pytest

    from compresskit.allocation.alpha import allocate_alpha, feasible_alpha_allocation
    from compresskit.errors import InputError

    alphas, blocks, sizes = [2.0, 3.0, 4.0, 6.0], [0, 1, 2, 3], [100, 100, 100, 100]
    ratios, eps = feasible_alpha_allocation(alphas, blocks, sizes, 0.5, 0.3)
    assert eps == 0.3 and ratios == allocate_alpha(alphas, blocks, sizes, 0.5, 0.3)
    # at 85 % ε = 0.3 asks the last block for more than everything: refused by the method, lowered for a seed
    with pytest.raises(InputError, match="outside"):
        allocate_alpha(alphas, blocks, sizes, 0.85, 0.3)
    ratios, eps = feasible_alpha_allocation(alphas, blocks, sizes, 0.85, 0.3)
    assert 0.0 < eps < 0.3
    assert max(ratios) < 1.0 and min(ratios) >= 0.0
    assert abs(sum(r * n for r, n in zip(ratios, sizes)) - 0.85 * sum(sizes)) < 1e-9  # the budget is kept
    with pytest.raises(InputError):  # and it is the edge: a little more ε is infeasible
        allocate_alpha(alphas, blocks, sizes, 0.85, eps + 2e-4)
