"""EvoPress's level database: every targeted matrix pruned at every level, on disk, reused by key.

Layout (``~/.cache/compresskit/evopress/<key digest>/``, ``COMPRESSKIT_CACHE_DIR`` moves it):

* ``<block>/<matrix>.safetensors`` — score pruners (magnitude, Wanda) keep one ``uint8`` code per
  weight: the number of levels at which the weight survives, so level index ``j`` (0 = the lowest
  level) prunes exactly the weights with ``code <= j``. Their masks are nested (the k smallest
  scores of a comparison group contain the k−1 smallest), so one byte per weight holds every
  level and the weights themselves stay in the model (``weight_at``).
* ``<block>/<matrix>@<j>.safetensors`` — SparseGPT changes the surviving weights too, so every
  level's weights are stored, sparse (the non-zero values in the model dtype and one bit per
  weight: (1−s)·bytes + 1/8 bytes per weight), one file per matrix and level: building and
  reading hold one matrix, never a block's levels at once. The values may be kept in bfloat16 for
  a float32 model (``key["values_dtype"]``, EvoPress's ``--database-dtype``): half the disk, and
  bfloat16 has float32's exponent range, so no surviving weight rounds to zero and the counts
  stay exact.
* ``database.json`` — written last: the key it was built for and, per matrix, its level range and
  the zeros of every level actually stored. A folder without it is an interrupted build; its files
  are written atomically (temporary + rename), so a rebuild keeps the ones already there.

Exact counts. Level ℓ of a matrix must prune exactly ``base + ℓ·Δ`` weights (``levels.LevelPlan``)
for the budget to be exact under a level switch. Magnitude prunes the smallest scores of the whole
matrix. Wanda's comparison group is a row: the count is spread over rows as evenly as integers
allow (``⌊z/rows⌋`` each, one more for the first ``z mod rows`` rows), which is Wanda's own mask
whenever ``z`` is a multiple of the rows. SparseGPT prunes ``int(cols_block·rows·z/numel)`` per
column block; the few weights it falls short of ``z`` are then zeroed by smallest |w| among the
survivors (``top_up``), and a surplus (dead input columns, which SparseGPT zeroes) is recorded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from ..paths import cache_dir

FORMAT_VERSION = 2
META_FILE = "database.json"
SCORE_PRUNERS = ("magnitude", "wanda")


def database_root() -> Path:
    return cache_dir() / "evopress"


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]


# ---------------------------------------------------------------------------------------------- maths
def row_counts(zeros: int, rows: int) -> torch.Tensor:
    """``zeros`` spread over ``rows`` rows: ``⌊z/rows⌋`` each, +1 for the first ``z mod rows``."""
    counts = torch.full((rows,), zeros // rows, dtype=torch.int64)
    counts[: zeros % rows] += 1
    return counts


@torch.no_grad()
def level_codes(scores: torch.Tensor, zeros: Sequence[int], per_row: bool) -> torch.Tensor:
    """``uint8`` code per weight: the number of levels at which it survives.

    ``zeros`` ascending (zeros of every level, lowest first). Within the comparison group (the whole
    matrix, or each row when ``per_row``) weights are ranked by ascending score, ties by position
    (a stable sort, as ``pruning.masks``); level ``j`` prunes the ``zeros[j]`` lowest ranks (per row:
    ``row_counts(zeros[j], rows)``), so the weight survives levels ``0 .. code-1`` and is pruned
    from level ``code`` on.
    """
    if len(zeros) > 255:
        raise ValueError("at most 255 levels fit a uint8 code")
    scores = scores.float()
    rows, cols = scores.shape
    code = torch.zeros(scores.shape, dtype=torch.uint8, device=scores.device)
    if per_row:
        order = torch.sort(scores, dim=1, stable=True).indices
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(cols, device=scores.device).expand(rows, cols).contiguous())
        for z in zeros:
            code += (rank >= row_counts(int(z), rows).to(scores.device).unsqueeze(1)).to(torch.uint8)
    else:
        flat = scores.reshape(-1)
        order = torch.sort(flat, stable=True).indices
        rank = torch.empty_like(order)
        rank[order] = torch.arange(flat.numel(), device=scores.device)
        rank = rank.reshape(rows, cols)
        for z in zeros:
            code += (rank >= int(z)).to(torch.uint8)
    return code


def weight_at(dense: torch.Tensor, code: torch.Tensor, index: int) -> torch.Tensor:
    """The dense weight pruned at level index ``index`` (a new tensor; ``dense`` is untouched)."""
    return dense.masked_fill(code.to(dense.device) <= index, 0)


@torch.no_grad()
def top_up(weight: torch.Tensor, pruned: torch.Tensor, zeros: int) -> int:
    """Zero the smallest-|w| survivors until ``pruned`` holds ``zeros`` entries; the count reached."""
    have = int(pruned.sum())
    missing = zeros - have
    if missing <= 0:
        return have
    score = weight.detach().abs().float().masked_fill(pruned, float("inf")).reshape(-1)
    idx = torch.topk(score, missing, largest=False, sorted=False).indices
    weight.view(-1)[idx] = 0
    pruned.view(-1)[idx] = True
    return zeros


_BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_bits(flags: torch.Tensor) -> torch.Tensor:
    """A 1-D bool tensor as uint8 bytes, 8 flags each, most significant bit first (numpy's packbits)."""
    flags = flags.reshape(-1).to("cpu")
    padded = torch.zeros(-(-flags.numel() // 8) * 8, dtype=torch.uint8)
    padded[: flags.numel()] = flags.to(torch.uint8)
    return (padded.view(-1, 8) * _BITS).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """The inverse of :func:`pack_bits`: ``count`` bools."""
    bits = _BITS.to(packed.device)
    return ((packed.unsqueeze(1) & bits) != 0).reshape(-1)[:count]


# ------------------------------------------------------------------------------------------ storage
def _save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _read(path: Path, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device=str(device)) as f:
        return f.get_tensor(name)


class LevelDatabase:
    """One database folder: ``key`` says what built it; ``kind`` is ``codes`` or ``weights``."""

    def __init__(self, key: dict, root: Path | None = None):
        self.key = dict(key)
        self.digest = key_digest(self.key)
        self.root = Path(root) if root is not None else database_root()
        self.path = self.root / self.digest
        self.kind = "codes" if self.key.get("pruner") in SCORE_PRUNERS else "weights"
        #: the dtype of stored weight values (``key["values_dtype"]``; None: the model's)
        self.values_dtype = getattr(torch, self.key["values_dtype"]) if self.key.get("values_dtype") else None
        self.meta: dict[str, Any] | None = None

    # -------------------------------------------------------------- state
    def load_meta(self) -> dict | None:
        """The finished database's record, or None (missing, interrupted, or built for another key)."""
        path = self.path / META_FILE
        if not path.is_file():
            return None
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if meta.get("version") != FORMAT_VERSION or meta.get("key") != json.loads(json.dumps(self.key, default=str)):
            return None
        self.meta = meta
        return meta

    @property
    def complete(self) -> bool:
        return self.meta is not None or self.load_meta() is not None

    def delete(self) -> bool:
        """Remove this database's folder (only files this module writes live there); True if it existed."""
        if not self.path.exists():
            return False
        shutil.rmtree(self.path)
        return True

    def finish(self, units: list[dict], seconds: float) -> dict:
        meta = {"version": FORMAT_VERSION, "key": json.loads(json.dumps(self.key, default=str)), "kind": self.kind,
                "units": units, "bytes": self.disk_bytes(), "build_s": round(seconds, 3)}
        self.path.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=".database.", suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump(meta, fh, indent=1)
        os.replace(tmp, self.path / META_FILE)
        self.meta = meta
        return meta

    def disk_bytes(self) -> int:
        if not self.path.exists():
            return 0
        return sum(p.stat().st_size for p in self.path.rglob("*.safetensors"))

    # -------------------------------------------------------------- files
    def _file(self, block: str, local: str, index: int | None = None) -> Path:
        name = local if index is None else f"{local}@{index:03d}"
        return self.path / block / f"{name}.safetensors"

    def has_unit(self, block: str, local: str, count: int) -> bool:
        if self.kind == "codes":
            return self._file(block, local).is_file()
        return all(self._file(block, local, j).is_file() for j in range(count))

    def write_codes(self, block: str, local: str, code: torch.Tensor, zeros: Sequence[int]) -> None:
        _save_atomic({"code": code}, self._file(block, local), {"zeros": json.dumps(list(map(int, zeros)))})

    def write_level(self, block: str, local: str, index: int, weight: torch.Tensor, zeros: int) -> None:
        """One level's weights, stored sparse: the non-zero values (``values_dtype``, else the model's)
        and a bit per weight."""
        nonzero = weight.detach().reshape(-1) != 0
        values = weight.detach().reshape(-1)[nonzero]
        if self.values_dtype is not None:
            values = values.to(self.values_dtype)
        _save_atomic({"values": values, "bits": pack_bits(nonzero)},
                     self._file(block, local, index),
                     {"zeros": str(int(zeros)), "shape": json.dumps(list(weight.shape))})

    def stored_zeros(self, block: str, local: str, count: int) -> list[int]:
        """The zeros of every stored level of a matrix (from the files' metadata)."""
        from safetensors import safe_open

        if self.kind == "codes":
            with safe_open(str(self._file(block, local)), framework="pt") as f:
                return [int(z) for z in json.loads(f.metadata()["zeros"])]
        out = []
        for j in range(count):
            with safe_open(str(self._file(block, local, j)), framework="pt") as f:
                out.append(int(f.metadata()["zeros"]))
        return out

    def weight(self, block: str, local: str, index: int, dense: torch.Tensor) -> torch.Tensor:
        """The matrix at level index ``index``, on ``dense``'s device and dtype (``dense``: the
        model's unpruned weight, read by score pruners only)."""
        if self.kind == "codes":
            code = _read(self._file(block, local), "code", dense.device)
            return weight_at(dense, code, index)
        path = self._file(block, local, index)
        values = _read(path, "values", dense.device).to(dense.dtype)
        keep = unpack_bits(_read(path, "bits", dense.device), dense.numel())
        return torch.zeros(dense.numel(), dtype=dense.dtype, device=dense.device).masked_scatter_(keep, values).view(dense.shape)
