"""Save and load compressed checkpoints.

Saving is atomic: everything is written into a hidden temporary sibling of the output directory
and renamed into place only when complete, so an interrupted save never leaves a half-written
checkpoint where the output should be. An existing output is replaced only with ``force``, and
never when it is (or contains) the input model.

Loading first lets transformers build the model from ``config.json`` and the safetensors shards
(weights, buffers, tied embeddings), then re-installs every module replacement the manifest lists
and loads the state dict again, strictly, so every tensor is checked to be present and used.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from ..errors import CheckpointError
from ..models.weight_files import LOAD_ERRORS, check_safetensors_files, describe_load_error, refuse_missing_weights
from ..outputs import HOST, OutputGuard, check_replaceable, current_umask, remove_dead_process_dirs
from .manifest import MANIFEST_NAME, Manifest

# kind -> function(model, entry) that replaces modules so the saved tensors fit again.
_STRUCTURE_KINDS: dict[str, Callable[[nn.Module, dict], None]] = {}
# kind -> (order, function(model) -> the entry for the model as it is now, or None when the kind is absent)
_STRUCTURE_DESCRIBERS: dict[str, tuple[int, Callable[[nn.Module], dict | None]]] = {}


def register_structure_kind(kind: str, describe: Callable[[nn.Module], dict | None] | None = None, order: int = 0):
    """Register the loader of ``kind`` and the function that reads its entry off a model.

    ``order``: entries are listed, and so installed on load, in ascending order: 0 for kinds
    that replace whole sublayers (condensed MoE, removed sublayers), 1 for kinds that replace
    linears inside them (low rank).
    """
    def deco(fn):
        _STRUCTURE_KINDS[kind] = fn
        if describe is not None:
            _STRUCTURE_DESCRIBERS[kind] = (order, describe)
        return fn

    return deco


def describe_structure(model: nn.Module) -> list[dict]:
    """The manifest's ``structure`` for ``model`` as it is now, read off its modules.

    This is the one source of the record: whatever a chain of methods did (blocks deleted and
    renumbered, more sublayers removed, layers condensed after a factorisation), the entries name
    the modules by their current paths and block indices, so the checkpoint rebuilds exactly.
    """
    _import_structure_kinds()
    entries = []
    for kind, (_, describe) in sorted(_STRUCTURE_DESCRIBERS.items(), key=lambda item: (item[1][0], item[0])):
        entry = describe(model)
        if entry:
            entries.append(entry)
    return entries


def known_structure_kinds() -> set[str]:
    """Every structure kind this compresskit can rebuild on load."""
    _import_structure_kinds()
    return set(_STRUCTURE_KINDS)


def check_output_dir(out_dir: str | Path, force: bool, input_path: str | Path | None = None,
                     inputs: Iterable[str | Path | None] = ()) -> Path:
    """Fail early (before any work) if writing ``out_dir`` would lose something.

    The rules are ``compresskit.outputs.OutputGuard.directory``'s: never an input (``input_path``,
    ``inputs``: model, calibration file, ...), inside one or holding one; an existing directory
    only with ``force`` and only when it is empty or a compresskit checkpoint (by content) holding
    nothing but the checkpoint layout and compresskit's own results (``check_replaceable``); never the current
    directory or an ancestor of it; the parent must be writable.
    """
    return OutputGuard([input_path, *inputs]).directory(out_dir, force=force, flag="")


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Delete ``.NAME.tmp-HOST-PID-*`` / ``.NAME.old-HOST-PID`` siblings of ``out`` left by a killed save.

    Only entries of this host whose process is gone are removed: a live process's temporary
    directory (another save running now) is never touched, nor are other hosts' (shared disks).
    """
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(?:tmp|old)-{re.escape(HOST)}-(\d+)(?:-[^/]*)?$")
    return remove_dead_process_dirs(out.parent, pattern)


