"""Base pruners as pure tensor functions: hand-computed masks, exact counts, OBS algebra, statistics."""

from __future__ import annotations

import math

import pytest
import torch

from compresskit.errors import InputError
from compresskit.pruning import (
    PRUNERS,
    HessianStat,
    Pattern,
    SquaredNormStat,
    check_divisible,
    full_fp32_matmul,
    get_pruner,
    magnitude_prune_,
    matrix_mask,
    nm_mask,
    row_mask,
    sparsegpt_prune_,
    sparsegpt_reconstruct_,
    wanda_prune_,
    wanda_scores,
)
from compresskit.pruning.masks import smallest_k_mask

# --------------------------------------------------------------------------------------- Pattern


@pytest.mark.parametrize(("text", "n", "m"), [("2:4", 2, 4), ("4:8", 4, 8), ("5:8", 5, 8), (" 1 : 4 ", 1, 4)])
def test_parse_nm(text: str, n: int, m: int) -> None:
    pattern = Pattern.parse(text)
    assert (pattern.kind, pattern.n, pattern.m) == ("nm", n, m)
    assert pattern.sparsity == n / m
    assert str(pattern) == f"{n}:{m}"
    assert Pattern.parse(str(pattern)) == pattern


def test_parse_unstructured() -> None:
    pattern = Pattern.parse("Unstructured")
    assert pattern == Pattern.unstructured() and not pattern.is_nm
    assert pattern.sparsity is None and str(pattern) == "unstructured"
    assert Pattern.parse(pattern) is pattern


@pytest.mark.parametrize("text", ["4:2", "4:4", "0:4", "a:b", "2:", "", "2-4", "dense"])
def test_parse_rejects_bad_patterns(text: str) -> None:
    with pytest.raises(InputError) as info:
        Pattern.parse(text)
    assert "\n" not in str(info.value)


def test_check_divisible_message() -> None:
    check_divisible(32, Pattern.parse("2:4"))
    check_divisible(30, Pattern.unstructured())
    expected = r"^N:M pattern 2:4 needs the input dimension \(here 30\) to be a multiple of 4"
    with pytest.raises(InputError, match=expected):
        check_divisible(30, Pattern.parse("2:4"))


def test_resolve_sparsity() -> None:
    assert Pattern.parse("2:4").resolve_sparsity(None) == 0.5
    assert Pattern.parse("2:4").resolve_sparsity(0.5) == 0.5
    with pytest.raises(InputError, match="conflicts with N:M pattern 2:4"):
        Pattern.parse("2:4").resolve_sparsity(0.7)
    with pytest.raises(InputError, match="needs a sparsity"):
        Pattern.unstructured().resolve_sparsity(None)
    for bad in (1.0, -0.1, 1.5, float("nan")):
        with pytest.raises(InputError, match=r"sparsity must be a number in \[0, 1\)"):
            Pattern.unstructured().resolve_sparsity(bad)


# ----------------------------------------------------------------------------------------- masks


def test_matrix_mask_hand_example_exact_k_and_position_ties() -> None:
    score = torch.tensor([[3.0, 1.0, 4.0], [1.0, 5.0, 9.0], [2.0, 6.0, 5.0]])
    # int(9 * 0.34) = 3: the two 1s and the 2.
    expected = torch.tensor([[False, True, False], [True, False, False], [True, False, False]])
    assert torch.equal(matrix_mask(score, 0.34), expected)
    # int(9 * 0.12) = 1: of the tied 1s only the first in row-major order. (The reference's
    # `<= sorted[1]` would prune both 1s and the 2 is not reached: 2 entries for k = 1.)
    expected = torch.zeros(3, 3, dtype=torch.bool)
    expected[0, 1] = True
    assert torch.equal(matrix_mask(score, 0.12), expected)
    assert not matrix_mask(score, 0.0).any()


