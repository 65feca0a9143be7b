"""In-memory loading: a model and its tokenizer with transformers' ``from_pretrained``.

``load_model(name)`` resolves ``name`` (``models.source``: built-in name, local directory, Hub id)
and loads it in memory; ``load_pretrained(source)`` / ``load_tokenizer(source)`` are its two steps,
which the loader (``checkpoint.reader.open_model``) uses when a model is not loaded lazily.
``auto_class(config)`` picks the transformers auto class (causal LM, or image-text-to-text for VLM
wrappers such as LLaVA); the lazy loader builds its skeleton from the same class. Every failure
caused by what the user gave is a one-line ``ModelLoadError``.

Attention uses transformers' default (SDPA where the architecture supports it, eager otherwise);
padded batches work with it because transformers ≥ 5 builds explicit 4-D masks from
``attention_mask``. The model is loaded on CPU, then moved to ``device``.
"""

from __future__ import annotations

import torch

from ..compat import causal_lm_class
from ..errors import InputError, ModelLoadError
from .source import HUB_PROBE_TIMEOUT_S, Source, resolve_source  # noqa: F401 - HUB_PROBE_TIMEOUT_S: also loading's name
from .weight_files import LOAD_ERRORS, describe_load_error, refuse_missing_weights

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


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
    source = resolve_source(str(name_or_path), revision)
    model = load_pretrained(source, torch_dtype, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code)
    return model.to(torch_device), tokenizer


def _pretrained_kwargs(source: Source, trust_remote_code: bool) -> dict:
    return dict(revision=source.revision, trust_remote_code=trust_remote_code, **source.hub_kwargs)


def auto_class(config):
    """AutoModelForCausalLM, or the image-text-to-text auto class for VLM wrappers (LLaVA)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

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


def load_pretrained(source: Source, dtype: torch.dtype | None, trust_remote_code: bool = False):
    """The model of ``source`` in memory, exactly as ``from_pretrained`` builds it (eval mode,
    ``use_cache`` off); a tensor the weight files lack is an error, never a random initialisation."""
    from transformers import AutoConfig

    common = _pretrained_kwargs(source, trust_remote_code)
    where = source.pretrained_id
    try:
        config = AutoConfig.from_pretrained(where, **common)
        auto = auto_class(config)
        model, info = auto.from_pretrained(where, config=config, dtype=dtype or "auto", output_loading_info=True,
                                           **common)
    except ModelLoadError:
        raise
    except (*LOAD_ERRORS, ImportError) as exc:
        hint = " (remote code: pass trust_remote_code=True if you trust it)" if "trust_remote_code" in str(exc) else ""
        raise ModelLoadError(f"cannot load model '{where}': {describe_load_error(exc)}{hint}") from None
    refuse_missing_weights(info["missing_keys"], where, ModelLoadError, "model", config)
    model.config.use_cache = False
    return model.eval()


def load_tokenizer(source: Source, trust_remote_code: bool = False):
    """The tokenizer stored with ``source`` (one ``ModelLoadError`` line when it cannot be loaded)."""
    from transformers import AutoTokenizer

    where = source.pretrained_id
    try:
        return AutoTokenizer.from_pretrained(where, **_pretrained_kwargs(source, trust_remote_code))
    except (*LOAD_ERRORS, ImportError) as exc:
        raise ModelLoadError(f"cannot load the tokenizer of '{where}': {describe_load_error(exc)}") from None
