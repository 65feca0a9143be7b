"""``compresskit compare A.json B.json [C.json ...]``: the before/after table of evaluations.

The first file is the baseline (usually the dense model); every other file gets absolute and
relative deltas against it and, for accuracy-type metrics, retention % (compressed / dense).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional

import typer

from compresskit.errors import InputError


def compare_files(paths: list[Path]):
    from compresskit.evaluation.compare import compare
    from compresskit.evaluation.results import EvalResult

    if len(paths) < 2:
        raise InputError("compare needs at least two results files: the baseline first, then the compressed ones")
    results = [EvalResult.load(p) for p in paths]
    return compare(results[0], *results[1:])


def register(app: typer.Typer) -> None:
    @app.command("compare")
    def compare_cmd(
        files: List[Path] = typer.Argument(..., help="eval.json files (schema v1): the baseline first."),
        markdown: bool = typer.Option(False, "--markdown", help="Print a Markdown table instead of the terminal table."),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="Also write the Markdown table to this file."),
        json_out: bool = typer.Option(False, "--json", help="Print the comparison rows as JSON."),
    ):
        """Compare evaluation results: Δ, relative Δ and retention % against the first file."""
        from compresskit.commands.console import console

        from compresskit.evaluation.compare import render_markdown, render_table

        from compresskit.outputs import MARKDOWN_MARKER, OutputGuard, write_text

        if out is not None:  # before reading anything: never an input, a directory or a foreign file
            OutputGuard(files).file(out, kind="markdown", flag="--out")
        comparison = compare_files(files)
        # the marker line (an HTML comment, invisible when rendered) lets a later --out replace the file
        text = f"{MARKDOWN_MARKER}\n{render_markdown(comparison)}"
        if out is not None:
            write_text(out, text)
        if json_out:
            print(json.dumps(asdict(comparison), indent=2))
        elif markdown:
            print(text, end="")
        else:
            console().print(render_table(comparison))
