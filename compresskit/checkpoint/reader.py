"""How a model gets in: the one loader, for every source and both ways of loading.

``open_model(name)`` resolves ``name`` once (``models.source``: built-in name, Hub id + revision,
local directory; a local directory with a manifest is a compresskit checkpoint), then builds the
model:

* **lazily** (``lazy=True``, what ``prune`` and ``analyze`` use): the decoder blocks stay on disk
  until ``onload`` reads them (``models.lazy``); a checkpoint's module replacements are installed
  on the meta skeleton first. Whatever cannot be loaded lazily (``.bin`` / GGUF weights, quantized
  or remote-code models, a structure kind that needs real tensors) is loaded in memory instead,
  and ``LoadedModel.loading`` says why;
* **in memory**: ``from_pretrained`` for a plain model (``models.loading``); for a compresskit
  checkpoint, transformers builds the model from ``config.json`` and the shards, every module
  replacement the manifest lists is re-installed and the state dict is loaded again, strictly, so
  every tensor is checked to be present and used.

It returns a :class:`LoadedModel`: model (eval mode, ``use_cache`` off, ``_compresskit_loading``
set), tokenizer, adapter and how it was loaded. ``load`` / ``load_with_tokenizer`` read a
checkpoint directory in memory (what ``eval`` scores is what was saved). Writing a checkpoint is
``checkpoint.writer``.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..models.adapters import get_adapter
from ..models.lazy import LOADING_LAZY, LazyUnsupported, load_lazily
from ..models.loading import auto_class, load_pretrained, load_tokenizer, resolve_dtype
from ..models.placement import move_model
from ..models.source import Source, resolve_source
from ..models.weight_files import LOAD_ERRORS, check_safetensors_files, describe_load_error, refuse_missing_weights
from .manifest import MANIFEST_NAME, Manifest
from .structure import UnknownStructureKind, install_structure


@dataclass
class LoadedModel:
    """What ``open_model`` returns. ``loading``: ``"lazy"`` or ``"in-memory: <why>"`` (the manifest's
    ``hyperparameters.loading``); ``manifest``: the input checkpoint's, None for a plain model."""

    model: Any
    tokenizer: Any
    source: Source | None  # None: a model object was passed in
    loading: str
    manifest: Manifest | None = None

    @cached_property
    def adapter(self):
        """The model's ``ModelAdapter`` (its blocks, sublayers, experts), found on first use."""
        return get_adapter(self.model)

    @property
    def provenance(self) -> str:
        """What a manifest's ``base_model`` records for this input: a built-in name or Hub id as typed,
        a local directory as its absolute path (so ``eval --baseline`` works from any directory), a
        model object by its ``name_or_path``; an input checkpoint's own ``base_model``."""
        if self.manifest is not None and self.manifest.base_model:
            return self.manifest.base_model
        if self.source is None:
            name = getattr(getattr(self.model, "config", None), "_name_or_path", None) or "in-memory"
            path = Path(name).expanduser()
            return str(path.resolve()) if path.exists() else name
        return str(self.source.directory.resolve()) if self.source.kind == "local" else self.source.name

    def revision(self, requested: str | None) -> str | None:
        """The revision a manifest records: a Hub model's commit sha as transformers resolved it, an
        input checkpoint's recorded revision, else ``requested``."""
        if self.manifest is not None:
            return self.manifest.revision
        if self.source is not None and self.source.kind == "hub":
            return getattr(getattr(self.model, "config", None), "_commit_hash", None) or requested
        return requested

    def stages(self) -> list[dict]:
        """The stage history of an input checkpoint (its stages, then itself), else empty."""
        if self.manifest is None:
            return []
        record = self.manifest.model_dump(exclude={"stages"})
        record["sparsity"] = {k: v for k, v in self.manifest.sparsity.items() if k != "per_module"}
        record["path"] = str(self.source.directory.resolve())
        return [*self.manifest.stages, record]


