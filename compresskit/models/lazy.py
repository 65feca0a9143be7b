"""Lazy loading: a model whose decoder blocks stay on disk until ``onload`` asks for them.

``load_lazily(directory)`` mirrors ``PreTrainedModel.from_pretrained`` step by step, with the
same transformers machinery, so the tensors are bit-identical to what ``from_pretrained`` gives:

1. the model class is built under transformers' own init context (meta device, checkpoint dtype,
   ``_keep_in_fp32_modules`` dtype plan), so the skeleton costs no memory;
2. every checkpoint key is renamed / routed to a converter with transformers' weight-conversion
   mapping (``get_model_conversion_mapping``: e.g. per-expert ``mlp.experts.3.gate_proj.weight``
   keys that transformers 5 fuses into ``mlp.experts.gate_up_proj``) and cast to the dtype
   ``convert_and_load_state_dict_in_model`` would choose;
3. tensors outside the decoder blocks (embeddings, final norm, LM head) are loaded once with
   ``convert_and_load_state_dict_in_model`` itself, non-persistent buffers are initialised and
   weights tied exactly as ``_finalize_model_loading`` does;
4. each block tensor stays on ``meta`` and carries a reference to its *recipe* (the safetensors
   keys + the conversion op, replayed on demand) — see ``models.lazy_store`` for how
   ``onload`` materialises, releases and spills them.

A plain forward of the model still works: every block materialises itself for its own call
(forward pre-hook) and releases afterwards, so the model behaves like a normal one, only slower.
Anything this cannot reproduce exactly (``.bin`` / GGUF weights, quantized or remote-code
models, shape mismatches) raises ``LazyUnsupported`` with the reason; the caller then loads in
memory and records why. A tensor the weight files lack is an error (``ModelLoadError`` from
``weight_files.refuse_missing_weights``, the check the in-memory loaders run too), never a random
initialisation.
"""

from __future__ import annotations

import json
import os
from copy import deepcopy
from pathlib import Path

import torch
from torch import nn

from ..compat import causal_lm_class, internal, method, problems
from ..errors import ModelLoadError
from .adapters import get_adapter
from .lazy_store import ATTR, LazyStore, OriginalSource, lazy_ref, store_of
from .loading import auto_class
from .placement import onload
from .weight_files import refuse_missing_weights, safetensors_dtype

LOADING_LAZY = "lazy"


class LazyUnsupported(Exception):
    """This model cannot be loaded lazily (the message says why); load it in memory instead."""


