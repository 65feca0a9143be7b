"""The options that ``heal`` and ``finetune`` share: one declaration each, so the two training
commands spell, document and default them the same way (``Annotated`` types; a command keeps its
own default where it differs, e.g. the learning rate).

Torch-free, like every command module: ``--help`` and option errors answer at once."""

from __future__ import annotations

from typing import Annotated, List, Optional

import typer

Data = Annotated[List[str], typer.Option("--data", help="Training text: any calibration source (c4, file:PATH, hf:...); repeat to mix.")]
BatchSize = Annotated[int, typer.Option(help="Windows per step.")]
Seqlen = Annotated[Optional[int], typer.Option(help="Tokens per window [default: 512, or the model's context when shorter].")]
Warmup = Annotated[Optional[int], typer.Option(help="Linear warmup steps, <= the steps [default: min(100, 10% of the steps)].")]
MinLrRatio = Annotated[float, typer.Option(help="Cosine decays to this fraction of --lr.")]
WeightDecay = Annotated[float, typer.Option(help="AdamW weight decay.")]
MaxGradNorm = Annotated[Optional[float], typer.Option(help="Gradient clipping norm.")]
DataFormat = Annotated[str, typer.Option(help="Calibration format of --data (window | icl | cot | single | zero).")]
TextField = Annotated[Optional[str], typer.Option("--text-field", help="Text column of --data records [default: text].")]
GradCheckpointing = Annotated[bool, typer.Option("--grad-checkpointing", help="Recompute activations in backward (less memory).")]
EvalData = Annotated[Optional[str], typer.Option(help="Held-out perplexity text: wikitext2 | c4 | file:PATH (none: no held-out curve).")]
EvalEvery = Annotated[int, typer.Option(help="Evaluate every N steps (and at the start and end).")]
EvalWindows = Annotated[int, typer.Option(help="Windows of --seqlen tokens per evaluation.")]
SaveEvery = Annotated[int, typer.Option(help="Save the resumable training state every N steps.")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue from <out>.train-state/ if it exists.")]
Device = Annotated[str, typer.Option(help="cpu | cuda | cuda:N | auto.")]
Dtype = Annotated[Optional[str], typer.Option(help="Output dtype (default: the checkpoint's).")]
Seed = Annotated[int, typer.Option(help="Seed of the training windows.")]
Force = Annotated[bool, typer.Option("--force", help="Replace an existing output / discard a saved training state.")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print a machine-readable summary.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]



def loop_settings(*, data: list[str], batch_size: int, seqlen: int | None, warmup: int | None, min_lr_ratio: float,
                  weight_decay: float, max_grad_norm: float | None, data_format: str, text_field: str | None,
                  grad_checkpointing: bool, eval_data: str | None, eval_every: int, eval_windows: int,
                  save_every: int, seed: int) -> dict:
    """The shared options as the trainer's settings fields (``heal.settings.TrainSettings``)."""
    return dict(data=tuple(data), batch_size=batch_size, seqlen=seqlen, warmup=warmup, min_lr_ratio=min_lr_ratio,
                weight_decay=weight_decay, max_grad_norm=max_grad_norm, data_format=data_format,
                text_field=text_field, grad_checkpointing=grad_checkpointing, eval_data=eval_data,
                eval_every=eval_every, eval_windows=eval_windows, save_every=save_every, seed=seed)


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f} MiB"
