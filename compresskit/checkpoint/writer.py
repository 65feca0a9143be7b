"""Writing a checkpoint: the output guard, the atomic directory, and the streaming save.

``save_checkpoint(model, tokenizer, out, manifest)`` writes safetensors shards, config, tokenizer
and ``compresskit.json`` into a hidden temporary sibling of ``out`` (``atomic_directory``) and
renames it into place only when complete, so an interrupted save never leaves a half-written
checkpoint where the output should be. An existing output is replaced only with ``force``, and
never when it is (or contains) the input model (``check_output_dir``, run before any compute).
Reading a checkpoint is ``checkpoint.reader``.

The weights are written shard by shard, block by block, never all in memory:

``write_model(model, directory)`` produces what ``model.save_pretrained(directory)`` produces —
``model.safetensors`` (one shard) or ``model-0000k-of-0000n.safetensors`` +
``model.safetensors.index.json``, the same key names (tied weights written once,
``_keys_to_ignore_on_save`` dropped, transformers 5's "original format" conversion of fused experts
back to per-expert keys when ``original_format``), ``{"format": "pt"}`` metadata, ``config.json``
and ``generation_config.json`` — but it visits the model one piece at a time: the tensors outside
the decoder blocks, then each block through ``models.placement.onload`` (on CPU), whose state dict
is converted and appended to the current shard; a shard is flushed to disk as soon as it reaches
``max_shard_size``. Host memory: one block — each tensor's bytes go to disk as it arrives (see
``checkpoint.shards.ShardWriter``), never a whole shard. Shard boundaries may differ from ``save_pretrained``'s (which plans them over the full state dict) — readers use the index.

Shards are written under temporary names and renamed to ``-of-0000n`` once their count is known;
``save_checkpoint`` writes into ``atomic_directory``, so an interrupted save leaves nothing.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

import torch

from ..compat import parse_size
from ..errors import CheckpointError
from ..models.adapters import get_adapter
from ..models.placement import onload
from ..outputs import HOST, OutputGuard, check_replaceable, current_umask, remove_dead_process_dirs
from .manifest import Manifest
from .shards import ShardWriter

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
    writer = ShardWriter(directory, parse_size(max_shard_size))

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


# ----------------------------------------------------------------------------- the checkpoint directory
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
def atomic_directory(out_dir: str | Path, force: bool = False, replaceable=None, what: str = "checkpoint"):
    """Yield a temporary directory that becomes ``out_dir`` only if the block completes.

    The temporary sibling is ``.NAME.tmp-HOST-PID-XXXX`` (stale ones of dead processes are removed
    first) and gets the permissions of a normal ``mkdir`` (``0o777 & ~umask``, not mkdtemp's 0700).
    ``OSError`` while writing (disk full, permissions) becomes a one-line ``CheckpointError``.
    An existing ``out_dir`` is replaced only with ``force`` and after ``replaceable(out)`` (default
    ``check_replaceable``: a compresskit checkpoint by content) passes again at the end; ``what``
    names the directory in errors (e.g. "adapter directory").
    """
    replaceable = replaceable or check_replaceable
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
            replaceable(out)  # again at the end: by content, and never with files the layout does not name
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
        raise CheckpointError(f"cannot write {what} {out}: {exc.strerror or exc}{where}") from None
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_checkpoint(model, tokenizer, out_dir: str | Path, manifest: Manifest, force: bool = False,
                    max_shard_size: str = "2GB") -> Path:
    """Write safetensors shards, config, tokenizer and the manifest, atomically."""
    out = Path(out_dir).expanduser().resolve()
    try:
        with atomic_directory(out, force=force) as tmp:
            # Streamed block by block through onload: the full state dict is never in memory. With
            # replaced modules, keep the model's own keys (e.g. fused MoE experts): the reader checks them
            # strictly against the rebuilt model, which the per-expert "original format" would fail.
            write_model(model, tmp, max_shard_size=max_shard_size, original_format=not manifest.structure)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            manifest.write(tmp)
    except BaseException:
        # nothing of a failed save stays beside the output, spills of a lazily loaded model included
        store = getattr(model, "_compresskit_lazy_store", None)
        if store is not None:
            store.discard_spills()
        raise
    return out
