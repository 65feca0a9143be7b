"""The teacher of distillation: the dense model a checkpoint was compressed from.

By default it is the manifest's ``base_model`` (a built-in name, a local directory or a Hub id);
``--teacher M`` names another one. It must share the student's vocabulary token for token (KD
compares next-token distributions id by id): the output sizes and the tokenizers' vocabularies
are compared right after loading, before any training.

Logits are computed **on the fly**, one teacher forward per training batch without gradients:
that costs about a third of the student's forward + backward, needs no disk and works for any
number of tokens, whereas caching full logits costs ``vocab × 4`` bytes per token (SmolLM2:
196 KB/token, 800 GB for 4 M tokens) and even top-64 logits ~0.5 KB/token — worth it only when
the same fixed data is distilled many times. With ``--kl-top-k K`` only the teacher's top-K
logits and ids travel to the student's device.

Placement: teacher and student share ``--device`` when they fit; ``--teacher-device`` puts the
teacher elsewhere (e.g. ``cpu`` beside a GPU student). Before loading, ``check_memory`` compares
an estimate (weights, gradients + AdamW state, activations, logits) with what the devices have
free and stops with one line naming the memory needed when it does not fit.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..analysis.distances import top_k_logits
from ..errors import InputError
from ..models.builtin import is_builtin
from ..models.loading import load_model
from ..models.source import HUB_ID
from .state import training_memory_bytes
from .loop import autocast

GIB = 2 ** 30


def teacher_source(base_model: str | None, teacher: str | None) -> str:
    """The teacher to load, or one line saying why there is none."""

    if teacher:
        return teacher
    if not base_model:
        raise InputError("the checkpoint's manifest names no base model to distil from; pass --teacher MODEL "
                         "(the dense model it was compressed from)")
    if is_builtin(base_model) or Path(base_model).expanduser().exists():
        return base_model
    if base_model.startswith(("/", ".", "~")) or not HUB_ID.match(base_model):
        raise InputError(f"the checkpoint's base model {base_model} is not there any more; pass --teacher MODEL "
                         "(the dense model it was compressed from) or use --loss ce")
    return base_model  # a Hub id: load_model answers in one line when the Hub cannot be reached


def _vocab_rows(model) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


def check_same_vocabulary(teacher, teacher_tokenizer, student, student_tokenizer, source: str) -> None:
    """One line when the teacher's next-token distributions are not over the student's tokens."""
    t_rows, s_rows = _vocab_rows(teacher), _vocab_rows(student)
    if t_rows != s_rows:
        raise InputError(f"the teacher {source} has another vocabulary ({t_rows} output tokens, the checkpoint "
                         f"{s_rows}); distillation compares the two token by token: pass a --teacher with the "
                         "checkpoint's tokenizer")
    if teacher_tokenizer is not None and student_tokenizer is not None:
        if teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab():
            raise InputError(f"the teacher {source} has another tokenizer (its vocabulary maps tokens to other ids "
                             "than the checkpoint's); pass a --teacher with the checkpoint's tokenizer")


def load_teacher(source: str, device: torch.device, revision: str | None = None):
    """``(model, tokenizer)`` in eval mode without gradients: fp32 on CPU, bf16 on CUDA."""

    dtype = "bfloat16" if device.type == "cuda" else "float32"
    model, tokenizer = load_model(source, dtype=dtype, device=str(device), revision=revision)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), tokenizer


def teacher_logits(teacher, batch: dict, device: torch.device, top_k: int | None):
    """The teacher's logits (or top-K ``(values, ids)``) for ``batch``, on ``device``."""

    tdev = next(teacher.parameters()).device
    inputs = {k: v.to(tdev) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    with torch.no_grad(), autocast(tdev):
        logits = teacher(**inputs).logits.float()
    if top_k:
        values, ids = top_k_logits(logits, top_k)
        return values.to(device), ids.to(device)
    return logits.to(device)


# --------------------------------------------------------------------------- memory
def weight_bytes(path: str | Path) -> int | None:
    """Bytes of a model directory's safetensors files (None when it is not a local directory)."""
    path = Path(path).expanduser()
    files = list(path.glob("*.safetensors")) if path.is_dir() else []
    return sum(f.stat().st_size for f in files) or None


def available_bytes(device: torch.device) -> int | None:
    """Free memory of ``device``: CUDA's free bytes, on CPU Linux's MemAvailable (None if unknown)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def training_estimate(*, student_params: int, trainable: int, batch_tokens: int, hidden: int, layers: int,
                      vocab: int, grad_checkpointing: bool, student_bytes_per_param: int = 4) -> dict[str, int]:
    """Rough bytes of training the student: weights, fp32 gradients + AdamW moments of the trainable
    tensors, activations (~20 hidden-sized fp32 tensors per layer and token, 2 with checkpointing)
    and the logits (student logits, their gradient and the loss's softmax copies: ~4 of them)."""

    per_layer = 2 if grad_checkpointing else 20
    return {"weights": student_params * student_bytes_per_param,
            "gradients_and_adamw": training_memory_bytes(trainable),
            "activations": batch_tokens * hidden * layers * 4 * per_layer,
            "logits": batch_tokens * vocab * 4 * 4}


def check_memory(student: dict[str, int], teacher_bytes: int, device: torch.device, teacher_device: torch.device,
                 teacher_logit_bytes: int) -> dict:
    """One line naming the memory needed when student + teacher do not fit where they are placed."""
    need = {device: sum(student.values())}
    need[teacher_device] = need.get(teacher_device, 0) + teacher_bytes + teacher_logit_bytes
    report = {}
    for dev, needed in need.items():
        free = available_bytes(dev)
        report[str(dev)] = {"needed_bytes": int(needed), "free_bytes": free}
        if free is not None and needed > free:
            parts = ", ".join(f"{k.replace('_', ' ')} {v / GIB:.2f}" for k, v in student.items())
            where = "student and teacher" if dev == teacher_device and dev == device else (
                "the student" if dev == device else "the teacher")
            raise InputError(
                f"healing needs about {needed / GIB:.1f} GiB on {dev} for {where} (student GiB: {parts}; teacher "
                f"{(teacher_bytes + teacher_logit_bytes) / GIB:.2f}) but {free / GIB:.1f} GiB are free; pass "
                "--teacher-device, --grad-checkpointing, --train lora or a smaller --batch-size / --seqlen")
    return report
