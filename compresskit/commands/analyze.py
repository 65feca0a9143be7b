"""``compresskit analyze``: per-layer statistics (OWL outliers, Hill α, spectra) without pruning."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .console import console


def register(app: typer.Typer) -> None:
    @app.command()
    def analyze(
        model: str = typer.Option(..., "--model", "-m", help="Hub id, local directory or built-in name."),
        metric: str = typer.Option(..., help="owl (outlier ratio D per block) | alpha (Hill α per matrix) | spectrum | experts (MoE usage, avg_w, REAP saliency)."),
        sparsity: float = typer.Option(0.7, help="Target sparsity used to preview the allocation."),
        owl_m: Optional[float] = typer.Option(None, help="OWL outlier threshold M [default 5]."),
        owl_lambda: Optional[float] = typer.Option(None, help="OWL λ [default 0.08]."),
        alpha_epsilon: Optional[float] = typer.Option(None, help="AlphaPruning ε [default 0.3]."),
        alpha_metric: Optional[str] = typer.Option(None, help="alpha_peak | alpha_mid."),
        rank_reduction: Optional[float] = typer.Option(None, help="WeLore rank reduction previewed (spectrum) [default 0.5]."),
        min_ratio: Optional[float] = typer.Option(None, help="WeLore LRC threshold (spectrum) [default 0.5]."),
        calib: str = typer.Option("c4", help="Calibration source (owl only)."),
        text_field: Optional[str] = typer.Option(None, "--text-field", help="Text column of --calib records [default: text]."),
        nsamples: int = typer.Option(128),
        seqlen: Optional[int] = typer.Option(None, help="Calibration length [default: 2048, or the model's context when shorter]."),
        seed: int = typer.Option(0),
        include: Optional[str] = typer.Option(None), exclude: Optional[str] = typer.Option(None),
        device: str = typer.Option("auto"), dtype: str = typer.Option("auto"),
        batch_size: int = typer.Option(8),
        plot: Optional[Path] = typer.Option(None, help="Write a per-block bar chart to this PNG file (.png added when missing; spectrum: σ̂ curves per matrix)."),
        json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    ):
        """Per-layer statistics of a model, and the allocation they imply; nothing is pruned."""
        from ..analyze import analyze as run

        options = {"owl_m": owl_m, "owl_lambda": owl_lambda, "alpha_epsilon": alpha_epsilon, "alpha_metric": alpha_metric,
                   "rank_reduction": rank_reduction, "min_ratio": min_ratio}
        if metric in ("spectrum", "experts"):  # draw their own figures (σ̂ curves; layer × expert heat maps)
            options["plot"], plot = plot, None
        report = run(model, metric, sparsity=sparsity, options=options, plot=plot, calib=calib, text_field=text_field,
                     nsamples=nsamples,
                     seqlen=seqlen, seed=seed, include=include, exclude=exclude, device=device, dtype=dtype,
                     batch_size=batch_size)
        if json_out:
            print(json.dumps(report, indent=2, default=str))
            return
        table = Table(title=f"{metric} per block — {model}")
        table.add_column("block", justify="right")
        cols = [k for k, v in report["per_block"].items() if v is not None]
        for c in cols:
            table.add_column(c, justify="right")
        for i in range(len(report["blocks"])):
            vals = [report["per_block"][c][i] for c in cols]
            table.add_row(str(i), *("-" if v is None else f"{v:.4f}" for v in vals))
        console().print(table)
        if report.get("plot"):
            console().print(f"plot written to {report['plot']}", soft_wrap=True)  # a path is never wrapped