def _weight_files(directory: Path) -> dict[str, str]:
    """Checkpoint key -> safetensors file, from the index or the single ``model.safetensors``."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {key: str(directory / name) for key, name in weight_map.items()}
    single = directory / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as handle:
            return dict.fromkeys(handle.keys(), str(single))
    if any(directory.glob("*.bin")) or any(directory.glob("*.gguf")):
        raise LazyUnsupported("weights are not safetensors (.bin / GGUF): loaded in memory")
    raise LazyUnsupported("no model.safetensors or model.safetensors.index.json")


class _Files:
    """Open safetensors handles, one per shard, and the shape / dtype of every key."""

    def __init__(self, key_to_file: dict[str, str]):
        from safetensors import safe_open

        self.key_to_file = key_to_file
        # pread, not mmap: every read is private memory that is freed after use. A file mapping would
        # keep each block's pages resident in this process after it was read (RSS ≈ model size), and
        # writes into mmap-backed tensors would show through later reads of the same source.
        self.handles = {f: safe_open(f, framework="pt", backend="pread") for f in sorted(set(key_to_file.values()))}
        self.identity = {f: _file_identity(f) for f in self.handles}

    def check_unchanged(self) -> None:
        """Stop (one line) when a shard was replaced or rewritten since it was opened: the blocks read
        before and after would come from different weights. Run before every block read."""
        for f, identity in self.identity.items():
            if _file_identity(f) != identity:
                raise ModelLoadError(
                    f"the model's weight file {f} changed while it was being read (size, modification time or "
                    "inode differ from the start of the run); stopped so that no mix of old and new weights is "
                    "compressed or saved: run again once the file is complete")

    def slice(self, key: str):
        return self.handles[self.key_to_file[key]].get_slice(key)

    def meta(self, key: str) -> torch.Tensor:
        s = self.slice(key)
        return torch.empty(s.get_shape(), dtype=safetensors_dtype(s.get_dtype()), device="meta")


def _file_identity(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ino


def _model_class(config, trust_remote_code: bool):
    cls = causal_lm_class(config, auto_class(config))
    if cls is None:
        raise LazyUnsupported("remote-code model: loaded in memory")
    return cls


def _skeleton(directory: Path, dtype: torch.dtype | None, files: _Files):
    """The model on meta (as ``from_pretrained`` builds it), its dtype and its LoadStateDictConfig."""
    from transformers import AutoConfig

    get_dtype = internal("transformers.modeling_utils._get_dtype")
    LoadStateDictConfig = internal("transformers.modeling_utils.LoadStateDictConfig")
    ContextManagers = internal("transformers.utils.generic.ContextManagers")
    get_model_conversion_mapping = internal("transformers.conversion_mapping.get_model_conversion_mapping")
    config = AutoConfig.from_pretrained(directory)
    if getattr(config, "quantization_config", None) is not None:
        raise LazyUnsupported("quantized checkpoint: loaded in memory")
    cls = _model_class(config, False)
    checkpoint_files = sorted(files.handles)
    config, dtype = get_dtype(dtype or "auto", checkpoint_files, config, None, None, True, None)
    config.name_or_path = str(directory)
    config = deepcopy(config)
    with ContextManagers(method(cls, "transformers.PreTrainedModel.get_init_context")(dtype, False, False, False)):
        model = cls(config)
    load_config = LoadStateDictConfig(
        pretrained_model_name_or_path=str(directory), dtype=dtype, dtype_plan=method(model, "transformers.PreTrainedModel._get_dtype_plan")(dtype),
        weight_mapping=get_model_conversion_mapping(model, None, None),
    )
    return model, load_config


class _Plan:
    """Checkpoint keys grouped the way ``convert_and_load_state_dict_in_model`` groups them."""

    def __init__(self, model, load_config, files: _Files, identity: bool):
        WeightConverter = internal("transformers.core_model_loading.WeightConverter")
        WeightRenaming = internal("transformers.core_model_loading.WeightRenaming")
        build_glob_alternation = internal("transformers.core_model_loading.build_glob_alternation")
        dot_natural_key = internal("transformers.core_model_loading.dot_natural_key")
        rename_source_key = internal("transformers.core_model_loading.rename_source_key")

        self.files = files
        mapping_list = [] if identity else (load_config.weight_mapping or [])
        renamings = [m for m in mapping_list if isinstance(m, WeightRenaming)]
        converters = [m for m in mapping_list if isinstance(m, WeightConverter)]
        by_pattern = {k: c for c in converters for k in c.source_patterns}
        meta_sd = model.state_dict()
        prefix = model.base_model_prefix
        plan = load_config.dtype_plan or {}
        alt, by_group = build_glob_alternation(list(plan))[:2] if plan else (None, None)
        #: first target name -> (template transform, [(renamed, original, pattern, dtype)])
        self.groups: dict[str, tuple[object, list[tuple[str, str, str, torch.dtype]]]] = {}
        self.unexpected: list[str] = []
        for original in sorted(files.key_to_file, key=dot_natural_key):
            renamed, pattern = rename_source_key(original, renamings, converters, prefix, meta_sd)
            if renamed not in meta_sd and original in meta_sd:
                renamed, pattern = rename_source_key(original, [], [], base_model_prefix=prefix, meta_state_dict=meta_sd)
            if renamed not in meta_sd:
                self.unexpected.append(original)
                continue
            if pattern is not None:
                template, entries = self.groups.setdefault(renamed, (deepcopy(by_pattern[pattern]), []))
            else:
                template, entries = self.groups.setdefault(renamed, (WeightRenaming(original, renamed), []))
                pattern = original
            dtype = load_config.dtype
            found = alt.search(renamed) if alt is not None else None
            if found is not None:
                dtype = plan[by_group[found.lastgroup]]
            elif meta_sd[renamed].dtype != dtype:
                dtype = meta_sd[renamed].dtype
            entries.append((renamed, original, pattern, dtype))

    def convert(self, first: str, model, meta: bool = False) -> dict[str, torch.Tensor]:
        """Target name -> tensor (CPU, or meta shapes only) for the group ``first``."""
        LoadStateDictInfo = internal("transformers.utils.loading_report.LoadStateDictInfo")

        template, entries = self.groups[first]
        transform = deepcopy(template)
        for renamed, original, pattern, dtype in entries:
            if meta:
                job = (lambda o=original, d=dtype: self.files.meta(o).to(dtype=d))
            else:
                job = (lambda o=original, d=dtype: self.files.slice(o)[...].to(dtype=d))
            transform.add_tensor(renamed, original, pattern, job)
        info = LoadStateDictInfo(missing_keys=set(), unexpected_keys=set(), mismatched_keys=set(),
                                 conversion_errors={}, error_msgs=[], skipped_pp_keys=set())
        out = transform.convert(first, model=model, config=model.config, hf_quantizer=None, loading_info=info)
        if info.conversion_errors:
            raise LazyUnsupported(f"weight conversion failed for {first}: {next(iter(info.conversion_errors.values()))}")
        return {name: (value[0] if isinstance(value, list) else value) for name, value in out.items()}


def _finalise_non_block(model, load_config, loading_info, block_keys: set[str]) -> None:
    """``_finalize_model_loading`` without touching the (meta) block tensors."""
    method(model, "transformers.PreTrainedModel.mark_tied_weights_as_initialized")(loading_info)
    outside = {k for k in loading_info.missing_keys if k not in block_keys}
    method(model, "transformers.PreTrainedModel._move_missing_keys_from_meta_to_device")(outside, None, None, None)
    method(model, "transformers.PreTrainedModel._initialize_missing_keys")(False)
    model.tie_weights(missing_keys=loading_info.missing_keys, recompute_mapping=False)


def _require_transformers_loading_api() -> None:
    """The lazy path replays transformers 5's own loading steps (key renames, expert fusing, tied
    weights), which are not public API (compat.py lists them): a transformers without them loads in
    memory instead."""
    missing = problems("transformers")
    if missing:
        raise LazyUnsupported(missing[0])


def _install_block_hooks(blocks: nn.ModuleList) -> None:
    """A plain forward materialises each block for its own call and releases it afterwards."""
    def pre(block, args, kwargs):
        if store_of(block) is None:
            return None
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        device = tensors[0].device if tensors else torch.device("cpu")
        context = onload(block, device)
        context.__enter__()
        block.__dict__.setdefault("_compresskit_forward_contexts", []).append(context)
        return None

    def post(block, args, kwargs, output):
        stack = block.__dict__.get("_compresskit_forward_contexts")
        if stack:
            stack.pop().__exit__(None, None, None)
        return None

    for block in blocks:
        block.register_forward_pre_hook(pre, with_kwargs=True)
        block.register_forward_hook(post, with_kwargs=True)


def load_lazily(directory: str | Path, dtype: torch.dtype | None = None, structure: list[dict] | None = None,
                install_structure=None, spill_root: str | Path | None = None):
    """The model of ``directory`` with its decoder blocks left on disk (see the module docstring).

    ``structure`` / ``install_structure``: a compresskit checkpoint's module replacements, installed
    on the skeleton before the keys are matched (its tensors are stored under the model's own names).
    ``spill_root``: where changed blocks are spilled (``models.lazy_store``; default: the cache dir).
    """
    _require_transformers_loading_api()
    from transformers.core_model_loading import convert_and_load_state_dict_in_model

    directory = Path(directory)
    files = _Files(_weight_files(directory))
    model, load_config = _skeleton(directory, dtype, files)
    if structure:
        for entry in structure:
            install_structure(model, entry)
    adapter = get_adapter(model)
    blocks_prefix = adapter.blocks_path + "."
    plan = _Plan(model, load_config, files, identity=bool(structure))
    if plan.unexpected:
        raise LazyUnsupported(f"checkpoint keys the model does not have (e.g. {plan.unexpected[0]})")

    outside_keys = [o for first, (_, entries) in plan.groups.items() if not first.startswith(blocks_prefix)
                    for (_, o, _, _) in entries]
    recipes = [first for first in plan.groups if first.startswith(blocks_prefix)]
    meta_sd = model.state_dict(keep_vars=True)
    block_keys = {k for k in meta_sd if k.startswith(blocks_prefix)}
    non_persistent = {k for k, _ in model.named_non_persistent_buffers()} if hasattr(model, "named_non_persistent_buffers") else set()

    store = LazyStore(lambda i: plan.convert(recipes[i], model), spill_root, check_sources=files.check_unchanged)
    covered: set[str] = set()
    for i, first in enumerate(recipes):
        for target, value in plan.convert(first, model, meta=True).items():
            tensor = meta_sd.get(target)
            if tensor is None or tuple(tensor.shape) != tuple(value.shape):
                raise LazyUnsupported(f"{target}: checkpoint shape {tuple(value.shape)} does not fit the model")
            setattr(tensor, ATTR, store.ref(OriginalSource(i, target)))
            covered.add(target)
    refuse_missing_weights(block_keys - covered - non_persistent, directory, ModelLoadError, "model", model.config)

    state = {k: files.slice(k) for k in outside_keys}
    if structure:  # a checkpoint with replaced modules stores the model's own keys
        import dataclasses

        load_config = dataclasses.replace(load_config, weight_mapping=[])
    loading_info, _ = convert_and_load_state_dict_in_model(model, state, load_config)
    if loading_info.mismatched_keys or loading_info.unexpected_keys:
        raise LazyUnsupported(f"non-block tensors do not fit the model ({sorted(loading_info.mismatched_keys or loading_info.unexpected_keys)[:1]})")
    _finalise_non_block(model, load_config, loading_info, block_keys)
    refuse_missing_weights(loading_info.missing_keys - block_keys, directory, ModelLoadError, "model", model.config)
    not_lazy = [k for k, t in model.state_dict(keep_vars=True).items() if t.is_meta and lazy_ref(t) is None]
    if not_lazy:
        raise LazyUnsupported(f"{not_lazy[0]} could not be placed: loaded in memory")
    model.eval()
    if model.can_generate():
        try:
            from transformers import GenerationConfig

            model.generation_config = GenerationConfig.from_pretrained(directory)
        except OSError:
            pass
    _install_block_hooks(adapter.blocks)
    model._compresskit_lazy_store = store  # keeps the store (and its spill directory) alive with the model
    return model


def is_lazy(model: nn.Module) -> bool:
    return getattr(model, "_compresskit_lazy_store", None) is not None
