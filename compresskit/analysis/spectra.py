"""Singular values of weight matrices, computed once per model and cached on disk.

AlphaPruning (methods.md §5.1) fits a power law to ``σ²`` of every decoder linear, and WeLore
(§6.1) ranks by ``σ``; both are data-free and need the full spectrum of every matrix. The
references run ``svdvals`` / ``svd`` on CPU in fp32, which takes minutes for a 7B model (§5.4),
so this module computes on any device (a GPU when present) and caches the result under
``cache_dir()/spectra/`` keyed by model identity, module name and shape.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from compresskit import paths

SPECTRUM_METHODS = ("svdvals", "gram")


@torch.no_grad()
def singular_values(
    weight: torch.Tensor, device: torch.device | str | None = None, method: str = "svdvals"
) -> torch.Tensor:
    """Singular values of a 2-D ``weight``, descending, fp32, returned on CPU.

    ``method="svdvals"`` (default) is ``torch.linalg.svdvals`` of the fp32 matrix, as both
    references do, so cached values match theirs. ``method="gram"`` takes ``sqrt(eigvalsh(G))`` of
    the smaller Gram matrix (``W Wᵀ`` or ``Wᵀ W``) in fp64: one matmul plus a symmetric eigensolve,
    much faster on a GPU. Squaring the matrix squares its condition number, so singular values
    below ``~1e-8 · σ_max`` lose relative accuracy; fp64 keeps the rest within fp32 precision.
    The computation runs on ``device`` (default: the weight's own device).
    """
    if weight.dim() != 2:
        raise ValueError(f"singular_values needs a 2-D matrix, got shape {tuple(weight.shape)}")
    if method not in SPECTRUM_METHODS:
        raise ValueError(f"method must be one of {SPECTRUM_METHODS}, got {method!r}")
    device = torch.device(device) if device is not None else weight.device
    if method == "svdvals":
        sigma = torch.linalg.svdvals(weight.detach().to(device=device, dtype=torch.float32))
    else:
        w = weight.detach().to(device=device, dtype=torch.float64)
        gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
        # eigvalsh is ascending; tiny negative eigenvalues are rounding noise of zero ones.
        sigma = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt().flip(0)
    return sigma.to(device="cpu", dtype=torch.float32).contiguous()


def weights_fingerprint(named_weights: Iterable[tuple[str, torch.Tensor]], samples: int = 4096) -> str:
    """A cheap identity for weights that have no hub revision (local dirs, in-memory models).

    Hashes every name, shape and dtype, plus ``samples`` evenly strided entries of each tensor
    (reading all of a 7B model would cost as much as a slow SVD pass). Any fine-tuning, merge or
    pruning changes sampled entries; an edit confined to unsampled entries would go unnoticed,
    so prefer ``name@revision`` when the model comes from the hub.
    """
    digest = hashlib.sha256()
    for name, tensor in named_weights:
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // samples)
        picked = flat[::step][:samples].to(device="cpu", dtype=torch.float32).contiguous()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(picked.numpy().tobytes())
    return digest.hexdigest()[:24]


class SpectrumCache:
    """Singular values on disk: one safetensors file per (model, method, module name, shape).

    Files live under ``<root>/<hash of model key>/``; ``root`` defaults to
    ``cache_dir()/spectra``. One file per matrix (not one per model) so that an interrupted pass
    keeps what it finished. Writes are atomic (temporary file + rename). The metadata stores the
    full key, and a file whose metadata does not match is treated as a miss.
    """

    def __init__(self, model_key: str, method: str = "svdvals", root: Path | None = None) -> None:
        if not model_key:
            raise ValueError("model_key must be a non-empty string")
        self.model_key = model_key
        self.method = method
        base = Path(root) if root is not None else paths.cache_dir() / "spectra"
        self.directory = base / hashlib.sha256(model_key.encode()).hexdigest()[:24]

    def _metadata(self, module_name: str, shape: tuple[int, ...]) -> dict[str, str]:
        return {
            "model_key": self.model_key,
            "method": self.method,
            "module": module_name,
            "shape": "x".join(str(d) for d in shape),
        }

    def path_for(self, module_name: str, shape: tuple[int, ...]) -> Path:
        key = "|".join(self._metadata(module_name, tuple(shape)).values())
        return self.directory / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors"

    def get(self, module_name: str, shape: tuple[int, ...]) -> torch.Tensor | None:
        path = self.path_for(module_name, shape)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:
                if handle.metadata() != self._metadata(module_name, tuple(shape)):
                    return None
            return load_file(str(path))["singular_values"]
        except Exception:  # a truncated or foreign file is a miss, and will be rewritten
            return None

    def put(self, module_name: str, shape: tuple[int, ...], values: torch.Tensor) -> None:
        path = self.path_for(module_name, shape)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        try:
            tensors = {"singular_values": values.detach().to("cpu", torch.float32).contiguous()}
            save_file(tensors, tmp, metadata=self._metadata(module_name, tuple(shape)))
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def model_singular_values(
    named_weights: Iterable[tuple[str, torch.Tensor]],
    cache_key: str | None,
    device: torch.device | str | None = None,
    method: str = "svdvals",
    cache_root: Path | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Singular values (descending, fp32, CPU) of every named 2-D weight, in the given order.

    ``cache_key`` identifies the weights (``name_or_path@revision`` or ``weights_fingerprint``);
    ``None`` disables the cache. Cached matrices are read back instead of recomputed.
    """
    cache = SpectrumCache(cache_key, method, cache_root) if cache_key is not None else None
    total = len(named_weights) if hasattr(named_weights, "__len__") else None
    result: dict[str, torch.Tensor] = {}
    # Iterated lazily: a generator may load each weight from disk only when its turn comes.
    bar = tqdm(named_weights, total=total, desc="singular values", unit="matrix", disable=not progress)
    for name, weight in bar:
        shape = tuple(weight.shape)
        values = cache.get(name, shape) if cache is not None else None
        if values is None:
            values = singular_values(weight, device=device, method=method)
            if cache is not None:
                cache.put(name, shape, values)
        result[name] = values
    return result
