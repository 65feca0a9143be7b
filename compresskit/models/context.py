"""What input a model takes: ``--seqlen`` past a model's position limit is refused, and so are
token ids past its embedding (``check_token_ids``).

A model silently run past ``max_position_embeddings`` gives meaningless calibration statistics
and perplexities (learned positions index out of range; RoPE models leave the lengths they were
trained on). The check runs once the config is loaded and before any heavy compute. A model
configured to extrapolate (RoPE scaling: linear, dynamic, YaRN, llama3, longrope, ...) only gets
a warning, since going past the original length is what that configuration is for.

A length the user did not give is never an error: ``fit_seqlen`` takes ``min(default, the
model's context)`` (the reference codes use the model's own length), says so in one ``note:``
line (``CompressKitNote``) and reports the default it lowered, which callers record (manifest
``calibration.seqlen_default``, results ``extra.seqlen_default``). Every command resolves its
unset ``--seqlen`` here.
"""

from __future__ import annotations

import warnings
from typing import Any

from ..errors import CompressKitNote, CompressKitWarning, InputError

#: Config attributes naming the longest sequence, in the order families use them.
POSITION_ATTRIBUTES = ("max_position_embeddings", "n_positions", "max_sequence_length", "max_seq_len", "seq_length")


def _text_config(model_or_config: Any) -> Any:
    config = getattr(model_or_config, "config", model_or_config)
    getter = getattr(config, "get_text_config", None)
    try:
        return getter() if callable(getter) else config
    except Exception:  # noqa: BLE001 - odd configs: fall back to the top level
        return config


def max_positions(model_or_config: Any) -> int | None:
    """The longest sequence the config declares, or None when it declares none."""
    config = _text_config(model_or_config)
    for name in POSITION_ATTRIBUTES:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def rope_scaling_type(model_or_config: Any) -> str | None:
    """The configured RoPE scaling (``linear``, ``yarn``, ...), or None for plain RoPE / none."""
    config = _text_config(model_or_config)
    for name in ("rope_scaling", "rope_parameters"):
        params = getattr(config, name, None)
        if isinstance(params, dict):
            kind = params.get("rope_type") or params.get("type")
            if kind and kind != "default":
                return str(kind)
    return None


def check_seqlen(model_or_config: Any, seqlen: int, flag: str = "--seqlen") -> None:
    """Refuse ``seqlen`` above the model's position limit (warn where RoPE scaling is configured)."""
    limit = max_positions(model_or_config)
    if limit is None or seqlen <= limit:
        return
    scaling = rope_scaling_type(model_or_config)
    if scaling is not None:
        warnings.warn(f"{flag} {seqlen} is above the model's max_position_embeddings {limit}; "
                      f"relying on its {scaling} RoPE scaling to extrapolate", CompressKitWarning, stacklevel=2)
        return
    raise InputError(f"{flag} {seqlen} is above the model's max_position_embeddings {limit}; use {flag} {limit} or less")


def fit_seqlen(model_or_config: Any, seqlen: int | None, default: int, flag: str = "--seqlen") -> tuple[int, int | None]:
    """(the length to use, the default it replaced or None).

    ``seqlen`` given: it is checked (``check_seqlen``) and used. Unset: ``default``, lowered to the
    model's declared context when that is shorter, with one note saying so."""
    if seqlen is not None:
        check_seqlen(model_or_config, seqlen, flag)
        return seqlen, None
    limit = max_positions(model_or_config)
    if limit is None or default <= limit:
        return default, None
    warnings.warn(f"{flag} not given: using {limit}, the model's max_position_embeddings, instead of the default "
                  f"{default}", CompressKitNote, stacklevel=2)
    return limit, default


def embedding_rows(model: Any) -> int | None:
    """Rows of the model's input embedding (the ids it can look up), or None if it has none."""
    getter = getattr(model, "get_input_embeddings", None)
    embedding = getter() if callable(getter) else None
    weight = getattr(embedding, "weight", None)
    return None if weight is None or weight.dim() != 2 else int(weight.shape[0])


def check_token_ids(model: Any, ids: Any, what: str = "the text") -> None:
    """Refuse token ids the model's embedding cannot look up, in one line.

    A tokenizer that is not the model's own (or one with tokens added after the model was built)
    can emit ids past the embedding; the embedding lookup then fails deep in the forward with an
    ``IndexError`` (CPU) or a device-side assert (CUDA). Cheap: one ``max`` over ``ids``."""
    rows = embedding_rows(model)
    if rows is None or ids is None or ids.numel() == 0:
        return
    top = int(ids.max())
    if top >= rows:
        raise InputError(f"the tokenizer gave token id {top} for {what}, but the model's embedding has only {rows} rows: "
                         f"the tokenizer does not match the model (use the model's own tokenizer)")
