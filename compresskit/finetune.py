"""``compresskit finetune``: train only the low-rank factors (WeLore) and the condensed layers
(CD-MoE: the manifest's ``trainable_modules``) of a compressed checkpoint.

WeLore's "LRC-only" continual fine-tuning (methods.md §6.3): the U / V factors of every
``LowRankLinear`` train; dense (N-LRC) matrices, embeddings, norms and the head stay frozen and are
written back bit-for-bit. The reference recipe is AdamW at lr 5e-5 with a cosine schedule to 0.1 of
the peak after a linear warmup, batch 4, bf16; here the parameters train in fp32 (bf16 autocast on
CUDA, plain fp32 on CPU) and the output is cast back to the checkpoint's dtype.

Training windows come from any calibration source (``CalibrationSpec``: c4, file:..., hf:...), one
window per row, ``steps × batch_size`` rows drawn once with the seed, so step s always sees rows
[s·B, (s+1)·B): a resumed run sees exactly the batches the uninterrupted run would have.

Every ``save_every`` steps the trainable factors, the AdamW state, the step and the RNG state are
written atomically to ``<out>.train-state/``; ``resume=True`` continues from there and, on CPU,
ends with the same weights as an uninterrupted run. The state is removed once the final
checkpoint (a normal compresskit checkpoint, atomic) is written.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

import torch

from .checkpoint import Manifest, check_output_dir, load_with_tokenizer, save_checkpoint
from .errors import InputError
from .lowrank.finetune_utils import cosine_with_warmup
from .lowrank.layer import LowRankLinear
from .training_state import (PeakMemory, load_train_state, remove_train_state, save_train_state, state_dir_for,
                             training_memory_bytes)

Progress = Callable[[str, int, int, str], None]
#: WeLore's fine-tuning window; an unset --seqlen is this, fitted to the model's context.
DEFAULT_SEQLEN = 512
#: what finetune trains: WeLore's low-rank factors and CD-MoE's condensed layers
GIVE_A_CHECKPOINT = ("give a directory written by compresskit prune --method welore (low-rank factors) or "
                     "--method cdmoe (condensed layers)")
NOTHING_TO_TRAIN = ("nothing to fine-tune: the checkpoint has no low-rank factors or condensed experts; compress it "
                    "with --method welore (without --merge) or --method cdmoe first")


@dataclass(frozen=True)
class FinetuneSettings:
    """Everything that decides the trained weights (plus evaluation / saving cadence)."""

    data: tuple[str, ...]
    steps: int
    lr: float = 5e-5
    batch_size: int = 4
    #: None: ``DEFAULT_SEQLEN`` (WeLore's 512), lowered to the model's context when shorter; the
    #: default that was lowered is then recorded as ``seqlen_default``
    seqlen: int | None = None
    seqlen_default: int | None = None
    #: None: ``default_warmup(steps)`` = min(100, 10 % of the steps), resolved at construction.
    warmup: int | None = None
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    data_format: str = "window"
    text_field: str | None = None
    seed: int = 0
    grad_checkpointing: bool = False
    eval_data: str | None = None
    eval_every: int = 100
    eval_windows: int = 8
    save_every: int = 100

    # Changing these does not change the trained weights, so a resumed run may change them.
    CADENCE = ("grad_checkpointing", "eval_data", "eval_every", "eval_windows", "save_every", "seqlen_default")

    def __post_init__(self) -> None:
        if self.warmup is None and isinstance(self.steps, int) and not isinstance(self.steps, bool):
            object.__setattr__(self, "warmup", default_warmup(self.steps))

    def validate(self) -> None:
        if not self.data:
            raise InputError("pass --data SOURCE (a calibration source such as file:corpus.jsonl or c4)")
        for name in ("steps", "batch_size", "seqlen", "eval_every", "eval_windows", "save_every"):
            value = getattr(self, name)
            if name == "seqlen" and value is None:
                continue  # fitted to the model once it is loaded
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
        if not self.lr > 0:
            raise InputError(f"--lr must be > 0, got {self.lr:g}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or not 0 <= self.warmup <= self.steps:
            raise InputError(f"--warmup must be in [0, --steps {self.steps}], got {self.warmup}; e.g. --warmup {self.steps // 10}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise InputError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio:g}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise InputError(f"--max-grad-norm must be > 0, got {self.max_grad_norm:g}")

    def resume_key(self) -> dict[str, Any]:
        """The settings a saved training state must share with the run that resumes it."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self.CADENCE}