@pytest.mark.parametrize("dim", [0, 1])
def test_selection_path_equals_stable_sort_path(dim: int) -> None:
    generator = torch.Generator().manual_seed(1)
    score = torch.randint(0, 5, (37, 53), generator=generator).float()  # heavy ties
    for k in (1, 7, 20, 36):
        by_sort = smallest_k_mask(score, k, dim, use_sort=True)
        by_selection = smallest_k_mask(score, k, dim, use_sort=False)
        assert torch.equal(by_sort, by_selection)
        assert (by_sort.sum(dim=dim) == k).all()


def test_row_mask_exact_counts_per_row() -> None:
    generator = torch.Generator().manual_seed(2)
    for rows, cols, sparsity in [(5, 17, 0.3), (16, 64, 0.5), (3, 100, 0.99), (7, 9, 0.7)]:
        score = torch.randint(0, 3, (rows, cols), generator=generator).float()
        mask = row_mask(score, sparsity)
        assert (mask.sum(dim=1) == int(cols * sparsity)).all()


def test_nm_mask_hand_example() -> None:
    score = torch.tensor([[1.0, 3.0, 2.0, 0.5, 4.0, 0.1, 0.2, 9.0]])
    expected = torch.tensor([[True, False, False, True, False, True, True, False]])
    assert torch.equal(nm_mask(score, 2, 4), expected)
    # Ties: the lower position wins.
    assert torch.equal(nm_mask(torch.ones(1, 4), 1, 4), torch.tensor([[True, False, False, False]]))


# ------------------------------------------------------------------------------------- magnitude


def test_magnitude_hand_example() -> None:
    weight = torch.tensor([[0.5, -2.0, 0.1, 3.0], [-0.2, 1.0, -4.0, 0.3]])
    mask = magnitude_prune_(weight, 0.5)
    assert torch.equal(weight, torch.tensor([[0.0, -2.0, 0.0, 3.0], [0.0, 1.0, -4.0, 0.0]]))
    assert torch.equal(mask, weight == 0)


def test_magnitude_exact_matrix_sparsity_many_shapes() -> None:
    generator = torch.Generator().manual_seed(3)
    for rows, cols in [(1, 1), (3, 7), (16, 16), (33, 65), (128, 40)]:
        for sparsity in (0.0, 0.1, 0.29, 0.5, 0.7, 0.93):
            for integer_valued in (False, True):  # integers: many ties, still exactly k
                weight = torch.randn(rows, cols, generator=generator) * 3
                if integer_valued:
                    weight = weight.round() + 10 * torch.sign(weight)
                mask = magnitude_prune_(weight, sparsity)
                k = int(rows * cols * sparsity)
                assert int(mask.sum()) == k
                assert int((weight == 0).sum()) == k
                if k:  # the k smallest |W|: nothing kept is smaller than anything pruned
                    assert weight[~mask].abs().min() >= (weight.abs() + (~mask) * 1e9).min()


def test_magnitude_keeps_dtype_and_sparsity_zero_is_noop() -> None:
    weight = torch.randn(8, 16).to(torch.bfloat16)
    original = weight.clone()
    assert not magnitude_prune_(weight, 0.0).any()
    assert torch.equal(weight, original)
    mask = magnitude_prune_(weight, 0.25)
    assert weight.dtype == torch.bfloat16 and int(mask.sum()) == 32
    assert torch.equal(weight[~mask], original[~mask])


# ----------------------------------------------------------------------------------------- wanda

WANDA_WEIGHT = [[1.0, 3.0, 2.5, 5.0], [-0.5, 4.0, -1.25, 6.0], [0.2, -7.0, 0.9, 8.0]]
WANDA_ACT_SQ = [16.0, 1.0, 4.0, 0.25]  # column norms 4, 1, 2, 0.5


def test_wanda_scores_hand() -> None:
    scores = wanda_scores(torch.tensor(WANDA_WEIGHT), torch.tensor(WANDA_ACT_SQ))
    assert torch.equal(scores[0], torch.tensor([4.0, 3.0, 5.0, 2.5]))
    assert torch.equal(scores[1], torch.tensor([2.0, 4.0, 2.5, 3.0]))
    with pytest.raises(ValueError, match="one entry per input column"):
        wanda_scores(torch.ones(3, 4), torch.ones(5))


