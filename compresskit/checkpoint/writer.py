"""Streaming save: the weights are written shard by shard, block by block, never all in memory.

``write_model(model, directory)`` produces what ``model.save_pretrained(directory)`` produces —
``model.safetensors`` (one shard) or ``model-0000k-of-0000n.safetensors`` +
``model.safetensors.index.json``, the same key names (tied weights written once,
``_keys_to_ignore_on_save`` dropped, transformers 5's "original format" conversion of fused experts
back to per-expert keys when ``original_format``), ``{"format": "pt"}`` metadata, ``config.json``
and ``generation_config.json`` — but it visits the model one piece at a time: the tensors outside
the decoder blocks, then each block through ``models.placement.onload`` (on CPU), whose state dict
is converted and appended to the current shard; a shard is flushed to disk as soon as it reaches
``max_shard_size``. Host memory: one block — each tensor's bytes go to disk as it arrives (see
``_ShardWriter``), never a whole shard. Shard boundaries may differ from ``save_pretrained``'s (which plans them over the full state dict) — readers use the index.

Shards are written under temporary names and renamed to ``-of-0000n`` once their count is known;
the caller writes into ``checkpoint.io.atomic_directory``, so an interrupted save leaves nothing.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from pathlib import Path

import torch

from ..compat import parse_size, safetensors_dtype_name
from ..models.adapters import get_adapter
from ..models.placement import onload

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def _parse_size(size: int | str) -> int:
    return parse_size(size)


class _ShardWriter:
    """Appends each tensor's bytes to the current shard's data files as it arrives, so host memory
    holds one tensor, not a shard. A safetensors header precedes the data and is only known once the
    shard is complete: ``flush`` writes it, then appends the data files (``os.copy_file_range``: in
    the kernel, a reflink where the filesystem supports one). Tensors are grouped by element size,
    largest first, as ``safetensors.torch.save_file`` does, so every tensor stays aligned."""

    def __init__(self, directory: Path, max_bytes: int):
        self.directory, self.max_bytes = directory, max_bytes
        self.pending: dict[str, tuple[str, list[int], int, int]] = {}  # key -> (dtype, shape, element size, local offset)
        self.pending_bytes = 0
        self._data: dict[int, object] = {}  # element size -> open data file of the current shard
        self.files: list[list[str]] = []  # keys per written shard, in order
        self.total_bytes = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        width = tensor.element_size()
        data = self._data.get(width)
        if data is None:
            data = self._data[width] = open(self._data_path(len(self.files), width), "wb+")  # noqa: SIM115
        value = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self.pending[key] = (safetensors_dtype_name(tensor.dtype), list(tensor.shape), width, data.tell())
        data.write(value.numpy().data)
        del value
        self.pending_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        if not self.pending:
            return
        widths = sorted(self._data, reverse=True)
        base, start = {}, 0
        for width in widths:
            base[width] = start
            start += self._data[width].tell()
        header: dict = {"__metadata__": {"format": "pt"}}
        for key, (dtype, shape, width, offset) in self.pending.items():
            begin = base[width] + offset
            header[key] = {"dtype": dtype, "shape": shape,
                           "data_offsets": [begin, begin + math.prod(shape) * width]}
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        with open(self._part(len(self.files)), "wb") as shard:
            shard.write(struct.pack("<Q", len(text)) + text)
            shard.flush()
            for width in widths:
                data = self._data[width]
                data.flush()
                _append(shard, data)
                data.close()
                os.remove(self._data_path(len(self.files), width))
        self.files.append(list(self.pending))
        self.pending, self.pending_bytes, self._data = {}, 0, {}

    def _part(self, index: int) -> Path:
        return self.directory / f".part-{index:05d}.safetensors"

    def _data_path(self, index: int, width: int) -> Path:
        return self.directory / f".part-{index:05d}.data-{width}"

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


def _append(target, source) -> None:
    """Append all of the open file ``source`` to the open file ``target`` without going through Python."""
    size = source.seek(0, os.SEEK_END)
    source.seek(0)
    done = 0
    try:
        while done < size:
            n = os.copy_file_range(source.fileno(), target.fileno(), size - done)
            if n == 0:
                break
            done += n
    except (AttributeError, OSError):  # no copy_file_range (old kernel / Python, some filesystems)
        pass
    if done < size:
        source.seek(done)
        target.seek(0, os.SEEK_END)
        shutil.copyfileobj(source, target, 16 << 20)
    target.flush()


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
