"""Streaming save: the weights are written shard by shard, block by block, never all in memory.

``write_model(model, directory)`` produces what ``model.save_pretrained(directory)`` produces —
``model.safetensors`` (one shard) or ``model-0000k-of-0000n.safetensors`` +
``model.safetensors.index.json``, the same key names (tied weights written once,
``_keys_to_ignore_on_save`` dropped, transformers 5's "original format" conversion of fused experts
back to per-expert keys when ``original_format``), ``{"format": "pt"}`` metadata, ``config.json``
and ``generation_config.json`` — but it visits the model one piece at a time: the tensors outside
the decoder blocks, then each block through ``models.placement.onload`` (on CPU), whose state dict
is converted and appended to the current shard; a shard is flushed to disk as soon as it reaches
``max_shard_size``. Host memory: one shard + one block. Shard boundaries may differ from
``save_pretrained``'s (which plans them over the full state dict) — readers use the index.

Shards are written under temporary names and renamed to ``-of-0000n`` once their count is known;
the caller writes into ``checkpoint.io.atomic_directory``, so an interrupted save leaves nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..models.adapters import get_adapter
from ..models.placement import onload

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def _parse_size(size: int | str) -> int:
    from huggingface_hub.serialization._base import parse_size_to_int

    return size if isinstance(size, int) else parse_size_to_int(size)


class _ShardWriter:
    def __init__(self, directory: Path, max_bytes: int):
        self.directory, self.max_bytes = directory, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[list[str]] = []  # keys per written shard, in order
        self.total_bytes = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending[key] = tensor
        self.pending_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        if not self.pending:
            return
        from safetensors.torch import save_file

        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.pending.items()}
        save_file(tensors, str(self._part(len(self.files))), metadata={"format": "pt"})
        self.files.append(list(tensors))
        self.pending, self.pending_bytes = {}, 0

    def _part(self, index: int) -> Path:
        return self.directory / f".part-{index:05d}.safetensors"

    def finish(self, total_parameters: int) -> None:
        self.flush()
        n = len(self.files)
        if n <= 1:
            if n == 1:
                os.replace(self._part(0), self.directory / WEIGHTS_NAME)
            return
        weight_map = {}
        for i, keys in enumerate(self.files):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self._part(i), self.directory / name)
            weight_map.update(dict.fromkeys(keys, name))
        index = {"metadata": {"total_parameters": total_parameters, "total_size": self.total_bytes},
                 "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _saved_keys(model) -> set[str]:
    """The state-dict keys ``save_pretrained`` keeps: one name per tied tensor, ignore-on-save dropped."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = model.state_dict()
    for key in getattr(model, "_keys_to_ignore_on_save", None) or []:
        state.pop(key, None)
    return set(remove_tied_weights_from_state_dict(state, model))


def _write_config(model, directory: Path) -> None:
    """config.json (+ generation_config.json) exactly as ``save_pretrained`` writes them."""
    model.config.dtype = str(model.dtype).split(".")[1]
    model.config.architectures = [type(model).__name__.removeprefix("FSDP")]
    if model.is_remote_code():
        from transformers.dynamic_module_utils import custom_object_save

        custom_object_save(model, directory, config=model.config)
    model.config.save_pretrained(directory)
    if model.can_generate():
        model.generation_config.save_pretrained(directory)


@torch.no_grad()
def write_model(model, directory: str | Path, max_shard_size: int | str = "2GB", original_format: bool = True) -> None:
    """Write ``model``'s config and weights into ``directory`` as ``save_pretrained`` would, streaming."""
    from transformers.core_model_loading import revert_weight_conversion

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _write_config(model, directory)
    keep = _saved_keys(model)
    adapter = get_adapter(model)
    blocks_prefix = adapter.blocks_path + "."
    writer = _ShardWriter(directory, _parse_size(max_shard_size))

    def emit(state: dict[str, torch.Tensor]) -> None:
        state = {k: v for k, v in state.items() if k in keep}
        if original_format:
            state = revert_weight_conversion(model, state)
        for key, value in state.items():
            writer.add(key, value)

    emit({k: v for k, v in model.state_dict().items() if not k.startswith(blocks_prefix)})
    for i in range(adapter.num_blocks):
        with onload(adapter.block(i), "cpu") as block:
            name = adapter.block_name(i)
            # No copy needed: releasing the block only drops the module's references to these tensors.
            emit({f"{name}.{k}": v for k, v in block.state_dict().items()})
    writer.finish(model.num_parameters())
