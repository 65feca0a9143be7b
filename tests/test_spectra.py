"""Singular values (svdvals and Gram paths) and their on-disk cache."""

from __future__ import annotations

import pytest
import torch

from compresskit.analysis import spectra
from compresskit.analysis.spectra import SpectrumCache, model_singular_values, singular_values, weights_fingerprint


def _matrix_with_singular_values(values: list[float], rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """U diag(values) Vᵀ with random orthonormal U (rows×r) and V (cols×r), in float64."""
    gen = torch.Generator().manual_seed(seed)
    r = len(values)
    u, _ = torch.linalg.qr(torch.randn(rows, r, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, r, generator=gen, dtype=torch.float64))
    return u @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ v.T


@pytest.mark.parametrize("method", ["svdvals", "gram"])
@pytest.mark.parametrize("rows, cols", [(7, 5), (5, 7)])
def test_known_singular_values_descending_fp32_cpu(method, rows, cols):
    weight = _matrix_with_singular_values([0.5, 5.0, 1.0, 3.0, 2.0], rows, cols).float()
    sigma = singular_values(weight, method=method)
    assert sigma.dtype == torch.float32 and sigma.device.type == "cpu"
    assert sigma.shape == (5,)  # min(rows, cols), whichever Gram side is used
    torch.testing.assert_close(sigma, torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(96, 64), (64, 96)])
def test_svdvals_and_gram_agree_on_random_matrix(shape):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 0.02
    a = singular_values(weight, method="svdvals")
    b = singular_values(weight, method="gram")
    assert torch.all(a[:-1] >= a[1:])
    assert torch.max((a - b).abs() / a).item() < 1e-4


def test_singular_values_rejects_non_matrix_and_unknown_method():
    with pytest.raises(ValueError, match="2-D"):
        singular_values(torch.ones(2, 3, 4))
    with pytest.raises(ValueError, match="method"):
        singular_values(torch.ones(2, 3), method="qr")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_matches_cpu():
    weight = torch.randn(256, 128, generator=torch.Generator().manual_seed(5))
    cpu = singular_values(weight)
    for method in ("svdvals", "gram"):
        gpu = singular_values(weight, device="cuda", method=method)
        assert gpu.device.type == "cpu"
        torch.testing.assert_close(gpu, cpu, rtol=1e-4, atol=1e-6)


def test_cache_round_trip_and_key_isolation(tmp_path):
    cache = SpectrumCache("org/model@abc123", root=tmp_path)
    values = torch.tensor([3.0, 2.0, 1.0])
    assert cache.get("model.layers.0.self_attn.q_proj", (3, 4)) is None
    cache.put("model.layers.0.self_attn.q_proj", (3, 4), values)
    assert torch.equal(cache.get("model.layers.0.self_attn.q_proj", (3, 4)), values)
    # any part of the key differing is a miss
    assert cache.get("model.layers.0.self_attn.k_proj", (3, 4)) is None
    assert cache.get("model.layers.0.self_attn.q_proj", (4, 3)) is None
    assert SpectrumCache("org/model@def456", root=tmp_path).get("model.layers.0.self_attn.q_proj", (3, 4)) is None
    gram = SpectrumCache("org/model@abc123", method="gram", root=tmp_path)
    assert gram.get("model.layers.0.self_attn.q_proj", (3, 4)) is None
    assert not list(tmp_path.rglob("*.tmp"))  # atomic write leaves no temporary file


def test_cache_treats_a_corrupt_file_as_a_miss(tmp_path):
    cache = SpectrumCache("m", root=tmp_path)
    cache.put("w", (2, 2), torch.tensor([1.0, 0.5]))
    cache.path_for("w", (2, 2)).write_bytes(b"not a safetensors file")
    assert cache.get("w", (2, 2)) is None


def test_cache_default_root_is_under_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSKIT_CACHE_DIR", str(tmp_path))
    cache = SpectrumCache("m")
    assert cache.path_for("w", (2, 2)).is_relative_to(tmp_path / "spectra")


def test_model_singular_values_reads_back_from_cache(tmp_path, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    named = [("a.q", torch.randn(6, 4, generator=gen)), ("a.down", torch.randn(4, 9, generator=gen))]
    first = model_singular_values(named, cache_key="toy@1", cache_root=tmp_path, progress=False)
    assert list(first) == ["a.q", "a.down"]
    assert [v.shape[0] for v in first.values()] == [4, 4]
    torch.testing.assert_close(first["a.q"], torch.linalg.svdvals(named[0][1]))

    def must_not_compute(*args, **kwargs):
        raise AssertionError("recomputed a cached spectrum")

    monkeypatch.setattr(spectra, "singular_values", must_not_compute)
    second = model_singular_values(iter(named), cache_key="toy@1", cache_root=tmp_path, progress=False)
    assert all(torch.equal(first[k], second[k]) for k in first)
    with pytest.raises(AssertionError, match="recomputed"):  # no cache key: always computed
        model_singular_values(named, cache_key=None, progress=False)


def test_weights_fingerprint_changes_with_the_weights():
    gen = torch.Generator().manual_seed(0)
    named = [("a", torch.randn(64, 64, generator=gen)), ("b", torch.randn(8, 16, generator=gen))]
    same = [(n, w.clone()) for n, w in named]
    assert weights_fingerprint(named) == weights_fingerprint(same)
    assert weights_fingerprint(named) != weights_fingerprint([("a", named[0][1] * 1.01), named[1]])
    assert weights_fingerprint(named) != weights_fingerprint([("c", named[0][1]), named[1]])
    assert weights_fingerprint(named) != weights_fingerprint([named[0], ("b", named[1][1].half())])
