"""Safetensors shards written one tensor at a time: what ``checkpoint.writer`` streams a model into.

``ShardWriter.add(key, tensor)`` appends the tensor's bytes to the current shard's data files at
once, so host memory holds one tensor, never a shard; ``flush`` writes the shard (header, then the
data files, copied in the kernel) when it reaches its size; ``finish`` names the shards
``model-0000k-of-0000n.safetensors`` (or ``model.safetensors`` alone) and writes the index.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from pathlib import Path

import torch

from ..models.weight_files import safetensors_dtype_name

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


class ShardWriter:
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
                append_file(shard, data)
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


def append_file(target, source) -> None:
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
