"""``load_model``: a model and its tokenizer from a local directory, a Hub id or a built-in name.

Every way it can fail because of what the user typed (missing path, directory without
config.json or weights, unknown Hub id, Hub unreachable) is a one-line ``ModelLoadError``. The
Hub is probed once with a short timeout before ``from_pretrained``: transformers' own retries
take ~25 s to give up on an unreachable host.

Attention uses transformers' default (SDPA where the architecture supports it, eager otherwise);
padded batches work with it because transformers ≥ 5 builds explicit 4-D masks from
``attention_mask``. The model is loaded on CPU, then moved to ``device``.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from compresskit.errors import InputError, ModelLoadError
from compresskit.hub import offline_forced
from compresskit.models.builtin import builtin_model_dir, is_builtin
from compresskit.models.weight_files import (
    LOAD_ERRORS,
    check_safetensors_files,
    describe_load_error,
    refuse_missing_weights,
)

HUB_PROBE_TIMEOUT_S = 5.0
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# "org/name" or "name": what a Hub id can look like (used only when no such local path exists).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def resolve_dtype(name: str | torch.dtype) -> torch.dtype | None:
    """``"float32"|"bfloat16"|"float16"`` (or fp32/bf16/fp16) → torch dtype; ``"auto"`` → None
    (keep the checkpoint's own dtype: bf16 checkpoints stay bf16)."""
    if isinstance(name, torch.dtype):
        return name
    key = str(name).lower().removeprefix("torch.")
    if key == "auto":
        return None
    if key not in _DTYPES:
        raise InputError(f"unknown dtype {name!r}; use auto, float32, bfloat16 or float16")
    return _DTYPES[key]


def resolve_device(device: str | torch.device) -> torch.device:
    """``"cpu"``, ``"cuda"``/``"cuda:N"``, or ``"auto"`` (CUDA when available, else CPU)."""
    if isinstance(device, torch.device):
        resolved = device
    elif str(device).lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            resolved = torch.device(str(device))
        except RuntimeError:
            raise InputError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} requested but CUDA is not available here; use --device cpu or auto")
    return resolved


def load_model(
    name_or_path: str,
    dtype: str = "auto",
    device: str = "cpu",
    revision: str | None = None,
    trust_remote_code: bool = False,
):
    """Load ``(model, tokenizer)``: eval mode, ``config.use_cache = False``, on ``device``.

    ``name_or_path`` is tried as a built-in name (``BUILTIN_MODELS``), then a local directory
    (``config.json`` + safetensors/bin weights + tokenizer files), then a Hugging Face Hub id.
    Vision-language wrappers (LLaVA) load through ``AutoModelForImageTextToText`` when
    ``AutoModelForCausalLM`` does not know their config.
    """
    torch_dtype = resolve_dtype(dtype)
    torch_device = resolve_device(device)
    name = str(name_or_path)
    hub_kwargs: dict = {}
    if is_builtin(name):
        source = str(builtin_model_dir(name))
    else:
        path = Path(name).expanduser()
        if path.exists():
            _check_local_dir(path)
            source = str(path)
        elif _HUB_ID.match(name) and not name.startswith("."):
            source = name
            hub_kwargs = _hub_access(name, revision)
        else:
            raise ModelLoadError(f"model path '{name}' does not exist")
    common = dict(revision=revision, trust_remote_code=trust_remote_code, **hub_kwargs)
    model = _load_weights(source, torch_dtype, common)
    tokenizer = _load_tokenizer(source, common)
    model.config.use_cache = False
    model.eval()
    return model.to(torch_device), tokenizer


def _check_local_dir(path: Path) -> None:
    if not path.is_dir():
        raise ModelLoadError(f"'{path}' is a file; pass the model directory (config.json + *.safetensors)")
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"'{path}' has no config.json: a model directory needs config.json and *.safetensors weights"
        )
    if not any(next(path.glob(p), None) for p in _WEIGHT_PATTERNS):
        raise ModelLoadError(f"'{path}' has config.json but no weights (*.safetensors or pytorch_model*.bin)")
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise ModelLoadError(
            f"'{path}' has no tokenizer files ({', '.join(_TOKENIZER_FILES)}); save the tokenizer next to the model"
        )
    check_safetensors_files(path, ModelLoadError, "model")


def _hub_access(repo_id: str, revision: str | None) -> dict:
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
    if _in_hub_cache(repo_id, revision):
        return {"local_files_only": True}
    raise ModelLoadError(not_found)


def _in_hub_cache(repo_id: str, revision: str | None) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:  # noqa: BLE001 - a malformed cache is "not cached"
        return False
    return isinstance(found, str)


def _auto_class(config):
    """AutoModelForCausalLM, or the image-text-to-text auto class for VLM wrappers (LLaVA)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from ..compat import causal_lm_class

    for auto in (AutoModelForCausalLM, AutoModelForImageTextToText):
        if causal_lm_class(config, auto) is not None:
            return auto
    auto_map = getattr(config, "auto_map", None) or {}
    if "AutoModelForImageTextToText" in auto_map and "AutoModelForCausalLM" not in auto_map:
        return AutoModelForImageTextToText
    if auto_map:
        return AutoModelForCausalLM
    archs = ", ".join(getattr(config, "architectures", None) or [type(config).__name__])
    raise ModelLoadError(
        f"'{config.model_type}' ({archs}) is not a causal language model; compresskit compresses decoder LMs"
    )


def _load_weights(source: str, dtype: torch.dtype | None, common: dict):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source, **common)
        auto = _auto_class(config)
        model, info = auto.from_pretrained(source, config=config, dtype=dtype or "auto", output_loading_info=True,
                                           **common)
    except ModelLoadError:
        raise
    except (*LOAD_ERRORS, ImportError) as exc:
        hint = " (remote code: pass trust_remote_code=True if you trust it)" if "trust_remote_code" in str(exc) else ""
        raise ModelLoadError(f"cannot load model '{source}': {describe_load_error(exc)}{hint}") from None
    refuse_missing_weights(info["missing_keys"], source, ModelLoadError, "model", config)
    return model


def _load_tokenizer(source: str, common: dict):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, **common)
    except (*LOAD_ERRORS, ImportError) as exc:
        raise ModelLoadError(f"cannot load the tokenizer of '{source}': {describe_load_error(exc)}") from None