@contextmanager
def atomic_directory(out_dir: str | Path, force: bool = False):
    """Yield a temporary directory that becomes ``out_dir`` only if the block completes.

    The temporary sibling is ``.NAME.tmp-HOST-PID-XXXX`` (stale ones of dead processes are removed
    first) and gets the permissions of a normal ``mkdir`` (``0o777 & ~umask``, not mkdtemp's 0700).
    ``OSError`` while writing (disk full, permissions) becomes a one-line ``CheckpointError``.
    """
    out = Path(out_dir).expanduser().resolve()
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{HOST}-{os.getpid()}-", dir=out.parent))
        os.chmod(tmp, 0o777 & ~current_umask())
        yield tmp
        if out.exists():
            if not force:
                raise CheckpointError(f"output {out} already exists; pass --force to replace it")
            check_replaceable(out)  # again at the end: by content, and never with files the layout does not name
            trash = out.parent / f".{out.name}.old-{HOST}-{os.getpid()}"
            os.replace(out, trash)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except OSError as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        raise CheckpointError(f"cannot write checkpoint {out}: {exc.strerror or exc}{where}") from None
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_checkpoint(model, tokenizer, out_dir: str | Path, manifest: Manifest, force: bool = False,
                    max_shard_size: str = "2GB") -> Path:
    """Write safetensors shards, config, tokenizer and the manifest, atomically."""
    out = Path(out_dir).expanduser().resolve()
    from .writer import write_model

    with atomic_directory(out, force=force) as tmp:
        # Streamed block by block through onload (checkpoint/writer.py): the full state dict is never
        # in memory. With replaced modules, keep the model's own keys (e.g. fused MoE experts): load()
        # checks them strictly against the rebuilt model, which the per-expert "original format" would fail.
        write_model(model, tmp, max_shard_size=max_shard_size, original_format=not manifest.structure)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        manifest.write(tmp)
    return out


@contextmanager
def _quiet_transformers():
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} holds no .safetensors files")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except LOAD_ERRORS as exc:
            raise CheckpointError(f"cannot load checkpoint {path}: {f.name}: {describe_load_error(exc)}") from None
    return state


def load(path: str | Path, device: str = "cpu", dtype: str | torch.dtype | None = None):
    """Load any compresskit checkpoint (dense, low-rank, removed or condensed modules) exactly."""
    model, _ = load_with_tokenizer(path, device=device, dtype=dtype, with_tokenizer=False)
    return model


def load_with_tokenizer(path: str | Path, device: str = "cpu", dtype=None, with_tokenizer: bool = True):
    from transformers import AutoConfig, AutoTokenizer

    from ..models.loading import _auto_class

    path = Path(path).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a directory")
    manifest = Manifest.read(path) if (path / MANIFEST_NAME).exists() else None
    kwargs = {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    elif manifest is not None and manifest.dtype:
        kwargs["dtype"] = getattr(torch, manifest.dtype)
    check_safetensors_files(path, CheckpointError, "checkpoint")
    with _quiet_transformers():
        try:
            model, info = _auto_class(AutoConfig.from_pretrained(path)).from_pretrained(
                path, output_loading_info=True, **kwargs)
        except LOAD_ERRORS as exc:
            raise CheckpointError(f"cannot load {path}: {describe_load_error(exc)}") from None
    if manifest is not None and manifest.structure:
        for entry in manifest.structure:
            kind = entry.get("kind")
            if kind not in _STRUCTURE_KINDS:
                _import_structure_kinds()
            if kind not in _STRUCTURE_KINDS:
                raise CheckpointError(f"{path}: unknown structure kind '{kind}' (written by a newer compresskit?)")
            _STRUCTURE_KINDS[kind](model, entry)
        state = _read_state_dict(path)
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # shapes of the rebuilt modules (e.g. a rank map) differ from the tensors
            raise CheckpointError(
                f"{path}: the manifest's structure disagrees with the stored weights: {describe_load_error(exc)}"
            ) from None
        tied = set(getattr(model, "all_tied_weights_keys", None) or {})  # the config's ties, not the class's
        missing = [k for k in missing if k not in tied]
        if unexpected:
            raise CheckpointError(
                f"{path}: weights do not match the manifest's structure (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        refuse_missing_weights(missing, path, CheckpointError, "checkpoint", model.config)
        if hasattr(model, "tie_weights"):
            model.tie_weights()
    else:
        refuse_missing_weights(info["missing_keys"], path, CheckpointError, "checkpoint", model.config)
    model.config.use_cache = False
    model.eval().to(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path) if with_tokenizer else None
    except LOAD_ERRORS as exc:
        raise CheckpointError(f"cannot load the tokenizer of {path}: {describe_load_error(exc)}") from None
    return model, tokenizer


def _import_structure_kinds() -> None:
    """Modules that define structure kinds register them on import."""
    import importlib

    for module in ("compresskit.lowrank.structure", "compresskit.methods.structures", "compresskit.moe.structure",
                   "compresskit.depth.structure"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError:
            pass
