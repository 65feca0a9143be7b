"""``compresskit finetune``: train only the low-rank factors (U, V) of a WeLore checkpoint and the
condensed layers of a CD-MoE checkpoint (the modules its manifest names as trainable)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from .console import console as make_console
from .progress import PhaseProgress


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f} MiB"


def register(app: typer.Typer) -> None:
    @app.command()
    def finetune(
        checkpoint: Path = typer.Argument(..., help="A compresskit checkpoint with low-rank factors (prune --method welore) or condensed MoE layers (prune --method cdmoe)."),
        data: List[str] = typer.Option(..., "--data", help="Training text: any calibration source (c4, file:PATH, hf:...); repeat to mix."),
        steps: int = typer.Option(..., help="Optimizer steps."),
        out: Path = typer.Option(..., "--out", "-o", help="Output checkpoint directory (written atomically)."),
        lr: float = typer.Option(5e-5, help="Peak learning rate (WeLore: 5e-5)."),
        batch_size: int = typer.Option(4, help="Windows per step."),
        seqlen: Optional[int] = typer.Option(None, help="Tokens per window [default: 512, or the model's context when shorter]."),
        warmup: Optional[int] = typer.Option(None, help="Linear warmup steps, <= --steps [default: min(100, 10% of --steps)]."),
        min_lr_ratio: float = typer.Option(0.1, help="Cosine decays to this fraction of --lr."),
        weight_decay: float = typer.Option(0.0, help="AdamW weight decay."),
        max_grad_norm: Optional[float] = typer.Option(1.0, help="Gradient clipping norm."),
        data_format: str = typer.Option("window", help="Calibration format of --data (window | icl | cot | single | zero)."),
        text_field: Optional[str] = typer.Option(None, "--text-field", help="Text column of --data records [default: text]."),
        grad_checkpointing: bool = typer.Option(False, "--grad-checkpointing", help="Recompute activations in backward (less memory)."),
        eval_data: Optional[str] = typer.Option(None, help="Held-out perplexity text: wikitext2 | c4 | file:PATH (none: no eval)."),
        eval_every: int = typer.Option(100, help="Evaluate every N steps (and at the start and end)."),
        eval_windows: int = typer.Option(8, help="Windows of --seqlen tokens per evaluation."),
        save_every: int = typer.Option(100, help="Save the resumable training state every N steps."),
        resume: bool = typer.Option(False, "--resume", help="Continue from <out>.train-state/ if it exists."),
        compare_full: bool = typer.Option(False, "--compare-full", help="Also time a short full fine-tune (all parameters) for memory."),
        compare_steps: int = typer.Option(5, help="Steps of the --compare-full run."),
        device: str = typer.Option("auto", help="cpu | cuda | cuda:N | auto."),
        dtype: Optional[str] = typer.Option(None, help="Output dtype (default: the checkpoint's)."),
        seed: int = typer.Option(0, help="Seed of the training windows."),
        force: bool = typer.Option(False, "--force", help="Replace an existing output / discard a saved training state."),
        json_out: bool = typer.Option(False, "--json", help="Print a machine-readable summary."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    ):
        """Fine-tune only WeLore's low-rank factors and CD-MoE's condensed layers (everything else frozen) and write a new checkpoint."""
        from ..finetune import FinetuneSettings, finetune as run

        settings = FinetuneSettings(
            data=tuple(data), steps=steps, lr=lr, batch_size=batch_size, seqlen=seqlen, warmup=warmup,
            min_lr_ratio=min_lr_ratio, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
            data_format=data_format, text_field=text_field, seed=seed, grad_checkpointing=grad_checkpointing, eval_data=eval_data,
            eval_every=eval_every, eval_windows=eval_windows, save_every=save_every,
        )
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
        table.add_row("grads + AdamW state (estimate)", _mib(estimate["lowrank_only"]), _mib(estimate["full"]))
        peak = summary["peak_memory"]
        table.add_row(f"peak memory ({peak['kind']})", _mib(peak["peak_bytes"]),
                      _mib(full.get("peak_memory", {}).get("peak_bytes")) if full else "- (--compare-full)")
        table.add_row("seconds / step", f"{summary['seconds_per_step']:.3f}",
                      f"{full['seconds_per_step']:.3f}" if full else "-")
        console.print(table)
        console.print(f"loss {summary['first_loss']:.4f} → {summary['last_loss']:.4f}"
                      + (f" · resumed from step {summary['resumed_from_step']}" if summary["resumed_from_step"] else ""))
        for e in summary["evals"]:
            console.print(f"  step {e['step']:>6}: eval ppl {e['ppl']:.3f} ({e['windows']} windows)")
