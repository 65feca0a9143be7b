"""Healing compressed checkpoints: distillation from the dense model (``compresskit heal``).

``losses.py`` (KD / CE / KD+CE on ``analysis.distances.token_kl``) · ``trainables.py`` (what
trains per checkpoint kind, masks) · ``teacher.py`` (the teacher, its vocabulary, memory) ·
``lora.py`` (peft adapters, merging, the adapter directory) · ``settings.py`` (the options and
their checks, torch-free) · ``loop.py`` (the one trainer, also ``compresskit finetune``'s) ·
``state.py`` (the resumable training state, peak memory) · ``workflow.py`` (:func:`heal`) ·
``finetune.py`` (``compresskit finetune``: the same trainer on WeLore's factors and CD-MoE's condensed
layers, cross-entropy only). Names resolve on first use, so importing the package costs nothing.
"""

_NAMES = {"heal": "workflow", "HealSettings": "settings", "HealOutcome": "workflow", "parse_tokens": "settings",
          "load_healed": "lora", "TrainSettings": "settings", "LossSpec": "settings", "kd_loss": "losses"}


def __getattr__(name: str):
    if name in _NAMES:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_NAMES)