def default_warmup(steps: int) -> int:
    """Warmup steps when none are given: 100 (the reference's) but never more than 10 % of the run."""
    return max(0, min(100, steps // 10))


@dataclass
class FinetuneOutcome:
    model: Any
    tokenizer: Any
    manifest: Manifest
    out: Path
    losses: list[float] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        d = self.manifest.method_details
        keys = ("trainable_params", "total_params", "trainable_fraction", "resumed_from_step", "peak_memory",
                "memory_estimate_bytes", "seconds_per_step", "full_finetune_comparison")
        return {"out": str(self.out), **{k: d.get(k) for k in keys}, "first_loss": self.losses[0] if self.losses else None,
                "last_loss": self.losses[-1] if self.losses else None, "evals": self.evals}


# --------------------------------------------------------------------------- data
def training_windows(settings: FinetuneSettings, tokenizer) -> tuple[torch.Tensor, torch.Tensor | None, list[dict]]:
    """``steps × batch_size`` rows of ``seqlen`` tokens, interleaved over the ``data`` sources."""
    from .calibration import CalibrationSpec, load_calibration

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


def _batch(ids: torch.Tensor, mask: torch.Tensor | None, step: int, size: int, device) -> dict[str, torch.Tensor]:
    rows = slice(step * size, (step + 1) * size)
    input_ids = ids[rows].to(device)
    labels = input_ids.clone()
    batch = {"input_ids": input_ids, "labels": labels}
    if mask is not None:
        batch["attention_mask"] = mask[rows].to(device)
        labels[batch["attention_mask"] == 0] = -100
    return batch


# --------------------------------------------------------------------------- training
def lowrank_parameters(model) -> dict[str, torch.nn.Parameter]:
    """Name -> parameter of every U / V factor weight, in module order."""
    return {f"{name}.{part}.weight": getattr(module, part).weight
            for name, module in model.named_modules() if isinstance(module, LowRankLinear) for part in ("U", "V")}


def declared_trainable_modules(manifest: Manifest) -> list[str]:
    """Module paths a structural stage declares trainable (``method_details.trainable_modules``:
    CD-MoE's condensed layers), over this checkpoint's stage and every earlier one."""
    records = [manifest.method_details, *(stage.get("method_details", {}) for stage in manifest.stages)]
    return list(dict.fromkeys(path for details in records for path in details.get("trainable_modules", []) or []))


def trainable_parameters(model, manifest: Manifest) -> dict[str, torch.nn.Parameter]:
    """Low-rank U / V factors plus every parameter of the declared trainable modules."""
    params = lowrank_parameters(model)
    for path in declared_trainable_modules(manifest):
        params.update({f"{path}.{n}": p for n, p in model.get_submodule(path).named_parameters()})
    return params


def freeze_all_but(model, trainable: dict[str, torch.nn.Parameter]) -> tuple[int, int]:
    """Only ``trainable`` gets gradients; returns (trainable, total) element counts."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trainable.values():
        p.requires_grad_(True)
    params = list(model.parameters())  # deduplicated: tied weights count once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def _prepare(model, device: torch.device, trainable: dict[str, torch.nn.Parameter], grad_checkpointing: bool) -> None:
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


def _evaluate(model, eval_ids: torch.Tensor | None, settings: FinetuneSettings, device, step: int) -> dict | None:
    if eval_ids is None:
        return None
    from .evaluation.perplexity import windowed_perplexity

    model.eval()
    with _autocast(device):
        result = windowed_perplexity(model, eval_ids, settings.seqlen, device=device, max_windows=settings.eval_windows)
    model.train()
    return {"step": step, "ppl": result["value"], "windows": result["n_windows"], "tokens": result["tokens"]}


def train_loop(model, params: list[torch.nn.Parameter], ids, mask, settings: FinetuneSettings, device,
               start: int = 0, optimizer_state: dict | None = None, on_step: Callable | None = None,
               stop: int | None = None) -> tuple[torch.optim.Optimizer, list[float]]:
    """AdamW + cosine-with-warmup over steps [start, stop); returns the optimizer and the losses.

    The learning rate of step s is ``lr · cosine_with_warmup(s, steps, warmup, min_lr_ratio)``,
    set before the step, so the schedule is a pure function of s (nothing else to save).
    """
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    losses = []
    for step in range(start, settings.steps if stop is None else stop):
        lr = settings.lr * cosine_with_warmup(step, settings.steps, settings.warmup, settings.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with _autocast(device):
            loss = model(**_batch(ids, mask, step, settings.batch_size, device)).loss
        loss.backward()
        if settings.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step + 1, losses[-1], lr, optimizer)
    return optimizer, losses


# --------------------------------------------------------------------------- the command
def finetune(
    checkpoint: str | Path,
    out: str | Path,
    settings: FinetuneSettings,
    *,
    device: str = "auto",
    dtype: str | None = None,
    resume: bool = False,
    force: bool = False,
    compare_full: bool = False,
    compare_steps: int = 5,
    progress: Progress | None = None,
) -> FinetuneOutcome:
    """Fine-tune the low-rank factors of ``checkpoint`` and write the result to ``out``."""
    from .models.loading import resolve_device, resolve_dtype

    t_start = time.perf_counter()
    settings.validate()
    checkpoint = Path(checkpoint).expanduser()
    source_manifest = _read_input_manifest(checkpoint)
    local_sources = [s.removeprefix("file:") for s in (*settings.data, settings.eval_data or "")
                     if s.startswith("file:")]
    check_output_dir(out, force, input_path=checkpoint, inputs=local_sources)
    state_dir = state_dir_for(out)
    if state_dir.exists() and not resume:
        if not force:
            raise InputError(f"a training state from an earlier run is at {state_dir}; pass --resume to continue it "
                             "or --force to start over")
        remove_train_state(state_dir)  # its own files only: anything else in it refuses --force
    dev = resolve_device(device)
    out_dtype = resolve_dtype(dtype or "auto") or getattr(torch, source_manifest.dtype or "float32")

    t0 = time.perf_counter()
    model, tokenizer = load_with_tokenizer(checkpoint)
    from .models.context import fit_seqlen

    seqlen, lowered = fit_seqlen(model, settings.seqlen, DEFAULT_SEQLEN)
    settings = replace(settings, seqlen=seqlen, seqlen_default=lowered)
    trainable = trainable_parameters(model, source_manifest)
    if not trainable:
        raise InputError(NOTHING_TO_TRAIN)
    n_trainable, n_total = freeze_all_but(model, trainable)
    ids, mask, data_records = training_windows(settings, tokenizer)
    eval_ids = None
    if settings.eval_data is not None:
        from .evaluation.perplexity import perplexity_tokens

        eval_ids, eval_info = perplexity_tokens(tokenizer, settings.eval_data, settings.seqlen)
    load_s = time.perf_counter() - t0

    _prepare(model, dev, trainable, settings.grad_checkpointing)  # first: the saved factors are fp32 masters
    start, losses, evals, resumed_from = 0, [], [], None
    optimizer_state = None
    # The input's identity: its path and creation time (a checkpoint rewritten in place is another input).
    source_id = f"{checkpoint.resolve()}@{source_manifest.created}"
    saved = load_train_state(state_dir, settings.resume_key(), source_id) if resume else None
    if saved is not None:
        if {k: tuple(v.shape) for k, v in saved["factors"].items()} != {k: tuple(p.shape) for k, p in trainable.items()}:
            raise InputError(f"the training state in {state_dir} does not fit this checkpoint's factors; "
                             "pass --force to start over")
        with torch.no_grad():
            for name, value in saved["factors"].items():
                trainable[name].copy_(value)
        torch.set_rng_state(saved["rng"]["torch"])
        start, losses, evals, resumed_from = saved["step"], saved["losses"], saved["evals"], saved["step"]
        optimizer_state = saved["optimizer"]
    params = list(trainable.values())
    if start == 0 and eval_ids is not None:
        evals.append(_evaluate(model, eval_ids, settings, dev, 0))

    def on_step(step: int, loss: float, lr: float, optimizer) -> None:
        losses.append(loss)
        if eval_ids is not None and (step % settings.eval_every == 0 or step == settings.steps):
            evals.append(_evaluate(model, eval_ids, settings, dev, step))
        if step % settings.save_every == 0 and step < settings.steps:
            save_train_state(state_dir, step=step, key=settings.resume_key(), source=source_id,
                             factors=trainable, optimizer=optimizer, losses=losses, evals=evals)
        if progress is not None:
            ppl = f" · eval ppl {evals[-1]['ppl']:.2f}" if evals else ""
            progress("finetune", step, settings.steps, f"loss {loss:.4f} · lr {lr:.2e}{ppl}")

    memory = PeakMemory(dev)
    memory.start()
    t0 = time.perf_counter()
    train_loop(model, params, ids, mask, settings, dev, start=start, optimizer_state=optimizer_state, on_step=on_step)
    train_s = time.perf_counter() - t0
    peak = memory.stop()

    if settings.grad_checkpointing:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
    model.eval().to(device="cpu", dtype=out_dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    manifest = _manifest(source_manifest, checkpoint, model, settings, dict(
        device=str(dev), dtype=str(out_dtype).removeprefix("torch."), data_records=data_records,
        eval_source=eval_info if eval_ids is not None else None, n_trainable=n_trainable, n_total=n_total,
        losses=losses, evals=evals, resumed_from=resumed_from, peak=peak,
        seconds_per_step=train_s / max(1, settings.steps - start),
        timings={"load_s": load_s, "train_s": train_s},
    ))
    out_path = save_checkpoint(model, tokenizer, out, manifest, force=force)
    remove_train_state(state_dir, strict=False)
    if compare_full:
        manifest.method_details["full_finetune_comparison"] = measure_full_finetune(
            checkpoint, settings, dev, ids, mask, min(compare_steps, settings.steps))
    manifest.timings["total_s"] = time.perf_counter() - t_start
    manifest.write(out_path)
    return FinetuneOutcome(model=model, tokenizer=tokenizer, manifest=manifest, out=out_path, losses=losses, evals=evals)


def _read_input_manifest(checkpoint: Path) -> Manifest:
    """The input's manifest, or the real reason it cannot be fine-tuned (missing, not a
    checkpoint, a structure this version cannot rebuild, no low-rank factors)."""
    from .checkpoint.io import known_structure_kinds

    if not checkpoint.exists():
        raise InputError(f"checkpoint {checkpoint} does not exist; {GIVE_A_CHECKPOINT}")
    if not checkpoint.is_dir():
        raise InputError(f"checkpoint {checkpoint} is not a directory; {GIVE_A_CHECKPOINT}")
    manifest = Manifest.read(checkpoint)
    kinds = [entry.get("kind") for entry in manifest.structure]
    unknown = sorted({str(k) for k in kinds if k not in known_structure_kinds()})
    if unknown:
        raise InputError(f"{checkpoint}: unknown structure kind(s) {', '.join(unknown)} in its manifest "
                         "(written by a newer compresskit?); upgrade compresskit to fine-tune it")
    if "lowrank" not in kinds and not declared_trainable_modules(manifest):
        raise InputError(NOTHING_TO_TRAIN)
    return manifest


def measure_full_finetune(checkpoint: Path, settings: FinetuneSettings, device, ids, mask, steps: int) -> dict:
    """Peak memory and time per step of ``steps`` steps training *every* parameter of the same
    checkpoint with the same data, optimizer and precision (the weights are discarded)."""
    import gc

    gc.collect()
    model, _ = load_with_tokenizer(checkpoint)
    params = dict(model.named_parameters())
    for p in params.values():
        p.requires_grad_(True)
    _prepare(model, device, {} if device.type != "cuda" else params, settings.grad_checkpointing)
    memory = PeakMemory(device)
    memory.start()
    t0 = time.perf_counter()
    _, losses = train_loop(model, list(params.values()), ids, mask, settings, device, stop=steps)
    seconds = time.perf_counter() - t0
    peak = memory.stop()
    n = sum(p.numel() for p in params.values())
    del model, params
    gc.collect()
    return {"steps": steps, "trainable_params": n, "peak_memory": peak, "seconds_per_step": seconds / steps,
            "losses": losses, "memory_estimate_bytes": training_memory_bytes(n)}


def _trainable_label(source: Manifest) -> str:
    modules = declared_trainable_modules(source)
    label = "lowrank factors (U, V)"
    return f"{label} + modules {', '.join(modules)}" if modules else label


def _manifest(source: Manifest, checkpoint: Path, model, settings: FinetuneSettings, run: dict) -> Manifest:
    from .evaluation.sparsity import count_parameters, measure_sparsity
    from .models import get_adapter

    record = source.model_dump(exclude={"stages"})
    record["sparsity"] = {k: v for k, v in source.sparsity.items() if k != "per_module"}
    record["path"] = str(checkpoint)
    measured = measure_sparsity(get_adapter(model))
    total = count_parameters(model)
    hyper = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(settings).items()}
    return Manifest(
        base_model=source.base_model,
        revision=source.revision,
        method="finetune",
        hyperparameters={**hyper, "trainable": _trainable_label(source), "optimizer": "AdamW",
                         "schedule": "cosine with linear warmup", "device": run["device"],
                         "precision": "bf16 autocast, fp32 factors" if run["device"].startswith("cuda") else "fp32"},
        calibration={"training_data": run["data_records"], "eval_data": run["eval_source"]},
        method_details={
            "trainable_params": run["n_trainable"],
            "total_params": run["n_total"],
            "trainable_fraction": run["n_trainable"] / run["n_total"],
            "full_finetune_trainable_params": run["n_total"],
            "memory_estimate_bytes": {"lowrank_only": training_memory_bytes(run["n_trainable"]),
                                      "full": training_memory_bytes(run["n_total"])},
            "peak_memory": run["peak"],
            "seconds_per_step": run["seconds_per_step"],
            "resumed_from_step": run["resumed_from"],
            "losses": run["losses"],
            "evals": run["evals"],
        },
        sparsity=measured,
        parameters={"total_before": total, "total_after": total, "trainable": run["n_trainable"],
                    "decoder_linear": measured["decoder_linear_params"],
                    "decoder_linear_nonzero": measured["decoder_linear_params"] - measured["decoder_linear_zeros"]},
        structure=source.structure,
        storage=source.storage,
        loadable_with_transformers=source.loadable_with_transformers,
        dtype=run["dtype"],
        timings=run["timings"],
        stages=[*source.stages, record],
    )
