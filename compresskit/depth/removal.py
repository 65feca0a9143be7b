"""Physical removal of sublayers: parameter-free stubs in place of attention / MLP / MoE and norms.

A removed sublayer's residual branch contributes zero, exactly as the reference's zero mask on
``o_proj`` / ``down_proj`` output (methods.md §8.1), so the block computes ``h + 0``. The stubs
hold no tensors: the module (and its norm, whose output then feeds nothing) is gone from the
state dict, and a streaming save writes only what remains.

KV cache: :class:`RemovedAttention` computes nothing, but its cache slot (same ``layer_idx`` as
the attention it replaced) keeps counting tokens: each step appends zeros of one head and one
channel (``[batch, 1, tokens, 1]``, or the slot's own head / channel count when the cache was
allocated ahead, as a static cache is). transformers reads the cache's length, query offset and
mask sizes from whichever slot its model code names — the first slot of a layer type for Gemma-2/3,
slot 0 for most, the decode loop of ``eval --efficiency`` — so every slot, removed or not, must
answer them for its own layer type (sliding window or full). A slot of a layer without keys
(transformers' ``DummyLayer``) cannot (``get_seq_length`` is missing on it since transformers 5.25),
so compresskit never uses one. Nothing reads the zeros; they cost ``batch × tokens`` numbers per
removed attention. Post-norm blocks (OPT with ``do_layer_norm_before=False``) keep their norms: there
the norm sits on the residual stream, not on the branch.
"""

from __future__ import annotations

import torch
from torch import nn

_CACHE_KWARGS = ("cache", "past_key_values", "layer_past", "past_key_value")


def _hidden(args, kwargs) -> torch.Tensor:
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def _count_tokens_in_slot(cache, layer_idx: int, hidden: torch.Tensor) -> None:
    """Append one zero per token to ``cache``'s slot ``layer_idx`` so that the slot answers the
    cache's length and mask sizes for its layer type like an attending layer would."""
    layers = getattr(cache, "layers", None)
    if isinstance(layers, list):
        replicate = getattr(cache, "layer_class_to_replicate", None)
        while len(layers) <= layer_idx and replicate is not None:
            layers.append(replicate())
        if layer_idx >= len(layers):
            return
        keys = getattr(layers[layer_idx], "keys", None)
    else:
        keys = None
    heads, channels = (keys.shape[1], keys.shape[-1]) if isinstance(keys, torch.Tensor) and keys.dim() == 4 else (1, 1)
    dtype = keys.dtype if isinstance(keys, torch.Tensor) else hidden.dtype
    zeros = hidden.new_zeros(hidden.shape[0], heads, hidden.shape[-2], channels, dtype=dtype)
    cache.update(zeros, zeros, layer_idx)


class RemovedAttention(nn.Module):
    """A removed attention sublayer: zero output, ``None`` attention weights; its cache slot only
    counts tokens (see the module docstring)."""

    def __init__(self, layer_idx: int | None = None):
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, *args, **kwargs):
        hidden = _hidden(args, kwargs)
        cache = next((kwargs[k] for k in _CACHE_KWARGS if kwargs.get(k) is not None), None)
        if cache is not None and self.layer_idx is not None:
            _count_tokens_in_slot(cache, self.layer_idx, hidden)
        return torch.zeros_like(hidden), None


class RemovedMLP(nn.Module):
    """A removed MLP or MoE sublayer: zero output (no router, no experts)."""

    def forward(self, *args, **kwargs):
        return torch.zeros_like(_hidden(args, kwargs))


class RemovedNorm(nn.Module):
    """The norm of a removed sublayer: its output feeds only the stub (or is the stub's zeros)."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class ZeroLinear(nn.Module):
    """OPT's inline ``fc2`` when its MLP is removed: zeros of the block's width, no weights."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = int(out_features)

    def forward(self, x):
        return x.new_zeros(*x.shape[:-1], self.out_features)


STUB_TYPES = (RemovedAttention, RemovedMLP, RemovedNorm, ZeroLinear)


def _post_norm(adapter) -> bool:
    config = adapter.model.config.get_text_config()
    return adapter.text_family == "opt" and getattr(config, "do_layer_norm_before", True) is False


