"""``compresskit finetune``: train only the low-rank factors (WeLore) and the condensed layers
(CD-MoE: the manifest's ``trainable_modules``) of a compressed checkpoint, with next-token
cross-entropy. Kept as the alias of today's behaviour and flags; the trainer is healing's
(``compresskit/heal/loop.py``: data order, resumable state, held-out curve, progress), which
``compresskit heal`` also runs with distillation and any checkpoint kind.

WeLore's "LRC-only" continual fine-tuning (methods.md §6.3): the U / V factors of every
``LowRankLinear`` train; dense (N-LRC) matrices, embeddings, norms and the head stay frozen and are
written back bit-for-bit. The reference recipe is AdamW at lr 5e-5 with a cosine schedule to 0.1 of
the peak after a linear warmup, batch 4, bf16; here the parameters train in fp32 (bf16 autocast on
CUDA, plain fp32 on CPU) and the output is cast back to the checkpoint's dtype.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import Manifest, check_output_dir, load_with_tokenizer, save_checkpoint
from ..errors import InputError
from .loop import (DEFAULT_SEQLEN, Progress, TrainSettings, default_warmup, evaluate_heldout, freeze_all_but,
                        prepare, run_training, train_loop, trained_manifest, training_windows, unprepare)
from .trainables import declared_trainable_modules, lowrank_parameters
from .state import PeakMemory, remove_train_state, state_dir_for, training_memory_bytes

#: today's name of the trainer's settings
FinetuneSettings = TrainSettings
__all__ = ["DEFAULT_SEQLEN", "FinetuneOutcome", "FinetuneSettings", "Progress", "default_warmup", "evaluate_heldout",
           "finetune", "freeze_all_but", "train_loop", "training_windows", "trainable_parameters"]
#: what finetune trains: WeLore's low-rank factors and CD-MoE's condensed layers
GIVE_A_CHECKPOINT = ("give a directory written by compresskit prune --method welore (low-rank factors) or "
                     "--method cdmoe (condensed layers)")
NOTHING_TO_TRAIN = ("nothing to fine-tune: the checkpoint has no low-rank factors or condensed experts; compress it "
                    "with --method welore (without --merge) or --method cdmoe first")


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


def trainable_parameters(model, manifest: Manifest) -> dict[str, torch.nn.Parameter]:
    """Low-rank U / V factors plus every parameter of the declared trainable modules."""
    params = lowrank_parameters(model)
    for path in declared_trainable_modules(manifest):
        params.update({f"{path}.{n}": p for n, p in model.get_submodule(path).named_parameters()})
    return params


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
    from ..models.loading import resolve_device, resolve_dtype

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
    from ..models.context import check_token_ids, fit_seqlen

    seqlen, lowered = fit_seqlen(model, settings.seqlen, DEFAULT_SEQLEN)
    settings = replace(settings, seqlen=seqlen, seqlen_default=lowered)
    trainable = trainable_parameters(model, source_manifest)
    if not trainable:
        raise InputError(NOTHING_TO_TRAIN)
    n_trainable, n_total = freeze_all_but(model, trainable)
    ids, mask, data_records = training_windows(settings, tokenizer)
    check_token_ids(model, ids, "the training data")
    eval_ids = None
    if settings.eval_data is not None:
        from ..evaluation.perplexity import perplexity_tokens

        eval_ids, eval_info = perplexity_tokens(tokenizer, settings.eval_data, settings.seqlen)
    load_s = time.perf_counter() - t0

    prepare(model, dev, trainable, settings.grad_checkpointing)  # first: the saved factors are fp32 masters
    # The input's identity: its path and creation time (a checkpoint rewritten in place is another input).
    source_id = f"{checkpoint.resolve()}@{source_manifest.created}"
    run = run_training(model, trainable, ids, mask, settings, dev, state_dir=state_dir, source_id=source_id,
                       eval_ids=eval_ids, resume=resume, progress=progress, phase="finetune")
    losses, evals = run.losses, run.evals
    unprepare(model, settings.grad_checkpointing, out_dtype)
    manifest = _manifest(source_manifest, checkpoint, model, settings, dict(
        device=str(dev), dtype=str(out_dtype).removeprefix("torch."), data_records=data_records,
        eval_source=eval_info if eval_ids is not None else None, n_trainable=n_trainable, n_total=n_total,
        losses=losses, evals=evals, resumed_from=run.resumed_from, peak=run.peak,
        seconds_per_step=run.train_s / max(1, run.steps_run),
        timings={"load_s": load_s, "train_s": run.train_s},
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
    from ..checkpoint.structure import known_structure_kinds

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
    prepare(model, device, {} if device.type != "cuda" else params, settings.grad_checkpointing)
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
    details = {
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
    }
    return trained_manifest(source, checkpoint, model, settings, method="finetune",
                            trained={"trainable": _trainable_label(source)}, precision="fp32 factors",
                            details=details, run=run)