def test_wanda_hand_example_differs_from_magnitude() -> None:
    weight = torch.tensor(WANDA_WEIGHT)
    wanda_prune_(weight, torch.tensor(WANDA_ACT_SQ), 0.5)
    # Row 0 scores 4, 3, 5, 2.5: the large-input column 0 survives although |w| = 1 is the smallest.
    assert torch.equal(weight, torch.tensor([[1.0, 0.0, 2.5, 0.0], [0.0, 4.0, 0.0, 6.0], [0.0, -7.0, 0.0, 8.0]]))
    by_magnitude = torch.tensor(WANDA_WEIGHT)
    magnitude_prune_(by_magnitude, 0.5)
    assert torch.equal(by_magnitude, torch.tensor([[0.0, 3.0, 0.0, 5.0], [0.0, 4.0, 0.0, 6.0], [0.0, -7.0, 0.0, 8.0]]))


def test_wanda_exact_sparsity_per_row() -> None:
    generator = torch.Generator().manual_seed(4)
    for rows, cols, sparsity in [(4, 10, 0.5), (32, 96, 0.7), (9, 33, 0.21)]:
        weight = torch.randn(rows, cols, generator=generator)
        act = torch.rand(cols, generator=generator) * 10
        mask = wanda_prune_(weight, act, sparsity)
        assert (mask.sum(dim=1) == int(cols * sparsity)).all()
        assert ((weight == 0) == mask).all()


# ------------------------------------------------------------------------------------------- N:M


