"""What compression buys: parameters, nonzeros, bytes on disk, peak memory, tokens per second.

Unstructured sparsity keeps every parameter (zeros are stored), so ``count_nonzeros`` is the
number that moves; structural methods (FinerCut, CD-MoE, WeLore) shrink ``count_parameters`` and
the checkpoint. Speed is measured as the papers do it for CD-MoE (prefill and greedy decode with
a KV cache) and labelled with the device it was timed on: CPU numbers are not GPU numbers.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from compresskit.errors import EvaluationError
from compresskit.models.placement import move_model

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def _decoder_linear_modules(adapter) -> list[nn.Module]:
    """Duck-typed: anything with ``num_blocks`` and ``prunable_linears(i) -> {name: module}``."""
    seen: dict[int, nn.Module] = {}
    for i in range(adapter.num_blocks):
        for module in adapter.prunable_linears(i).values():
            seen.setdefault(id(module), module)
    return list(seen.values())


def _unique_parameters(modules) -> list[torch.Tensor]:
    """Shared tensors (tied embeddings) once: ``parameters()`` already de-duplicates per module."""
    seen: dict[int, torch.Tensor] = {}
    for module in modules:
        for p in module.parameters():
            seen.setdefault(id(p), p)
    return list(seen.values())


def count_parameters(model: nn.Module, adapter=None) -> dict[str, int | None]:
    """``params_total`` (tied weights once) and, with an adapter, ``params_decoder_linear``
    (weights and biases of the decoder blocks' prunable linears — the matrices the methods touch)."""
    total = sum(p.numel() for p in _unique_parameters([model]))
    linear = None
    if adapter is not None:
        linear = sum(p.numel() for p in _unique_parameters(_decoder_linear_modules(adapter)))
    return {"params_total": total, "params_decoder_linear": linear}


def count_nonzeros(model: nn.Module, adapter=None) -> dict[str, int | None]:
    """Nonzero entries, same scopes as ``count_parameters``."""

    def nnz(params) -> int:
        return sum(int(torch.count_nonzero(p.detach()).item()) for p in params)

    linear = None
    if adapter is not None:
        linear = nnz(_unique_parameters(_decoder_linear_modules(adapter)))
    return {"nonzeros_total": nnz(_unique_parameters([model])), "nonzeros_decoder_linear": linear}


def disk_bytes(path: str | os.PathLike, *, weights_only: bool = False) -> int:
    """Bytes of a checkpoint: every file under ``path`` (symlinks followed, as in the HF cache),
    or only weight files (``*.safetensors``, ``*.bin``, ...) with ``weights_only``."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        raise EvaluationError(f"checkpoint {path} not found; pass a checkpoint folder or file")
    total = 0
    for root, _, names in os.walk(path):
        for name in names:
            if weights_only and not name.endswith(WEIGHT_SUFFIXES):
                continue
            file = Path(root) / name
            if file.exists():  # skip dangling links
                total += file.stat().st_size
    return total


# ----------------------------------------------------------------------------- memory
@dataclass
class PeakMemory:
    """Filled in when the ``peak_memory`` block exits."""

    bytes: int | None = None
    kind: str | None = None  # "cuda_max_allocated" | "cpu_maxrss_delta"


def _maxrss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB, macOS bytes


@contextlib.contextmanager
def peak_memory(device: str | torch.device | None = None) -> Iterator[PeakMemory]:
    """Peak memory of the block: CUDA ``max_memory_allocated`` (tensors only, reset on entry), or on
    CPU the growth of the process's max RSS — a lifetime high-water mark, so it is 0 unless the
    block pushed the peak above anything earlier in the process."""
    device = torch.device(device) if device is not None else None
    result = PeakMemory()
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        torch.cuda.synchronize(device)
        result.bytes, result.kind = torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    else:
        before = _maxrss_bytes()
        yield result
        result.bytes, result.kind = max(0, _maxrss_bytes() - before), "cpu_maxrss_delta"


# ----------------------------------------------------------------------------- throughput
class _Timer:
    """Wall time of a region: CUDA events (GPU work is asynchronous) or ``perf_counter``."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            torch.cuda.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1000.0
        else:
            self.seconds = time.perf_counter() - self.t0


def _cache_of(out):
    """The KV cache a forward returned: ``cache`` since transformers 5.2x, ``past_key_values`` before."""
    return out["cache"] if "cache" in out else out.past_key_values


def _generate(model: nn.Module, prompt: torch.Tensor, new_tokens: int, timer_device: torch.device):
    """Greedy decode with a KV cache; returns (prefill seconds, decode seconds)."""
    import inspect

    # the keyword the model's forward takes (transformers renamed past_key_values to cache, with a
    # deprecation warning for the old name)
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with _Timer(timer_device) as prefill:
        out = model(input_ids=prompt, use_cache=True)
    past, next_token = _cache_of(out), out.logits[:, -1:].argmax(-1)
    with _Timer(timer_device) as decode:
        for _ in range(new_tokens):
            out = model(input_ids=next_token, use_cache=True, **{name: past})
            past, next_token = _cache_of(out), out.logits[:, -1:].argmax(-1)
    return prefill.seconds, decode.seconds


@torch.inference_mode()
def measure_throughput(
    model: nn.Module,
    tokenizer=None,
    *,
    prompt_len: int = 128,
    new_tokens: int = 32,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    warmup: int = 1,
    seed: int = 0,
) -> dict:
    """Prefill and decode tokens/s on a seeded random prompt (content does not change the cost).

    One warm-up generation first (kernel selection, allocator); ``config.use_cache`` and the
    training flag are restored afterwards, and the model is moved back if ``device`` moved it.
    """
    if prompt_len < 1 or new_tokens < 1 or batch_size < 1:
        raise EvaluationError("prompt_len, new_tokens and batch_size must be at least 1")
    original_device = next(model.parameters()).device
    device = torch.device(device) if device is not None else original_device
    vocab = model.config.vocab_size if tokenizer is None else min(len(tokenizer), model.config.vocab_size)
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (batch_size, prompt_len), generator=gen).to(device)

    use_cache, was_training = getattr(model.config, "use_cache", None), model.training
    try:
        move_model(model, device).eval()
        model.config.use_cache = True
        for _ in range(warmup):
            _generate(model, prompt, min(new_tokens, 4), device)
        prefill_s, decode_s = _generate(model, prompt, new_tokens, device)
    finally:
        model.config.use_cache = use_cache
        model.train(was_training)
        if device != original_device:
            move_model(model, original_device)
    timing_device = "cuda" if device.type == "cuda" else "cpu"
    return {
        "prefill_tokens_per_s": batch_size * prompt_len / prefill_s,
        "decode_tokens_per_s": batch_size * new_tokens / decode_s,
        "device": timing_device,
        "note": f"{timing_device} timing; batch {batch_size}, prompt {prompt_len}, "
        f"{new_tokens} greedy tokens with KV cache"
        + ("; CPU numbers are not comparable with GPU numbers" if timing_device == "cpu" else ""),
    }
