"""``heal --train lora``: peft LoRA adapters on the checkpoint's linears.

The adapters are peft's (``LoraConfig`` + ``get_peft_model``), on every ``nn.Linear`` of the
model except the output head (peft's ``all-linear``: attention and MLP projections, low-rank
factors U / V, routers, shared experts) or on the modules ``--lora-targets`` names. What
``all-linear`` covers in an MoE model is peft's choice and differs by family (peft 0.21): on
qwen2_moe the fused 3-D routed experts (transformers ≥ 5) are not linears and get no adapter,
while on deepseek_v2 peft maps the MLP names to the fused expert tensors (its ``ParamWrapper``),
so the routed experts and routers get adapters and the dense layer-0 MLP and the shared experts
get none. The manifest lists the adapted modules (``method_details.lora.adapted_modules``);
``--lora-targets`` names them explicitly.

Saved two ways:

* without ``--merge``: ``--out`` is a peft adapter directory (``adapter_config.json``,
  ``adapter_model.safetensors``) whose ``base_model_name_or_path`` is the compressed checkpoint,
  plus ``heal.json`` (the healing record). The checkpoint itself is not rewritten, so its
  structure and sparsity are untouched; ``PeftModel.from_pretrained(compresskit.load(base), out)``
  (``compresskit.heal.load_healed(out)``) gives the healed model. A dense LoRA update applies
  on top of a sparse base, as with any LoRA.
* with ``--merge``: ``merge_and_unload`` folds ``B·A`` into every adapted weight and ``--out`` is a
  checkpoint of the input's kind (same structure: shapes never change). For a sparse checkpoint
  the merged update at the pruned entries is dropped — the masks are re-applied after merging,
  so every pruned entry is exactly zero again — and the manifest says so
  (``method_details.lora.merge``); the final held-out point is measured after that masking.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from ..checkpoint import atomic_directory, check_output_dir, load
from ..errors import InputError
from .settings import parse_targets  # noqa: F401 (heal --lora-targets)
from .trainables import apply_masks

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md")
RECORD = "heal.json"
WRITTEN_BY = "compresskit heal"


def add_lora(model, rank: int, alpha: float, targets: str | list[str], dropout: float = 0.0):
    """Wrap ``model`` with fresh LoRA adapters; returns the peft model (base weights frozen)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=dropout, bias="none",
                        task_type="CAUSAL_LM")
    try:
        with warnings.catch_warnings():  # peft asks transformers for a deprecated name (is_gradient_checkpointing)
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            peft_model = get_peft_model(model, config)
    except ValueError as exc:  # peft: target modules not found
        raise InputError(f"--lora-targets {targets if isinstance(targets, str) else ','.join(targets)}: "
                         f"{str(exc).splitlines()[0]}") from None
    return peft_model


def lora_parameters(peft_model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in peft_model.named_parameters() if "lora_" in n}


def merge(peft_model, masks: dict[str, torch.Tensor]):
    """Fold the adapters into the weights and re-zero the pruned entries (``masks``: weight name of
    the unwrapped model → True where pruned)."""

    model = peft_model.merge_and_unload()
    apply_masks(model, masks)
    return model


# --------------------------------------------------------------------------- the adapter directory
def is_adapter_dir(path: Path) -> bool:
    """An adapter directory ``heal`` wrote (by content: its ``heal.json``)."""
    try:
        record = json.loads((Path(path) / RECORD).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("written_by") == WRITTEN_BY


def check_adapter_output(out: Path, force: bool, inputs: list) -> None:
    """Before any work: ``out`` may be new, or (with ``force``) an earlier adapter directory of
    ``heal`` holding nothing else; otherwise the checkpoint rules of ``check_output_dir``."""

    out = Path(out).expanduser()
    if out.is_dir() and is_adapter_dir(out):
        if not force:
            raise InputError(f"output {out} already exists; pass --force to replace it")
        _adapter_replaceable(out)
        return
    check_output_dir(out, force, input_path=inputs[0], inputs=inputs[1:])


def _adapter_replaceable(out: Path) -> None:
    """An adapter directory ``heal`` wrote, holding nothing compresskit did not write."""
    if not is_adapter_dir(out):
        raise InputError(f"output {out} is not an adapter directory compresskit heal wrote; choose a new directory")
    foreign = sorted(e.name for e in out.iterdir() if e.name not in (*ADAPTER_FILES, RECORD))
    if foreign:
        raise InputError(f"output {out} is a heal adapter directory but also holds {foreign[0]}, which compresskit "
                         "did not write; --force never deletes such files: move them away or choose a new directory")


def save_adapter(peft_model, out: Path, base: Path, record: dict, force: bool) -> Path:
    """Write the adapter + ``heal.json`` into a temporary sibling and rename it into place (the
    checkpoint writer's ``atomic_directory``: an interrupted save leaves nothing)."""
    out = Path(out).expanduser().resolve()
    with atomic_directory(out, force=force, replaceable=_adapter_replaceable, what="adapter directory") as tmp:
        for config in peft_model.peft_config.values():
            config.base_model_name_or_path = str(base)
        peft_model.save_pretrained(tmp)
        (tmp / RECORD).write_text(json.dumps({**record, "written_by": WRITTEN_BY, "base_checkpoint": str(base)},
                                             indent=2, default=str) + "\n")
    return out


def load_healed(path: str | Path, device: str = "cpu"):
    """The healed model at ``path``: a checkpoint (``compresskit.load``), or a heal adapter
    directory (its base checkpoint loaded with ``compresskit.load`` and the adapter applied by
    ``peft.PeftModel.from_pretrained``)."""

    path = Path(path).expanduser()
    if not is_adapter_dir(path):
        return load(path, device=device)
    from peft import PeftModel

    record = json.loads((path / RECORD).read_text())
    base = load(record["base_checkpoint"], device=device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return PeftModel.from_pretrained(base, str(path)).eval()
