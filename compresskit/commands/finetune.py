"""``compresskit finetune``: train only the low-rank factors (U, V) of a WeLore checkpoint and the
condensed layers of a CD-MoE checkpoint (the modules its manifest names as trainable)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from .console import console as make_console
from .progress import PhaseProgress
from .training_options import (BatchSize, Data, DataFormat, Device, Dtype, EvalData, EvalEvery, EvalWindows, Force,
                               GradCheckpointing, JsonOut, MaxGradNorm, MinLrRatio, Quiet, Resume, SaveEvery, Seed,
                               Seqlen, TextField, WeightDecay, Warmup, loop_settings, mib)


def register(app: typer.Typer) -> None:
    @app.command()
    def finetune(
        checkpoint: Path = typer.Argument(..., help="A compresskit checkpoint with low-rank factors (prune --method welore) or condensed MoE layers (prune --method cdmoe)."),
        data: Data = ...,
        steps: int = typer.Option(..., help="Optimizer steps."),
        out: Path = typer.Option(..., "--out", "-o", help="Output checkpoint directory (written atomically)."),
        lr: float = typer.Option(5e-5, help="Peak learning rate (WeLore: 5e-5)."),
        batch_size: BatchSize = 4,
        seqlen: Seqlen = None,
        warmup: Warmup = None,
        min_lr_ratio: MinLrRatio = 0.1,
        weight_decay: WeightDecay = 0.0,
        max_grad_norm: MaxGradNorm = 1.0,
        data_format: DataFormat = "window",
        text_field: TextField = None,
        grad_checkpointing: GradCheckpointing = False,
        eval_data: EvalData = None,
        eval_every: EvalEvery = 100,
        eval_windows: EvalWindows = 8,
        save_every: SaveEvery = 100,
        resume: Resume = False,
        compare_full: bool = typer.Option(False, "--compare-full", help="Also time a short full fine-tune (all parameters) for memory."),
        compare_steps: int = typer.Option(5, help="Steps of the --compare-full run."),
        device: Device = "auto",
        dtype: Dtype = None,
        seed: Seed = 0,
        force: Force = False,
        json_out: JsonOut = False,
        quiet: Quiet = False,
    ):
        """Fine-tune only WeLore's low-rank factors and CD-MoE's condensed layers (everything else frozen) and write a new checkpoint."""
        from ..heal.finetune import FinetuneSettings, finetune as run

        settings = FinetuneSettings(steps=steps, lr=lr, **loop_settings(
            data=data, batch_size=batch_size, seqlen=seqlen, warmup=warmup, min_lr_ratio=min_lr_ratio,
            weight_decay=weight_decay, max_grad_norm=max_grad_norm, data_format=data_format, text_field=text_field,
            grad_checkpointing=grad_checkpointing, eval_data=eval_data, eval_every=eval_every,
            eval_windows=eval_windows, save_every=save_every, seed=seed))
        with PhaseProgress(enabled=not (quiet or json_out), eta=True) as bar:
            outcome = run(checkpoint, out, settings, device=device, dtype=dtype, resume=resume, force=force,
                          compare_full=compare_full, compare_steps=compare_steps, progress=bar)
        summary = outcome.summary()
        if json_out:
            print(json.dumps(summary, indent=2))
            return
        if quiet:
            return
        console = make_console()
        table = Table(title=f"fine-tune of {outcome.manifest.hyperparameters.get('trainable', 'trainable modules')} → {outcome.out}")
        table.add_column("")
        table.add_column("trained modules only", justify="right")
        table.add_column("full fine-tune", justify="right")
        estimate = summary["memory_estimate_bytes"]
        full = summary.get("full_finetune_comparison") or {}
        table.add_row("trainable parameters", f"{summary['trainable_params']:,}", f"{summary['total_params']:,}")
        table.add_row("grads + AdamW state (estimate)", mib(estimate["lowrank_only"]), mib(estimate["full"]))
        peak = summary["peak_memory"]
        table.add_row(f"peak memory ({peak['kind']})", mib(peak["peak_bytes"]),
                      mib(full.get("peak_memory", {}).get("peak_bytes")) if full else "- (--compare-full)")
        table.add_row("seconds / step", f"{summary['seconds_per_step']:.3f}",
                      f"{full['seconds_per_step']:.3f}" if full else "-")
        console.print(table)
        console.print(f"loss {summary['first_loss']:.4f} → {summary['last_loss']:.4f}"
                      + (f" · resumed from step {summary['resumed_from_step']}" if summary["resumed_from_step"] else ""))
        for e in summary["evals"]:
            console.print(f"  step {e['step']:>6}: eval ppl {e['ppl']:.3f} ({e['windows']} windows)")
