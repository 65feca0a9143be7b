"""Whole-block removal that stays a stock transformers checkpoint, and the config record of
single-sublayer removals.

Deleting blocks (methods.md §8.5): the kept blocks are renumbered (every ``layer_idx`` inside
them: attention modules, decoder layers, removed-attention stubs), ``num_hidden_layers`` is
lowered, and every per-layer field of the config is rewritten for the new numbering and written
explicitly, because derived defaults shift when layers move:

* any list of length L whose name mentions layers (``layer_types``, ``mlp_layer_types``, ...) is
  sliced; ``layer_types`` is therefore explicit (Qwen3's ``max_window_layers`` and Gemma-3's
  sliding pattern would otherwise be re-derived for the new positions);
* ``mlp_only_layers`` / ``decoder_sparse_step`` (Qwen-MoE) become an explicit list of the dense
  blocks with step 1; ``first_k_dense_replace`` (DeepSeek) counts the kept dense prefix;
  ``max_window_layers`` counts the kept blocks below it.

:func:`check_config_rebuilds` then builds the model class from the new config on the meta device
and compares every kept module's parameter shapes and plain attributes (sliding window, layer
index, MoE or dense) with the pruned model, so a family whose layout the config cannot express
fails with one line instead of writing a checkpoint that loads differently.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import UnsupportedArchitectureError
from ..models import get_adapter
from .removal import STUB_TYPES, removed_kinds

_NOT_PER_LAYER = {"architectures"}


def text_config(model: nn.Module):
    return model.config.get_text_config()


_ALL_MOE_FAMILIES = ("mixtral",)


def _originally_dense(adapter, i: int) -> bool:
    """For a block whose MLP is a stub: was it dense by the config's rules?"""
    cfg = text_config(adapter.model)
    if getattr(cfg, "first_k_dense_replace", None) is not None:
        return i < cfg.first_k_dense_replace
    if hasattr(cfg, "mlp_only_layers"):
        step = getattr(cfg, "decoder_sparse_step", 1) or 1
        return i in (cfg.mlp_only_layers or []) or (i + 1) % step != 0
    return adapter.text_family not in _ALL_MOE_FAMILIES


def rewrite_config_for_kept_blocks(cfg, keep: list[int], dense: list[bool]) -> None:
    """Rewrite ``cfg`` (the text config) in place for blocks ``keep`` (old indices, in order).

    ``dense[j]``: whether new block j has a dense MLP (used by the MoE families' fields).
    """
    old_n = cfg.num_hidden_layers
    for key, value in list(vars(cfg).items()):
        if key in _NOT_PER_LAYER or key.startswith("_"):
            continue
        if isinstance(value, (list, tuple)) and len(value) == old_n and "layer" in key and key != "mlp_only_layers":
            setattr(cfg, key, type(value)(value[i] for i in keep))
    if hasattr(cfg, "mlp_only_layers"):
        cfg.mlp_only_layers = [j for j, d in enumerate(dense) if d]
        if hasattr(cfg, "decoder_sparse_step"):
            cfg.decoder_sparse_step = 1
    if getattr(cfg, "first_k_dense_replace", None) is not None:
        k = sum(1 for i in keep if i < cfg.first_k_dense_replace)
        if dense != [j < k for j in range(len(keep))]:
            raise UnsupportedArchitectureError("kept dense blocks of this DeepSeek model are not a prefix; cannot renumber")
        cfg.first_k_dense_replace = k
    if isinstance(getattr(cfg, "max_window_layers", None), int):
        cfg.max_window_layers = sum(1 for i in keep if i < cfg.max_window_layers)
    cfg.num_hidden_layers = len(keep)


def _renumber(block: nn.Module, new_index: int) -> None:
    for module in block.modules():
        if isinstance(getattr(module, "layer_idx", None), int):
            module.layer_idx = new_index


