"""``compresskit heal``: heal any compressed checkpoint by distillation from its dense model.

One function, :func:`heal`: every check on the input, the options and the output runs before
any training; then the student (the checkpoint, exactly as ``compresskit.load`` builds it) trains
what ``trainables.plan_training`` picks for its kind — or peft LoRA adapters — on ``--data``
with ``kd`` / ``ce`` / ``kd+ce`` (``losses.py``) against the teacher (``teacher.py``), through the
shared trainer (``loop.py``: deterministic data order, resumable state, held-out curve,
progress). The output is a checkpoint of the input's kind (stock stays stock; the structure
entries are the input's; a sparse checkpoint's zeros are exactly where they were) whose manifest
records the healing, or, for ``--train lora`` without ``--merge``, a peft adapter directory
(``lora.py``).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import Manifest, check_output_dir, load_with_tokenizer, save_checkpoint
from ..checkpoint.structure import known_structure_kinds
from ..errors import InputError
from ..evaluation.perplexity import perplexity_tokens
from ..evaluation.sparsity import count_parameters, measure_sparsity, trained_parameter_counts
from ..models import get_adapter
from ..models.builtin import builtin_model_dir, is_builtin
from ..models.context import check_token_ids, fit_seqlen
from ..models.loading import resolve_device, resolve_dtype
from .state import remove_train_state, state_dir_for, training_memory_bytes
from .loop import (DEFAULT_SEQLEN, Progress, default_warmup, evaluate_heldout, freeze_all_but, prepare, run_training,
                   trained_manifest, training_windows, unprepare)
from .lora import add_lora, check_adapter_output, lora_parameters, merge, parse_targets, save_adapter
from .losses import healing_loss
from .settings import DEFAULT_LORA_RANK, HealSettings, parse_tokens  # noqa: F401 (heal's public names)
from .teacher import (check_memory, check_same_vocabulary, load_teacher, teacher_logits, teacher_source,
                      training_estimate, weight_bytes)
from .trainables import mask_hooks, plan_training

GIVE_A_CHECKPOINT = "give a directory written by compresskit prune (any method) or an earlier compresskit heal"
@dataclass
class HealOutcome:
    model: Any
    tokenizer: Any
    out: Path
    record: dict             # the manifest (a dict) or, for an adapter, heal.json's content
    adapter: bool = False
    losses: list[float] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        d = self.record["method_details"]
        keys = ("trained", "teacher", "loss", "tokens", "steps", "trainable_params", "total_params", "resumed_from_step",
                "peak_memory", "seconds_per_step", "sparsity_kept", "lora")
        return {"out": str(self.out), "adapter": self.adapter, **{k: d.get(k) for k in keys},
                "first_loss": self.losses[0] if self.losses else None,
                "last_loss": self.losses[-1] if self.losses else None, "evals": self.evals}


def _read_input(checkpoint: Path) -> Manifest:
    if not checkpoint.exists():
        raise InputError(f"checkpoint {checkpoint} does not exist; {GIVE_A_CHECKPOINT}")
    if not checkpoint.is_dir():
        raise InputError(f"checkpoint {checkpoint} is not a directory; {GIVE_A_CHECKPOINT}")
    manifest = Manifest.read(checkpoint)
    unknown = sorted({str(e.get("kind")) for e in manifest.structure if e.get("kind") not in known_structure_kinds()})
    if unknown:
        raise InputError(f"{checkpoint}: unknown structure kind(s) {', '.join(unknown)} in its manifest "
                         "(written by a newer compresskit?); upgrade compresskit to heal it")
    return manifest


def _teacher_load_bytes(source: str, device: torch.device) -> int:
    """Bytes of the teacher's weights once loaded (fp32 on CPU, bf16 on CUDA), from its files."""
    import json

    path = builtin_model_dir(source) if is_builtin(source) else Path(source).expanduser()
    stored = weight_bytes(path)
    if stored is None:
        return 0
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    stored_dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    elem = 2 if stored_dtype in ("bfloat16", "float16") else 4
    return stored // elem * (2 if device.type == "cuda" else 4)


def _sparsity_by_tensor(params: dict[str, torch.Tensor]) -> dict[str, int]:
    return {n: int((p.detach() == 0).sum()) for n, p in params.items()}