def open_model(name: str | Path | Source | Any, *, tokenizer: Any = None, dtype: str | torch.dtype | None = "auto",
               revision: str | None = None, device: str | torch.device = "cpu", lazy: bool = False,
               spill_root: str | Path | None = None, with_tokenizer: bool = True) -> LoadedModel:
    """Resolve ``name`` and load it, lazily when asked and possible (see the module docstring).
    ``spill_root``: where a lazily loaded model spills changed blocks (``models.lazy_store``).
    A model object (with its ``tokenizer``) is taken as it is: nothing is loaded or moved."""
    if not isinstance(name, (str, Path, Source)):
        return LoadedModel(name, tokenizer, None, getattr(name, "_compresskit_loading", "in-memory: model object passed in"))
    source = name if isinstance(name, Source) else resolve_source(name, revision)
    manifest = Manifest.read(source.directory) if source.is_checkpoint else None
    torch_dtype = resolve_dtype(dtype if dtype is not None else "auto")
    if torch_dtype is None and manifest is not None and manifest.dtype:
        torch_dtype = getattr(torch, manifest.dtype)
    model, reason = None, "--load in-memory"
    if lazy:
        try:
            model = load_lazily(source.snapshot(), torch_dtype, manifest.structure if manifest else None,
                                _install_on_meta, spill_root)
        except LazyUnsupported as exc:
            reason = str(exc)
    loading = LOADING_LAZY if model is not None else f"in-memory: {reason}"
    if model is None:
        model = (_read_checkpoint(source.directory, manifest, torch_dtype) if manifest is not None
                 else load_pretrained(source, torch_dtype))
    model.config.use_cache = False
    model.eval()
    model._compresskit_loading = loading
    move_model(model, device)
    tokenizer = _checkpoint_tokenizer(source) if with_tokenizer and manifest is not None else (
        load_tokenizer(source) if with_tokenizer else None)
    return LoadedModel(model, tokenizer, source, loading, manifest)


def load(path: str | Path, device: str = "cpu", dtype: str | torch.dtype | None = None):
    """Load any compresskit checkpoint (dense, low-rank, removed or condensed modules) exactly."""
    model, _ = load_with_tokenizer(path, device=device, dtype=dtype, with_tokenizer=False)
    return model


def load_with_tokenizer(path: str | Path, device: str = "cpu", dtype=None, with_tokenizer: bool = True):
    """``(model, tokenizer)`` of the checkpoint directory ``path``, in memory (errors: ``CheckpointError``)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a directory")
    manifest = Manifest.read(path) if (path / MANIFEST_NAME).exists() else None
    torch_dtype = resolve_dtype(dtype) if dtype is not None else None
    if torch_dtype is None and manifest is not None and manifest.dtype:
        torch_dtype = getattr(torch, manifest.dtype)
    model = _read_checkpoint(path, manifest, torch_dtype)
    model.config.use_cache = False
    model.eval().to(device)
    return model, (_checkpoint_tokenizer(Source(str(path), "local", path)) if with_tokenizer else None)


# ----------------------------------------------------------------------------- the steps
def _install_on_meta(model, entry: dict) -> None:
    """A checkpoint's module replacement on the lazy skeleton; one that needs real tensors, or a
    kind this compresskit does not know, sends the model to the in-memory path."""
    kind = entry.get("kind")
    try:
        install_structure(model, [entry])
    except UnknownStructureKind:
        raise LazyUnsupported(f"unknown structure kind {kind!r}") from None
    except (RuntimeError, NotImplementedError, ValueError) as exc:  # needs real tensors
        raise LazyUnsupported(f"structure kind {kind!r} cannot be rebuilt on meta ({exc})") from None


@contextmanager
def _quiet_transformers():
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _read_checkpoint(path: Path, manifest: Manifest | None, dtype: torch.dtype | None):
    """A checkpoint directory in memory: from_pretrained, then its structure re-installed and the
    tensors loaded strictly (a missing tensor is an error naming it, never a random initialisation)."""
    from transformers import AutoConfig

    kwargs = {} if dtype is None else {"dtype": dtype}
    check_safetensors_files(path, CheckpointError, "checkpoint")
    with _quiet_transformers():
        try:
            model, info = auto_class(AutoConfig.from_pretrained(path)).from_pretrained(
                path, output_loading_info=True, **kwargs)
        except LOAD_ERRORS as exc:
            raise CheckpointError(f"cannot load {path}: {describe_load_error(exc)}") from None
    if manifest is None or not manifest.structure:
        refuse_missing_weights(info["missing_keys"], path, CheckpointError, "checkpoint", model.config)
        return model
    try:
        install_structure(model, manifest.structure)
    except UnknownStructureKind as exc:
        raise CheckpointError(f"{path}: unknown structure kind '{exc.args[0]}' (written by a newer compresskit?)") from None
    try:
        missing, unexpected = model.load_state_dict(_read_state_dict(path), strict=False)
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
    return model


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


def _checkpoint_tokenizer(source: Source):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source.directory)
    except LOAD_ERRORS as exc:
        raise CheckpointError(f"cannot load the tokenizer of {source.directory}: {describe_load_error(exc)}") from None
