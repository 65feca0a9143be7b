"""The one trainer behind ``compresskit heal`` and its alias ``compresskit finetune``.

AdamW with a cosine schedule to ``min_lr_ratio`` of the peak after a linear warmup (WeLore's
reference recipe, methods.md §6.3); trainable tensors in fp32 (bf16 autocast on CUDA, plain fp32
on CPU). What is trained, which loss and what happens after each step (masks re-applied) are the
caller's: ``run_training`` takes the trainable tensors, a ``step_loss`` and ``hooks``.

Data: ``steps × batch_size`` windows drawn once with the seed (any calibration source), so step
s always sees rows [s·B, (s+1)·B): a resumed run sees exactly the batches the uninterrupted run
would have. Every ``save_every`` steps the trainable tensors, the AdamW state, the step, the RNG
state, the losses and the held-out curve are written atomically to ``<out>.train-state/``
(``heal/state.py``); ``resume`` continues from there and, on CPU, ends with the same weights
as an uninterrupted run. Ctrl-C leaves the last saved state and never a partial output.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..calibration import CalibrationSpec, load_calibration
from ..checkpoint import Manifest
from ..errors import InputError
from ..evaluation.perplexity import windowed_perplexity
from ..evaluation.sparsity import count_parameters, measure_sparsity, trained_parameter_counts
from ..models import get_adapter
from .state import PeakMemory, load_train_state, save_train_state
from .settings import DEFAULT_SEQLEN, TrainSettings, default_warmup  # noqa: F401 (the trainer's names)

Progress = Callable[[str, int, int, str], None]
# --------------------------------------------------------------------------- data
def training_windows(settings: TrainSettings, tokenizer) -> tuple[torch.Tensor, torch.Tensor | None, list[dict]]:
    """``steps × batch_size`` rows of ``seqlen`` tokens, interleaved over the ``data`` sources."""

    total = settings.steps * settings.batch_size
    per_source = math.ceil(total / len(settings.data))
    ids, masks, records = [], [], []
    for source in settings.data:
        spec = CalibrationSpec(source=source, format=settings.data_format, nsamples=per_source,
                               seqlen=settings.seqlen, seed=settings.seed, text_field=settings.text_field)
        calib = load_calibration(spec, tokenizer)
        ids.append(calib.input_ids)
        masks.append(calib.attention_mask)
        records.append(dict(spec.to_dict(), hash=calib.hash, **calib.provenance()))
    # Row r comes from source r mod S, so every batch mixes the sources.
    input_ids = torch.stack(ids, dim=1).reshape(-1, settings.seqlen)[:total]
    mask = None
    if any(m is not None for m in masks):
        full = [m if m is not None else torch.ones_like(i) for m, i in zip(masks, ids)]
        mask = torch.stack(full, dim=1).reshape(-1, settings.seqlen)[:total]
    return input_ids, mask, records


def batch_at(ids: torch.Tensor, mask: torch.Tensor | None, step: int, size: int, device) -> dict[str, torch.Tensor]:
    """Step ``step``'s rows: ``input_ids``, ``labels`` (padding -100) and the attention mask when padded."""
    rows = slice(step * size, (step + 1) * size)
    input_ids = ids[rows].to(device)
    labels = input_ids.clone()
    batch = {"input_ids": input_ids, "labels": labels}
    if mask is not None:
        batch["attention_mask"] = mask[rows].to(device)
        labels[batch["attention_mask"] == 0] = -100
    return batch