def heal(
    checkpoint: str | Path,
    out: str | Path,
    settings: HealSettings,
    *,
    device: str = "auto",
    teacher_device: str | None = None,
    dtype: str | None = None,
    resume: bool = False,
    force: bool = False,
    progress: Progress | None = None,
) -> HealOutcome:
    """Heal ``checkpoint`` and write the result to ``out`` (see the module docstring)."""

    t_start = time.perf_counter()
    settings.check_options()
    if settings.steps is not None:
        settings.validate()
    checkpoint = Path(checkpoint).expanduser()
    source_manifest = _read_input(checkpoint)
    spec = settings.loss_spec
    teacher_name = teacher_source(source_manifest.base_model, settings.teacher) if spec.needs_teacher else None
    local_sources = [s.removeprefix("file:") for s in (*settings.data, settings.eval_data or "") if s.startswith("file:")]
    inputs = [checkpoint, *local_sources, *([teacher_name] if teacher_name and Path(teacher_name).exists() else [])]
    adapter_out = settings.train == "lora" and not settings.merge
    if adapter_out:
        check_adapter_output(Path(out), force, inputs)
    else:
        check_output_dir(out, force, input_path=checkpoint, inputs=inputs[1:])
    state_dir = state_dir_for(out)
    if state_dir.exists() and not resume:
        if not force:
            raise InputError(f"a training state from an earlier run is at {state_dir}; pass --resume to continue it "
                             "or --force to start over")
        remove_train_state(state_dir)
    dev = resolve_device(device)
    tdev = resolve_device(teacher_device) if teacher_device else dev
    out_dtype = resolve_dtype(dtype or "auto") or getattr(torch, source_manifest.dtype or "float32")

    # ---- the student, the plan, the settings resolved against the model
    t0 = time.perf_counter()
    model, tokenizer = load_with_tokenizer(checkpoint)
    seqlen, lowered = fit_seqlen(model, settings.seqlen, DEFAULT_SEQLEN)
    steps = settings.steps if settings.steps is not None else math.ceil(settings.tokens / (settings.batch_size * seqlen))
    settings = replace(settings, seqlen=seqlen, seqlen_default=lowered, steps=steps,
                       warmup=settings.warmup if settings.warmup is not None else default_warmup(steps))
    settings.validate()
    plan = plan_training(model, source_manifest, settings.train)
    peft_model = None
    if settings.train == "lora":
        with torch.random.fork_rng(devices=[]):  # the adapters' initialisation is a function of --seed
            torch.manual_seed(settings.seed)
            peft_model = add_lora(model, settings.rank, settings.alpha, parse_targets(settings.lora_targets))
        trainable = lora_parameters(peft_model)
        student = peft_model
    else:
        trainable = plan.params
        student = model
    n_trainable, n_total = freeze_all_but(student, trainable)
    zeros_before = _sparsity_by_tensor({n: model.get_parameter(n) for n in plan.masks})

    # ---- memory, then the teacher (its vocabulary checked before any training)
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    estimate = training_estimate(
        student_params=sum(p.numel() for p in student.parameters()), trainable=n_trainable,
        batch_tokens=settings.batch_size * seqlen, hidden=int(getattr(cfg, "hidden_size", 0) or 0),
        layers=int(getattr(cfg, "num_hidden_layers", 0) or 0), vocab=int(student.get_output_embeddings().weight.shape[0]),
        grad_checkpointing=settings.grad_checkpointing, student_bytes_per_param=4)
    teacher_bytes = _teacher_load_bytes(teacher_name, tdev) if teacher_name else 0
    vocab = int(student.get_output_embeddings().weight.shape[0])
    logit_bytes = settings.batch_size * seqlen * vocab * 4 if teacher_name else 0  # the teacher's fp32 logits
    memory_report = check_memory(estimate, teacher_bytes, dev, tdev, logit_bytes)
    teacher = teacher_record = None
    if teacher_name:
        teacher, teacher_tok = load_teacher(teacher_name, tdev)
        check_same_vocabulary(teacher, teacher_tok, model, tokenizer, teacher_name)
        teacher_record = {"model": teacher_name, "device": str(tdev),
                          "params": sum(p.numel() for p in teacher.parameters()),
                          "from": "--teacher" if settings.teacher else "the manifest's base_model",
                          "logits": "on the fly" + (f", top-{spec.top_k}" if spec.top_k else ", full vocabulary")}
    ids, mask, data_records = training_windows(settings, tokenizer)
    check_token_ids(model, ids, "the training data")
    eval_ids = eval_info = None
    if settings.eval_data is not None:
        eval_ids, eval_info = perplexity_tokens(tokenizer, settings.eval_data, settings.seqlen)
    load_s = time.perf_counter() - t0

    # ---- train

    prepare(student, dev, trainable, settings.grad_checkpointing)
    hooks = mask_hooks(trainable, plan.masks) if settings.train != "lora" else None

    def step_loss(m, batch: dict):
        attention = batch.get("attention_mask")
        target = None
        if teacher is not None:
            target = teacher_logits(teacher, batch, dev, spec.top_k)
        logits = m(input_ids=batch["input_ids"], attention_mask=attention).logits
        return healing_loss(spec, logits, batch["input_ids"], attention, target)

    source_id = f"{checkpoint.resolve()}@{source_manifest.created}"
    run = run_training(student, trainable, ids, mask, settings, dev, state_dir=state_dir, source_id=source_id,
                       eval_ids=eval_ids, resume=resume, progress=progress, phase="heal", step_loss=step_loss,
                       hooks=hooks)
    del teacher

    lora_record = None
    if peft_model is not None:
        lora_record = {"rank": settings.rank, "alpha": settings.alpha,
                       "targets": settings.lora_targets or "all-linear",
                       "adapted_modules": sorted({n.split(".lora_")[0].removeprefix("base_model.model.")
                                                  for n in trainable})}
        if settings.merge:
            model = merge(peft_model, plan.masks)
            student = model
            lora_record["merge"] = ("merged, then the masks re-applied: the update at the pruned entries is dropped so "
                                    "every pruned entry stays exactly zero" if plan.masks else "merged")
            if plan.masks and eval_ids is not None:
                point = evaluate_heldout(model, eval_ids, settings, dev, settings.steps)
                run.evals.append({**point, "after": "merge with the masks re-applied"})
        else:
            lora_record["merge"] = "not merged: a peft adapter whose base is the input checkpoint"
    unprepare(student, settings.grad_checkpointing, out_dtype)

    zeros_after = _sparsity_by_tensor({n: model.get_parameter(n) for n in plan.masks})
    if plan.masks:
        moved = [n for n, m in plan.masks.items() if not bool((model.get_parameter(n)[m.cpu()] == 0).all())]
        if moved or zeros_after != zeros_before:  # cannot happen: the hooks re-zero after every step
            raise RuntimeError(f"healing changed pruned entries of {moved[:3] or list(plan.masks)[:3]}")
    sparsity_kept = ({"tensors": len(plan.masks), "pruned_entries": sum(zeros_before.values()),
                      "unchanged_per_tensor": zeros_after == zeros_before} if plan.masks else None)

    tokens = settings.steps * settings.batch_size * settings.seqlen
    details = {
        "teacher": teacher_record,
        "loss": {"kind": spec.kind, "kd_weight": spec.kd_weight if spec.kind == "kd+ce" else None,
                 "temperature": spec.temperature, "kl_top_k": spec.top_k,
                 "formula": {"kd": "T^2 * mean token_kl(teacher, student, float32, T)",
                             "ce": "next-token cross-entropy",
                             "kd+ce": "w * KD + (1 - w) * CE"}[spec.kind]},
        "trained": plan.record(),
        "tokens": tokens,
        "steps": settings.steps,
        "trainable_params": n_trainable,
        "total_params": n_total,
        "trainable_fraction": n_trainable / n_total,
        "memory_estimate_bytes": {**estimate, "teacher": teacher_bytes, "gradients_and_adamw_full": training_memory_bytes(n_total)},
        "memory_check": memory_report,
        "peak_memory": run.peak,
        "seconds_per_step": run.train_s / max(1, run.steps_run),
        "resumed_from_step": run.resumed_from,
        "losses": run.losses,
        "loss_parts": run.parts,
        "evals": run.evals,
        "sparsity_kept": sparsity_kept,
        "lora": lora_record,
    }
    run_info = dict(device=str(dev), dtype=str(out_dtype).removeprefix("torch."), data_records=data_records,
                    eval_source=eval_info, timings={"load_s": load_s, "train_s": run.train_s})
    manifest = _manifest(source_manifest, checkpoint, model, settings, plan, details, run_info)
    if adapter_out:
        manifest.timings["total_s"] = time.perf_counter() - t_start
        record = manifest.model_dump()
        out_path = save_adapter(peft_model, Path(out), checkpoint.resolve(), record, force)
        remove_train_state(state_dir, strict=False)
        return HealOutcome(model=peft_model, tokenizer=tokenizer, out=out_path, record=record, adapter=True,
                           losses=run.losses, evals=run.evals)
    out_path = save_checkpoint(model, tokenizer, out, manifest, force=force)
    remove_train_state(state_dir, strict=False)
    manifest.timings["total_s"] = time.perf_counter() - t_start
    manifest.write(out_path)
    return HealOutcome(model=model, tokenizer=tokenizer, out=out_path, record=manifest.model_dump(),
                       losses=run.losses, evals=run.evals)


def _manifest(source: Manifest, checkpoint: Path, model, settings: HealSettings, plan, details: dict,
              run: dict) -> Manifest:
    return trained_manifest(source, checkpoint, model, settings, method="heal", trained={"trained": plan.describe()},
                            precision="fp32 trainable tensors", details=details, run=run)