def _correlated_layer(rows: int = 64, cols: int = 256, tokens: int = 2048, seed: int = 0):
    """A random layer and inputs X = Z A (mixing A makes H far from diagonal), with both statistics."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(cols, cols, generator=generator) / math.sqrt(cols)
    mixing *= torch.rand(1, cols, generator=generator) * 3 + 0.1  # uneven feature scales
    inputs = torch.randn(tokens, cols, generator=generator) @ mixing
    weight = torch.randn(rows, cols, generator=generator)
    sq_norm, hessian = SquaredNormStat(cols), HessianStat(cols)
    for chunk in inputs.reshape(4, tokens // 4, cols).split(1):  # 4 samples of tokens/4 tokens
        sq_norm.add(chunk)
        hessian.add(chunk)
    return weight, inputs, {"none": None, "sq_norm": sq_norm.value(), "hessian": hessian.value()}


def _prune_with(name: str, weight: torch.Tensor, stats: dict, sparsity: float | None, pattern: str) -> torch.Tensor:
    spec = PRUNERS[name]
    return spec.prune(weight, stats[spec.needs], sparsity, Pattern.parse(pattern))


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4", "3:8"])
@pytest.mark.parametrize("name", ["magnitude", "wanda", "sparsegpt"])
def test_nm_every_group_has_exactly_n_zeros(name: str, pattern: str) -> None:
    weight, _, stats = _correlated_layer(rows=16, cols=64, tokens=256)
    parsed = Pattern.parse(pattern)
    mask = _prune_with(name, weight, stats, None, pattern)
    groups = (weight == 0).reshape(16, 64 // parsed.m, parsed.m)
    assert (groups.sum(dim=2) == parsed.n).all()
    assert torch.equal(mask, weight == 0)


@pytest.mark.parametrize("name", ["magnitude", "wanda", "sparsegpt"])
def test_nm_with_existing_zeros_has_at_least_n_per_group(name: str) -> None:
    weight, _, stats = _correlated_layer(rows=16, cols=64, tokens=256)
    weight[:, ::3] = 0.0  # already sparse: zeros are the cheapest entries
    _prune_with(name, weight, stats, 0.5, "2:4")
    zeros = (weight == 0).reshape(16, 16, 4).sum(dim=2)
    assert (zeros >= 2).all()
    # Mask-only pruners keep every old zero; SparseGPT's OBS updates may move an old zero that
    # its group did not select (as in the reference), so only the group count is guaranteed.
    assert (weight[:, ::3] == 0).all() == (name != "sparsegpt")


def test_nm_rejects_non_divisible_input_and_sparsity_conflict() -> None:
    with pytest.raises(InputError, match="multiple of 4"):
        magnitude_prune_(torch.randn(4, 30), None, Pattern.parse("2:4"))
    with pytest.raises(InputError, match="multiple of 8"):
        wanda_prune_(torch.randn(4, 12), torch.ones(12), None, Pattern.parse("4:8"))
    with pytest.raises(InputError, match="conflicts"):
        sparsegpt_prune_(torch.randn(4, 8), torch.eye(8), 0.6, Pattern.parse("2:4"))


# ------------------------------------------------------------------------------------- SparseGPT


def _relative_error(original: torch.Tensor, pruned: torch.Tensor, inputs: torch.Tensor) -> float:
    return float(torch.linalg.norm((original - pruned) @ inputs.T) / torch.linalg.norm(original @ inputs.T))


@pytest.mark.parametrize(("sparsity", "pattern"), [(0.5, "unstructured"), (None, "2:4")])
def test_sparsegpt_reconstructs_better_than_wanda_and_magnitude(sparsity: float | None, pattern: str) -> None:
    weight, inputs, stats = _correlated_layer()
    errors = {}
    for name in PRUNERS:
        pruned = weight.clone()
        _prune_with(name, pruned, stats, sparsity, pattern)
        assert int((pruned == 0).sum()) == weight.numel() // 2
        errors[name] = _relative_error(weight, pruned, inputs)
    assert errors["sparsegpt"] < 0.9 * errors["wanda"], errors
    assert errors["sparsegpt"] < 0.9 * errors["magnitude"], errors
    assert errors["wanda"] < errors["magnitude"], errors  # uneven feature scales reward Wanda


def _plain_sparsegpt(weight, hessian, sparsity, n, m, blocksize, percdamp=0.01):
    """methods.md §2.3 transcribed as plainly as possible (column-major, no vectorisation), with
    the one deliberate change: the unstructured block mask prunes exactly k (``matrix_mask``)."""
    weight, hessian = weight.clone().float(), hessian.clone()
    cols = weight.shape[1]
    dead = torch.diag(hessian) == 0
    hessian[dead, dead] = 1
    weight[:, dead] = 0
    hessian += percdamp * torch.mean(torch.diag(hessian)) * torch.eye(cols)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1, h1 = weight[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        q1, err1 = torch.zeros_like(w1), torch.zeros_like(w1)
        if n == 0:
            mask1 = matrix_mask(w1**2 / torch.diag(h1).reshape(1, -1) ** 2, sparsity)
        else:
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            if n and i % m == 0:
                score = w1[:, i : i + m] ** 2 / torch.diag(h1)[i : i + m].reshape(1, -1) ** 2
                mask1.scatter_(1, i + torch.topk(score, n, dim=1, largest=False).indices, True)
            w = w1[:, i]
            q = w.clone()
            q[mask1[:, i]] = 0
            q1[:, i] = q
            err = (w - q) / h1[i, i]
            w1[:, i:] -= err.unsqueeze(1) @ h1[i, i:].unsqueeze(0)
            err1[:, i] = err
        weight[:, i1:i2] = q1
        weight[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return weight


@pytest.mark.parametrize(
    ("sparsity", "pattern"), [(0.5, "unstructured"), (0.3, "unstructured"), (None, "2:4"), (None, "3:8")]
)
def test_sparsegpt_matches_plain_transcription_of_reference(sparsity: float | None, pattern: str) -> None:
    weight, _, stats = _correlated_layer(rows=24, cols=96, tokens=512)
    parsed = Pattern.parse(pattern)
    expected = _plain_sparsegpt(weight, stats["hessian"], sparsity, parsed.n, parsed.m, blocksize=40)
    mask = sparsegpt_prune_(weight, stats["hessian"], sparsity, parsed, blocksize=40)
    assert torch.equal(mask, expected == 0)
    torch.testing.assert_close(weight, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("blocksize", [128, 100, 7])
def test_sparsegpt_exact_zeros_per_block(blocksize: int) -> None:
    weight, _, stats = _correlated_layer(rows=32, cols=256, tokens=512)
    sparsity = 0.6
    mask = sparsegpt_prune_(weight, stats["hessian"], sparsity, Pattern.unstructured(), blocksize=blocksize)
    assert (weight[mask] == 0).all()
    assert torch.equal(mask, weight == 0)  # updated survivors never land exactly on 0 here
    for start in range(0, 256, blocksize):
        width = min(blocksize, 256 - start)
        assert int(mask[:, start : start + width].sum()) == int(32 * width * sparsity)


def test_sparsegpt_obs_update_by_hand() -> None:
    # One row w = (1, 3), H = [[4, 2], [2, 2]], no damping, one entry to prune in a 1x2 block.
    # U = upper Cholesky of H^-1: U_00^2 = [H^-1]_00 = c/det = 1/2 and U_11^2 = 1/c = 1/2, so the
    # scores w^2 / U_jj^2 are 2 and 18: w_0 is pruned. OBS moves the survivor by
    # -[H^-1]_01 / [H^-1]_00 * w_0 = (b / c) w_0 = +1, hence (0, 4); equivalently, 4 minimises
    # (w - v)^T H (w - v) over v = (0, x).
    weight = torch.tensor([[1.0, 3.0]])
    hessian = torch.tensor([[4.0, 2.0], [2.0, 2.0]])
    result = sparsegpt_reconstruct_(weight, hessian, 0.5, Pattern.unstructured(), blocksize=2, percdamp=0.0)
    assert torch.equal(result.mask, torch.tensor([[True, False]]))
    torch.testing.assert_close(weight, torch.tensor([[0.0, 4.0]]), rtol=0, atol=1e-5)
    # Reference loss: err = w_0 / U_00 = sqrt(2); loss = err^2 / 2 = 1.
    assert result.obs_loss == pytest.approx(1.0, rel=1e-5)
    assert torch.equal(hessian, torch.tensor([[4.0, 2.0], [2.0, 2.0]]))  # caller's H untouched


def _blockwise_matrix_mask(score: torch.Tensor, sparsity: float, blocksize: int) -> torch.Tensor:
    return torch.cat([matrix_mask(block, sparsity) for block in score.split(blocksize, dim=1)], dim=1)


def test_sparsegpt_with_diagonal_hessian_is_weighted_magnitude_per_block() -> None:
    # H = diag(h) => H^-1 = diag(1/h), U = diag(1/sqrt(h)): the score w^2 / U_jj^2 = w^2 h_j and
    # U has no off-diagonal entries, so no survivor moves. With h a power of 4 every step is exact.
    generator = torch.Generator().manual_seed(5)
    rows, cols, blocksize, sparsity = 24, 40, 16, 0.5
    h = 4.0 ** torch.randint(-2, 3, (cols,), generator=generator).float()
    weight = torch.randn(rows, cols, generator=generator)
    original = weight.clone()
    mask = sparsegpt_prune_(weight, torch.diag(h), sparsity, Pattern.unstructured(), blocksize, percdamp=0.0)
    expected = _blockwise_matrix_mask(original**2 * h, sparsity, blocksize)
    assert torch.equal(mask, expected)
    assert torch.equal(weight[~mask], original[~mask])
    assert (weight[mask] == 0).all()
    # With the default damping the weights become w^2 (h_j + 0.01 mean(h)).
    weight = original.clone()
    mask = sparsegpt_prune_(weight, torch.diag(h), sparsity, Pattern.unstructured(), blocksize)
    damped = h + 0.01 * h.mean()
    expected = _blockwise_matrix_mask(original**2 * damped, sparsity, blocksize)
    assert torch.equal(mask, expected)
    torch.testing.assert_close(weight[~mask], original[~mask], rtol=1e-6, atol=0)


def test_sparsegpt_zeroes_dead_columns() -> None:
    weight, _, stats = _correlated_layer(rows=16, cols=64, tokens=256)
    hessian = stats["hessian"].clone()
    dead = [3, 40]
    hessian[dead, :] = 0.0
    hessian[:, dead] = 0.0
    result = sparsegpt_reconstruct_(weight, hessian, 0.25, Pattern.unstructured(), blocksize=32)
    assert result.dead_columns == 2
    assert (weight[:, dead] == 0).all() and result.mask[:, dead].all()
    assert torch.equal(result.mask, weight == 0)
    # Zeroed before scoring, dead entries score 0 and use up part of each block's budget.
    assert int(result.mask.sum()) == 2 * int(16 * 32 * 0.25)


def test_sparsegpt_keeps_dtype_bf16() -> None:
    weight, inputs, stats = _correlated_layer(rows=16, cols=64, tokens=256)
    weight_bf16 = weight.to(torch.bfloat16)
    reference = weight_bf16.float()
    mask = sparsegpt_prune_(weight_bf16, stats["hessian"], 0.5, Pattern.unstructured())
    sparsegpt_prune_(reference, stats["hessian"], 0.5, Pattern.unstructured())
    assert weight_bf16.dtype == torch.bfloat16
    assert int(mask.sum()) == 16 * 64 // 2 and (weight_bf16[mask] == 0).all()
    assert torch.equal(weight_bf16, reference.to(torch.bfloat16))  # fp32 work, one final cast


def test_sparsegpt_retries_damping_on_singular_hessian() -> None:
    generator = torch.Generator().manual_seed(6)
    cols = 32
    low_rank = torch.randn(4, cols, generator=generator)
    hessian = low_rank.T @ low_rank  # rank 4: not positive definite without damping
    weight = torch.randn(8, cols, generator=generator)
    result = sparsegpt_reconstruct_(weight, hessian, 0.5, Pattern.unstructured(), blocksize=16, percdamp=0.0)
    assert result.damping_retries >= 1 and result.percdamp_used > 0
    assert int(result.mask.sum()) == 8 * cols // 2 and torch.isfinite(weight).all()


def test_sparsegpt_rejects_bad_inputs_and_restores_tf32_setting() -> None:
    with pytest.raises(InputError, match="NaN/inf"):
        sparsegpt_prune_(torch.randn(4, 8), torch.full((8, 8), float("nan")), 0.5)
    with pytest.raises(InputError, match="multiple of M=4"):
        sparsegpt_prune_(torch.randn(4, 16), torch.eye(16), None, Pattern.parse("2:4"), blocksize=6)
    with pytest.raises(InputError, match="percdamp"):
        sparsegpt_prune_(torch.randn(4, 8), torch.eye(8), 0.5, percdamp=-1.0)
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        sparsegpt_prune_(torch.randn(4, 8), torch.eye(8), 0.5)
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(previous)


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"), reason="torch < 2.9")
def test_full_fp32_matmul_follows_the_per_backend_api_when_the_caller_uses_it() -> None:
    matmul = torch.backends.cuda.matmul
    original = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"  # from now on the legacy getter raises in this state
        with pytest.raises(RuntimeError):
            torch.get_float32_matmul_precision()
        with full_fp32_matmul():
            assert matmul.fp32_precision == "ieee"
        sparsegpt_prune_(torch.randn(4, 8), torch.eye(8), 0.5)
        assert matmul.fp32_precision == "tf32"
    finally:
        matmul.fp32_precision = original
    with full_fp32_matmul():  # and the legacy path again
        assert torch.get_float32_matmul_precision() == "highest"


# ----------------------------------------------------------------------------------------- stats


def _batches(cols: int, seed: int = 7) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shapes = [(1, 5, cols), (3, 5, cols), (2, 7, cols), (6, cols)]  # a 2-D input is one sample
    return [torch.randn(shape, generator=generator).to(torch.float16) for shape in shapes]


def test_squared_norm_equals_reference_running_average() -> None:
    cols = 12
    scaler_row, nsamples = torch.zeros(cols), 0
    for batch in _batches(cols):  # the reference loop (Wanda's add_batch)
        x = batch.unsqueeze(0) if batch.dim() == 2 else batch
        count = x.shape[0]
        x = x.reshape(-1, cols).t().float()
        scaler_row *= nsamples / (nsamples + count)
        nsamples += count
        scaler_row += torch.norm(x, p=2, dim=1) ** 2 / nsamples
    stat = SquaredNormStat(cols)
    for batch in _batches(cols):
        stat.add(batch)
    assert stat.nsamples == nsamples == 7
    torch.testing.assert_close(stat.value(), scaler_row, rtol=1e-5, atol=1e-6)


def test_hessian_equals_reference_running_rescale() -> None:
    cols = 12
    hessian, nsamples = torch.zeros(cols, cols), 0
    for batch in _batches(cols):  # the reference loop (SparseGPT's add_batch)
        x = batch.unsqueeze(0) if batch.dim() == 2 else batch
        count = x.shape[0]
        x = x.reshape(-1, cols).t().float()
        hessian *= nsamples / (nsamples + count)
        nsamples += count
        x = math.sqrt(2 / nsamples) * x
        hessian += x @ x.t()
    stat = HessianStat(cols)
    for batch in _batches(cols):
        stat.add(batch)
    assert stat.nsamples == 7
    torch.testing.assert_close(stat.value(), hessian, rtol=1e-5, atol=1e-6)


def test_stats_exclude_masked_tokens() -> None:
    generator = torch.Generator().manual_seed(8)
    cols = 6
    x = torch.randn(2, 5, cols, generator=generator)
    keep = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])  # left padding, as an attention_mask
    x[0, :2] = float("nan")  # pad positions must not leak in
    real = torch.cat([x[0, 2:], x[1]])
    sq_norm, hessian = SquaredNormStat(cols), HessianStat(cols)
    sq_norm.add(x, token_mask=keep)
    hessian.add(x, token_mask=keep)
    assert sq_norm.nsamples == hessian.nsamples == 2  # still two samples
    torch.testing.assert_close(sq_norm.value(), (real**2).sum(0) / 2)
    torch.testing.assert_close(hessian.value(), real.T @ real * (2 / 2))
    unmasked = SquaredNormStat(cols)
    unmasked.add(x)  # the reference behaviour: every token counts
    assert torch.isnan(unmasked.value()).all()


def test_stats_errors() -> None:
    with pytest.raises(RuntimeError, match="before any input"):
        SquaredNormStat(4).value()
    with pytest.raises(ValueError, match="expects 4"):
        HessianStat(4).add(torch.ones(2, 3, 5))
    with pytest.raises(ValueError, match="token_mask"):
        SquaredNormStat(4).add(torch.ones(2, 3, 4), token_mask=torch.ones(2, 2))


# -------------------------------------------------------------------------------------- registry


def test_registry_uniform_interface() -> None:
    assert {name: spec.needs for name, spec in PRUNERS.items()} == {
        "magnitude": "none",
        "wanda": "sq_norm",
        "sparsegpt": "hessian",
    }
    assert PRUNERS["magnitude"].new_stat(8) is None
    assert isinstance(PRUNERS["wanda"].new_stat(8), SquaredNormStat)
    assert isinstance(PRUNERS["sparsegpt"].new_stat(8), HessianStat)
    assert dict(PRUNERS["sparsegpt"].options) == {"blocksize": 128, "percdamp": 0.01}
    weight = torch.randn(4, 8)
    mask = PRUNERS["sparsegpt"].prune(weight, torch.eye(8), 0.5, Pattern.unstructured(), blocksize=4)
    assert int(mask.sum()) == 16
    with pytest.raises(InputError, match="has no option 'blocksize'"):
        PRUNERS["wanda"].prune(weight, torch.ones(8), 0.5, Pattern.unstructured(), blocksize=4)
    with pytest.raises(InputError, match="choose one of: magnitude, wanda, sparsegpt"):
        get_pruner("obs")
    assert get_pruner("wanda") is PRUNERS["wanda"]
