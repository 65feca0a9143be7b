"""``compresskit heal``: heal a compressed checkpoint of any kind by distillation from its dense
model (KD / CE / KD+CE; what trains follows the checkpoint's kind; sparsity and structure kept;
peft LoRA with ``--train lora``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .console import console as make_console
from .progress import PhaseProgress
from .training_options import (BatchSize, Data, DataFormat, Device, Dtype, EvalData, EvalEvery, EvalWindows, Force,
                               GradCheckpointing, JsonOut, MaxGradNorm, MinLrRatio, Quiet, Resume, SaveEvery, Seed,
                               Seqlen, TextField, WeightDecay, Warmup, loop_settings, mib)


def register(app: typer.Typer) -> None:
    @app.command()
    def heal(
        checkpoint: Path = typer.Argument(..., help="A compresskit checkpoint of any kind (sparse, low rank, removed sublayers / blocks, REAP, CD-MoE)."),
        data: Data = ...,
        out: Path = typer.Option(..., "--out", "-o", help="Output: a checkpoint of the input's kind (written atomically), or a peft adapter directory (--train lora without --merge)."),
        steps: Optional[int] = typer.Option(None, help="Optimizer steps (or --tokens)."),
        tokens: Optional[str] = typer.Option(None, help="Training tokens instead of --steps: 20000, 500k, 4M (steps = tokens / (batch × seqlen), rounded up)."),
        loss: str = typer.Option("kd", help="kd (distil the teacher's next-token distributions) | ce (next-token cross-entropy) | kd+ce."),
        kd_weight: Optional[float] = typer.Option(None, help="--loss kd+ce: weight w of w·KD + (1−w)·CE [default: 0.5]."),
        temperature: float = typer.Option(1.0, help="Distillation temperature T (the loss is scaled by T²)."),
        kl_top_k: Optional[int] = typer.Option(None, "--kl-top-k", help="Distil only the teacher's top-K logits (KL over those K tokens; less memory for large vocabularies)."),
        train: str = typer.Option("auto", help="auto (by checkpoint kind: pruned linears with masks kept, low-rank factors, condensed layers, REAP experts + routers, blocks next to removals) | full | neighbours | lora."),
        lora_rank: Optional[int] = typer.Option(None, help="--train lora: adapter rank [default: 16]."),
        lora_alpha: Optional[float] = typer.Option(None, help="--train lora: LoRA alpha [default: 2 × rank]."),
        lora_targets: Optional[str] = typer.Option(None, help="--train lora: module names, comma-separated (q_proj,v_proj) [default: all-linear]."),
        merge: bool = typer.Option(False, "--merge", help="--train lora: merge the adapters into the weights (sparse: masks re-applied) and write a checkpoint."),
        teacher: Optional[str] = typer.Option(None, help="Teacher model (built-in, directory or Hub id) [default: the manifest's base_model]."),
        teacher_device: Optional[str] = typer.Option(None, help="Device of the teacher when it does not fit beside the student [default: --device]."),
        lr: float = typer.Option(1e-4, help="Peak learning rate."),
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
        device: Device = "auto",
        dtype: Dtype = None,
        seed: Seed = 0,
        force: Force = False,
        json_out: JsonOut = False,
        quiet: Quiet = False,
    ):
        """Heal a compressed checkpoint by distillation from its dense model; sparsity and structure are kept."""
        from ..heal.settings import HealSettings, parse_tokens  # torch-free: bad options answer at once

        settings = HealSettings(
            steps=steps, tokens=parse_tokens(tokens), lr=lr, **loop_settings(
                data=data, batch_size=batch_size, seqlen=seqlen, warmup=warmup, min_lr_ratio=min_lr_ratio,
                weight_decay=weight_decay, max_grad_norm=max_grad_norm, data_format=data_format, text_field=text_field,
                grad_checkpointing=grad_checkpointing, eval_data=eval_data, eval_every=eval_every,
                eval_windows=eval_windows, save_every=save_every, seed=seed),
            loss=loss, kd_weight=kd_weight, temperature=temperature, kl_top_k=kl_top_k, train=train,
            lora_rank=lora_rank, lora_alpha=lora_alpha, lora_targets=lora_targets, merge=merge, teacher=teacher,
        )
        settings.check_options()
        if settings.steps is not None:
            settings.validate()
        from ..heal.workflow import heal as run

        with PhaseProgress(enabled=not (quiet or json_out), eta=True) as bar:
            outcome = run(checkpoint, out, settings, device=device, teacher_device=teacher_device, dtype=dtype,
                          resume=resume, force=force, progress=bar)
        summary = outcome.summary()
        if json_out:
            print(json.dumps(summary, indent=2, default=str))
            return
        if quiet:
            return
        console = make_console()
        trained = summary["trained"]
        table = Table(title=f"heal ({summary['loss']['kind']}, {' + '.join(trained['trained'])}) → {outcome.out}"
                      + (" (peft adapter)" if outcome.adapter else ""))
        table.add_column("")
        table.add_column("value", justify="right")
        table.add_row("checkpoint kinds", ", ".join(trained["kinds"]) or "none recognised")
        table.add_row("teacher", (summary["teacher"] or {}).get("model", "- (--loss ce)"))
        table.add_row("training tokens", f"{summary['tokens']:,} ({summary['steps']} steps)")
        table.add_row("trainable parameters", f"{summary['trainable_params']:,} of {summary['total_params']:,}")
        if summary["sparsity_kept"]:
            kept = summary["sparsity_kept"]
            table.add_row("pruned entries kept at zero", f"{kept['pruned_entries']:,} in {kept['tensors']} tensors")
        peak = summary["peak_memory"]
        table.add_row(f"peak memory ({peak['kind']})", mib(peak["peak_bytes"]))
        table.add_row("seconds / step", f"{summary['seconds_per_step']:.3f}")
        console.print(table)
        console.print(f"loss {summary['first_loss']:.4f} → {summary['last_loss']:.4f}"
                      + (f" · resumed from step {summary['resumed_from_step']}" if summary["resumed_from_step"] else ""))
        for e in summary["evals"]:
            console.print(f"  step {e['step']:>6} ({e['train_tokens']:,} tokens): held-out ppl {e['ppl']:.3f}"
                          + (f" ({e['after']})" if e.get("after") else ""))
