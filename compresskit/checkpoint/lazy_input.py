"""The model to compress, loaded lazily when possible (``models.lazy``), else in memory.

``load_input(name)`` is what ``api.build_job`` uses for a model given by name: a local
safetensors directory, a Hub id (its snapshot is downloaded first, then read the same way), a
built-in name (its cached safetensors conversion) or a compresskit checkpoint (its module
replacements installed on the meta skeleton). Whatever cannot be loaded lazily (``.bin`` / GGUF
weights, quantized or remote-code models, a structure kind that needs real tensors) is loaded in
memory exactly as before; ``model._compresskit_loading`` says which path was taken and why, and
``api.prune`` writes it into the manifest's hyperparameters (``loading``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..models.lazy import LOADING_LAZY, LazyUnsupported, load_lazily
from .manifest import MANIFEST_NAME, Manifest

_SNAPSHOT_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "tokenizer*"]


def _local_source(name: str, revision: str | None) -> Path:
    """The directory holding the model's files (downloading a Hub snapshot when needed)."""
    from ..models.builtin import builtin_model_dir, is_builtin
    from ..models.loading import _HUB_ID, _check_local_dir, _hub_access
    from ..errors import ModelLoadError

    if is_builtin(name):
        return Path(builtin_model_dir(name))
    path = Path(name).expanduser()
    if path.exists():
        _check_local_dir(path)
        return path
    if _HUB_ID.match(name) and not name.startswith("."):
        access = _hub_access(name, revision)
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(name, revision=revision, allow_patterns=_SNAPSHOT_PATTERNS,
                                          local_files_only=bool(access.get("local_files_only"))))
        except Exception as exc:  # noqa: BLE001 - any Hub failure becomes the one-line load error
            raise ModelLoadError(f"cannot download '{name}': {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    raise ModelLoadError(f"model path '{name}' does not exist")


def _finish(model, note: str):
    model.config.use_cache = False
    model.eval()
    model._compresskit_loading = note
    return model


def load_input(name: str, dtype: str | torch.dtype = "auto", revision: str | None = None, lazy: bool = True,
               spill_root: str | Path | None = None):
    """``(model, tokenizer)`` for compression: blocks on disk when possible (see the module docstring);
    ``lazy=False`` loads in memory; ``spill_root``: where changed blocks are spilled (``models.lazy_store``)."""
    from ..models.loading import _load_tokenizer, load_model, resolve_dtype
    from .io import _STRUCTURE_KINDS, _import_structure_kinds, load_with_tokenizer

    checkpoint = (Path(name).expanduser() / MANIFEST_NAME).is_file()
    torch_dtype = resolve_dtype(dtype)
    reason = "--load in-memory"
    if lazy:
        source = _local_source(name, revision)
        try:
            if checkpoint:
                manifest = Manifest.read(source)
                if torch_dtype is None and manifest.dtype:
                    torch_dtype = getattr(torch, manifest.dtype)
                _import_structure_kinds()

                def install(model, entry):
                    kind = entry.get("kind")
                    if kind not in _STRUCTURE_KINDS:
                        raise LazyUnsupported(f"unknown structure kind {kind!r}")
                    try:
                        _STRUCTURE_KINDS[kind](model, entry)
                    except (RuntimeError, NotImplementedError, ValueError) as exc:  # needs real tensors
                        raise LazyUnsupported(f"structure kind {kind!r} cannot be rebuilt on meta ({exc})") from None

                model = load_lazily(source, torch_dtype, manifest.structure, install, spill_root)
            else:
                model = load_lazily(source, torch_dtype, spill_root=spill_root)
            return _finish(model, LOADING_LAZY), _load_tokenizer(str(source), {})
        except LazyUnsupported as exc:
            reason = str(exc)
    if checkpoint:
        model, tok = load_with_tokenizer(name, dtype=torch_dtype)
    else:
        model, tok = load_model(name, dtype=dtype, device="cpu", revision=revision)
    return _finish(model, f"in-memory: {reason}"), tok