# --------------------------------------------------------------------------- model preparation
def cosine_with_warmup(step: int, total: int, warmup: int, min_lr_ratio: float = 0.1) -> float:
    """Learning-rate multiplier at ``step`` (0-based): WeLore's schedule (the ReLoRA scheduler its
    reference imports, ``peft_pretraining/training_utils.py``, single cycle; methods.md §6.3).

    * warmup (step < warmup): step / warmup, so 0 at step 0 and 1 at the end of warmup;
    * then r + (1 − r) · ½ · (1 + cos(π · t)), t = (step − warmup) / (total − warmup) clamped to
      [0, 1], r = ``min_lr_ratio``: 1 at the end of warmup, (1 + r)/2 halfway, r from ``total`` on.
    """
    if total <= 0 or not 0 <= warmup <= total:
        raise ValueError(f"need 0 <= warmup <= total, total > 0; got {warmup=}, {total=}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    if step < warmup:
        return step / warmup
    if total == warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / (total - warmup))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def freeze_all_but(model, trainable: dict[str, torch.nn.Parameter]) -> tuple[int, int]:
    """Only ``trainable`` gets gradients; returns (trainable, total) element counts."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trainable.values():
        p.requires_grad_(True)
    params = list(model.parameters())  # deduplicated: tied weights count once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def prepare(model, device: torch.device, trainable: dict[str, torch.nn.Parameter], grad_checkpointing: bool) -> None:
    """fp32 on CPU; on CUDA frozen weights keep their dtype and trainable ones become fp32 masters."""
    if device.type == "cuda":
        model.to(device)
        for p in trainable.values():
            p.data = p.data.float()
    else:
        model.to(device=device, dtype=torch.float32)
    model.config.use_cache = False
    if grad_checkpointing:
        # Non-reentrant: the frozen embedding output needs no grad, which the reentrant variant cannot handle.
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:  # transformers >= 5.x name; gradient_checkpointing_* is deprecated
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()


def unprepare(model, grad_checkpointing: bool, dtype: torch.dtype) -> None:
    """Back to inference: checkpointing off, eval mode, CPU, the output dtype, no gradients."""
    if grad_checkpointing:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
    model.eval().to(device="cpu", dtype=dtype)
    for p in model.parameters():
        p.requires_grad_(False)


def evaluate_heldout(model, eval_ids: torch.Tensor | None, settings: TrainSettings, device, step: int) -> dict | None:
    """Held-out perplexity at ``step`` (the curve's point; ``train_tokens`` = tokens trained on so far)."""
    if eval_ids is None:
        return None

    was_training = model.training
    model.eval()
    with torch.no_grad(), autocast(device):
        result = windowed_perplexity(model, eval_ids, settings.seqlen, device=device, max_windows=settings.eval_windows)
    model.train(was_training)
    return {"step": step, "train_tokens": step * settings.tokens_per_step, "ppl": result["value"],
            "windows": result["n_windows"], "tokens": result["tokens"]}


# --------------------------------------------------------------------------- the loop
StepLoss = Callable[[Any, dict], "tuple[torch.Tensor, dict[str, float]]"]


def ce_step_loss(model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    """Next-token cross-entropy as the model computes it (``finetune``'s loss)."""
    return model(**batch).loss, {}


@dataclass
class StepHooks:
    """Called around every optimizer step: ``after_backward`` (e.g. zero the pruned entries'
    gradients) and ``after_step`` (e.g. re-apply the masks)."""

    after_backward: Callable[[], None] | None = None
    after_step: Callable[[], None] | None = None


def train_loop(model, params: list[torch.nn.Parameter], ids, mask, settings: TrainSettings, device,
               start: int = 0, optimizer_state: dict | None = None, on_step: Callable | None = None,
               stop: int | None = None, step_loss: StepLoss = ce_step_loss,
               hooks: StepHooks | None = None) -> tuple[torch.optim.Optimizer, list[float]]:
    """AdamW + cosine-with-warmup over steps [start, stop); returns the optimizer and the losses.

    The learning rate of step s is ``lr · cosine_with_warmup(s, steps, warmup, min_lr_ratio)``,
    set before the step, so the schedule is a pure function of s (nothing else to save).
    ``on_step(step, loss, lr, optimizer, parts)`` after each step.
    """
    hooks = hooks or StepHooks()
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    losses = []
    for step in range(start, settings.steps if stop is None else stop):
        lr = settings.lr * cosine_with_warmup(step, settings.steps, settings.warmup, settings.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast(device):
            loss, parts = step_loss(model, batch_at(ids, mask, step, settings.batch_size, device))
        loss.backward()
        if hooks.after_backward is not None:
            hooks.after_backward()
        if settings.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if hooks.after_step is not None:
            hooks.after_step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step + 1, losses[-1], lr, optimizer, parts)
    return optimizer, losses


@dataclass
class TrainRun:
    """What ``run_training`` did: per-step losses (and their parts), the held-out curve, timings."""

    losses: list[float] = field(default_factory=list)
    parts: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    resumed_from: int | None = None
    peak: dict = field(default_factory=dict)
    train_s: float = 0.0
    steps_run: int = 0


def run_training(model, trainable: dict[str, torch.nn.Parameter], ids, mask, settings: TrainSettings, device, *,
                 state_dir: Path, source_id: str, eval_ids: torch.Tensor | None = None, resume: bool = False,
                 progress: Progress | None = None, phase: str = "finetune", step_loss: StepLoss = ce_step_loss,
                 hooks: StepHooks | None = None, state_key: dict | None = None) -> TrainRun:
    """Train ``trainable`` (already prepared on ``device``) for ``settings.steps`` steps, resuming
    from ``state_dir`` when asked, evaluating every ``eval_every`` steps and saving the resumable
    state every ``save_every`` steps. ``state_key``: the settings a resume must share (default
    ``settings.resume_key()``)."""
    key = settings.resume_key() if state_key is None else state_key
    run = TrainRun()
    start, optimizer_state = 0, None
    saved = load_train_state(state_dir, key, source_id) if resume else None
    if saved is not None:
        if {k: tuple(v.shape) for k, v in saved["factors"].items()} != {k: tuple(p.shape) for k, p in trainable.items()}:
            raise InputError(f"the training state in {state_dir} does not fit this checkpoint's trainable tensors; "
                             "pass --force to start over")
        with torch.no_grad():
            for name, value in saved["factors"].items():
                trainable[name].copy_(value)
        torch.set_rng_state(saved["rng"]["torch"])
        start, run.resumed_from = saved["step"], saved["step"]
        run.losses, run.evals = list(saved["losses"]), list(saved["evals"])
        run.parts = list((saved.get("extra") or {}).get("parts", []))
        optimizer_state = saved["optimizer"]
    params = list(trainable.values())
    if start == 0 and eval_ids is not None:
        run.evals.append(evaluate_heldout(model, eval_ids, settings, device, 0))

    def on_step(step: int, loss: float, lr: float, optimizer, parts: dict) -> None:
        run.losses.append(loss)
        run.parts.append(parts)
        if eval_ids is not None and (step % settings.eval_every == 0 or step == settings.steps):
            run.evals.append(evaluate_heldout(model, eval_ids, settings, device, step))
        if step % settings.save_every == 0 and step < settings.steps:
            save_train_state(state_dir, step=step, key=key, source=source_id, factors=trainable, optimizer=optimizer,
                             losses=run.losses, evals=run.evals, extra={"parts": run.parts})
        if progress is not None:
            ppl = f" · eval ppl {run.evals[-1]['ppl']:.2f}" if run.evals else ""
            progress(phase, step, settings.steps, f"loss {loss:.4f} · lr {lr:.2e}{ppl}")

    memory = PeakMemory(device)
    memory.start()
    t0 = time.perf_counter()
    train_loop(model, params, ids, mask, settings, device, start=start, optimizer_state=optimizer_state,
               on_step=on_step, step_loss=step_loss, hooks=hooks)
    run.train_s = time.perf_counter() - t0
    run.peak = memory.stop()
    run.steps_run = settings.steps - start
    return run


def trained_manifest(source: Manifest, checkpoint: Path, model, settings: TrainSettings, *, method: str,
                     trained: Any, precision: str, details: dict, run: dict) -> Manifest:
    """The manifest of a trained checkpoint (``heal`` and ``finetune``): the input's kind, storage
    and form kept, the training settings as hyperparameters, sparsity and parameter counts measured
    on the trained model, and the input's own record appended to ``stages``."""
    record = source.model_dump(exclude={"stages"})
    record["sparsity"] = {k: v for k, v in source.sparsity.items() if k != "per_module"}
    record["path"] = str(checkpoint)
    measured = measure_sparsity(get_adapter(model))
    hyper = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(settings).items()}
    on_cuda = run["device"].startswith("cuda")
    return Manifest(
        base_model=source.base_model,
        revision=source.revision,
        method=method,
        hyperparameters={**hyper, **trained, "optimizer": "AdamW", "schedule": "cosine with linear warmup",
                         "device": run["device"], "precision": f"bf16 autocast, {precision}" if on_cuda else "fp32"},
        calibration={"training_data": run["data_records"], "eval_data": run["eval_source"]},
        method_details=details,
        sparsity=measured,
        parameters=trained_parameter_counts(count_parameters(model), details["trainable_params"], measured),
        structure=source.structure,
        storage=source.storage,
        loadable_with_transformers=source.loadable_with_transformers,
        form_reason=source.form_reason,
        dtype=run["dtype"],
        timings=run["timings"],
        stages=[*source.stages, record],
    )