def sublayer_modules(adapter, i: int, kind: str) -> dict[str, str]:
    """Local name in block ``i`` → role (``attention`` / ``mlp`` / ``norm`` / ``fc_in`` / ``fc_out``)
    of every module removed with the ``kind`` ("attn" | "mlp") sublayer; empty once removed."""
    block, layout = adapter.block(i), adapter.layout
    keep_norms = _post_norm(adapter)
    if kind == "attn":
        if isinstance(block.get_submodule(layout.attention), RemovedAttention):
            return {}
        out = {layout.attention: "attention"}
        norms = [layout.input_norm]
        if layout.post_attention_norm != layout.pre_mlp_norm:  # Gemma: a norm of the attention output
            norms.append(layout.post_attention_norm)
    elif kind == "mlp":
        if adapter.has_mlp_module(i):
            name = adapter._mlp_local_name(i)
            if isinstance(block.get_submodule(name), RemovedMLP):
                return {}
            out = {name: "mlp"}
        else:  # OPT: fc1 -> activation -> fc2 directly in the block
            fc_in, fc_out = layout.inline_mlp_linears
            if isinstance(getattr(block, fc_out), ZeroLinear):
                return {}
            out = {fc_in: "fc_in", fc_out: "fc_out"}
        attention_norms = {layout.input_norm, layout.post_attention_norm}
        norms = [layout.pre_mlp_norm] + [n for n in layout.extra_norms if n not in attention_norms | {layout.pre_mlp_norm}]
    else:
        raise ValueError(f"kind must be 'attn' or 'mlp', got {kind!r}")
    if not keep_norms:
        out.update({n: "norm" for n in norms if isinstance(getattr(block, n, None), nn.Module)
                    and not isinstance(getattr(block, n), RemovedNorm)})
    return out


def _stub(role: str, original: nn.Module) -> nn.Module:
    if role == "attention":
        return RemovedAttention(getattr(original, "layer_idx", None))
    if role == "mlp":
        return RemovedMLP()
    if role == "norm" or role == "fc_in":
        return RemovedNorm()
    if role == "fc_out":
        return ZeroLinear(original.out_features)
    raise ValueError(role)


def sublayer_swaps(adapter, i: int, kind: str) -> dict[str, nn.Module]:
    """Full module path → stub for removing ``kind`` ("attn" | "mlp" | "block") of block ``i``.

    Only the module objects are looked at (no weight is read), so this is safe on lazy models.
    """
    kinds = ("attn", "mlp") if kind == "block" else (kind,)
    block = adapter.block(i)
    prefix = adapter.block_name(i)
    swaps: dict[str, nn.Module] = {}
    for k in kinds:
        for local, role in sublayer_modules(adapter, i, k).items():
            swaps[f"{prefix}.{local}"] = _stub(role, block.get_submodule(local))
    return swaps


def remove_sublayer(adapter, i: int, kind: str) -> None:
    """Install the stubs of :func:`sublayer_swaps` in the model for good."""
    for path, stub in sublayer_swaps(adapter, i, kind).items():
        parent_path, _, name = path.rpartition(".")
        setattr(adapter.model.get_submodule(parent_path), name, stub)


def removed_kinds(adapter, i: int) -> list[str]:
    """Which sublayers of block ``i`` are stubs: a subset of ``["attention", "mlp"]``."""
    out = []
    block = adapter.block(i)
    if isinstance(block.get_submodule(adapter.layout.attention), RemovedAttention):
        out.append("attention")
    if adapter.has_mlp_module(i):
        if isinstance(adapter.mlp(i), RemovedMLP):
            out.append("mlp")
    elif isinstance(getattr(block, adapter.layout.inline_mlp_linears[1]), ZeroLinear):
        out.append("mlp")
    return out


def install_removed_sublayers(adapter, attention: list[int], mlp: list[int]) -> None:
    """Rebuild a saved removal: stubs for these blocks' attention / MLP sublayers (and norms)."""
    for i in attention:
        remove_sublayer(adapter, int(i), "attn")
    for i in mlp:
        remove_sublayer(adapter, int(i), "mlp")