def delete_blocks(adapter, drop: set[int]) -> list[int]:
    """Delete blocks ``drop`` from the model; returns the kept old indices (new index = position).

    Only module objects and the config change: no weight is read or moved.
    """
    n = adapter.num_blocks
    keep = [i for i in range(n) if i not in drop]
    if not keep:
        raise UnsupportedArchitectureError("cannot remove every block of the model")
    cfg = text_config(adapter.model)
    dense = [_block_is_dense(adapter, i) for i in keep]
    skips = _current_skips(adapter)
    kept_blocks = [adapter.block(i) for i in keep]
    rewrite_config_for_kept_blocks(cfg, keep, dense)
    for j, block in enumerate(kept_blocks):
        _renumber(block, j)
    parent = adapter.decoder
    parent.layers = nn.ModuleList(kept_blocks)
    record_per_layer_config(adapter, {keep.index(i): s for i, s in skips.items() if i in keep})
    return keep


def _block_is_dense(adapter, i: int) -> bool:
    if "mlp" in removed_kinds(adapter, i):
        return _originally_dense(adapter, i)
    return not adapter.is_moe(i)


def _current_skips(adapter) -> dict[int, list[str]]:
    return {i: kinds for i in range(adapter.num_blocks) if (kinds := removed_kinds(adapter, i))}


def record_per_layer_config(adapter, skips: dict[int, list[str]] | None = None) -> dict[str, dict]:
    """Write transformers' ``per_layer_config`` (``{"<i>": {"skip": ["attention"]}}``) for the
    blocks whose sublayers are stubs; clears it when there are none. Returns the mapping."""
    cfg = text_config(adapter.model)
    if skips is None:
        skips = _current_skips(adapter)
    mapping = {str(i): {"skip": sorted(kinds)} for i, kinds in sorted(skips.items()) if kinds}
    cfg.per_layer_config = mapping or None
    return mapping


def _plain_attributes(module: nn.Module) -> dict:
    return {k: v for k, v in vars(module).items()
            if not k.startswith("_") and k != "training" and isinstance(v, (int, float, str, bool, type(None)))}


def check_config_rebuilds(model: nn.Module, adapter) -> None:
    """Build ``type(model)`` from its (rewritten) config on the meta device and compare the blocks.

    Raises ``UnsupportedArchitectureError`` naming the first difference. Modules replaced by
    removal stubs are skipped (``compresskit.load`` re-installs those).
    """
    config = copy.deepcopy(model.config)
    config.per_layer_config = None  # the stock classes build every sublayer anyway
    with torch.device("meta"):
        fresh = type(model)(config)

    fresh_adapter = get_adapter(fresh)
    if fresh_adapter.num_blocks != adapter.num_blocks:
        raise UnsupportedArchitectureError(
            f"{adapter.family}: the rewritten config builds {fresh_adapter.num_blocks} blocks, not {adapter.num_blocks}")
    for i in range(adapter.num_blocks):
        ours = dict(adapter.block(i).named_modules())
        theirs = dict(fresh_adapter.block(i).named_modules())
        stubbed = tuple(f"{n}." for n, m in ours.items() if isinstance(m, STUB_TYPES))
        for name, module in ours.items():
            if isinstance(module, STUB_TYPES) or name.startswith(stubbed):
                continue
            other = theirs.get(name)
            problem = None
            if other is None or type(other) is not type(module):
                problem = f"module {name or '<block>'} is {type(module).__name__}, the config builds {type(other).__name__}"
            else:
                shapes = {k: tuple(p.shape) for k, p in module.named_parameters(recurse=False)}
                other_shapes = {k: tuple(p.shape) for k, p in other.named_parameters(recurse=False)}
                a, b = _plain_attributes(module), _plain_attributes(other)
                diff = [k for k in set(a) | set(b) if a.get(k) != b.get(k)]
                if shapes != other_shapes:
                    problem = f"{name} parameter shapes {shapes} vs {other_shapes}"
                elif diff:
                    problem = f"{name}.{diff[0]} is {a.get(diff[0])!r}, the config gives {b.get(diff[0])!r}"
            if problem:
                raise UnsupportedArchitectureError(
                    f"{adapter.family}: removing blocks cannot be written as a stock config (block {i}: {problem})")
