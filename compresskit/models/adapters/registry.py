"""``get_adapter(model)``: pick the family from ``config.model_type`` and find the decoder blocks."""

from __future__ import annotations

from torch import nn

from compresskit.errors import UnsupportedArchitectureError
from compresskit.models.adapters.base import ModelAdapter
from compresskit.models.adapters.families import Family, family_for_model_type, supported_families


def _unsupported(what: str) -> UnsupportedArchitectureError:
    return UnsupportedArchitectureError(
        f"unsupported architecture: {what}; supported families: {', '.join(supported_families())}"
    )


def _find_decoder(model: nn.Module, family: Family) -> str | None:
    for path in family.decoder_paths:
        try:
            decoder = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(getattr(decoder, "layers", None), nn.ModuleList):
            return path
    return None


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model``; ``UnsupportedArchitectureError`` (naming the families) otherwise.

    Vision-language wrappers (LLaVA) are recognised by their own ``model_type``; their block
    layout comes from ``config.text_config.model_type``, which must be a supported text family.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    family = family_for_model_type(model_type)
    if family is None:
        label = f"model_type {model_type!r}" if model_type else f"{type(model).__name__} (no transformers config)"
        raise _unsupported(label)
    layout_family = family
    if family.wrapper:
        text_type = getattr(getattr(config, "text_config", None), "model_type", None)
        layout_family = family_for_model_type(text_type)
        if layout_family is None or layout_family.wrapper:
            raise _unsupported(f"{model_type} wrapper around text model_type {text_type!r}")
    decoder_path = _find_decoder(model, family)
    if decoder_path is None:
        raise _unsupported(
            f"{type(model).__name__} ({model_type}) has no decoder block list at "
            f"{' or '.join(repr(p + '.layers' if p else 'layers') for p in family.decoder_paths)}"
        )
    return ModelAdapter(model, family, layout_family, decoder_path)
