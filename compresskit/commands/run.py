"""``compresskit run recipe.yaml [--check]``: the recipe pipeline from the command line.

Exit codes (stable, for CI): 0 done (and with ``--check`` every threshold held), 1 a threshold
was violated under ``--check`` (each one is named), 2 bad input (recipe, paths, data).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer


def _overrides(sets: list[str], model, out, device, force) -> list[str]:
    """Specific flags are shorthands for ``--set``; they win over ``--set`` of the same field."""
    shorthands = {"model": model, "output": out, "device": device}
    extra = [f"{k}={json.dumps(str(v))}" for k, v in shorthands.items() if v is not None]
    return [*sets, *extra, *(["force=true"] if force else [])]


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run_cmd(
        recipe: Path = typer.Argument(..., help="Recipe YAML (see recipes/ and docs/ci.md)."),
        check: bool = typer.Option(False, "--check", help="Exit 1 when any threshold in `checks:` is violated."),
        set_: List[str] = typer.Option([], "--set", help="Override a recipe field: FIELD=VALUE, e.g. stages.0.sparsity=0.6 (repeatable)."),
        model: Optional[str] = typer.Option(None, "--model", "-m", help="Override `model`."),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="Override `output`."),
        device: Optional[str] = typer.Option(None, "--device", help="Override `device` (cpu | cuda | auto)."),
        force: bool = typer.Option(False, "--force", help="Replace existing output checkpoints (sets `force: true`)."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Only validate the recipe and print it resolved."),
        json_out: bool = typer.Option(False, "--json", help="Print the run report as JSON."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    ):
        """Run a recipe: compress every stage, save, evaluate, compare with the dense model, check thresholds."""
        from compresskit.commands.console import console as make_console
        from compresskit.commands.progress import PhaseProgress
        from compresskit.commands.result_tables import checks_table, result_table
        from compresskit.recipe import load_recipe
        from compresskit.run import REPORT_MD, run_recipe

        loaded = load_recipe(recipe, overrides=_overrides(set_, model, out, device, force))
        console = make_console()
        if dry_run:
            print(json.dumps(loaded.model_dump(mode="json"), indent=2) if json_out else
                  f"recipe {recipe} is valid: {len(loaded.stages)} stage(s), {len(loaded.checks)} check(s), "
                  f"output {loaded.output}")
            return
        with PhaseProgress(enabled=not (quiet or json_out)) as progress:
            outcome = run_recipe(loaded, progress=progress)
        if json_out:
            print(json.dumps(outcome.to_dict(), indent=2, default=str))
        elif not quiet:
            from compresskit.evaluation.compare import compare, render_table

            if outcome.baseline is not None:
                console.print(render_table(compare(outcome.baseline, outcome.result)))
            else:
                console.print(result_table(outcome.result))
            if outcome.checks:
                console.print(checks_table(outcome.checks))
            console.print(f"report: {outcome.output / REPORT_MD}")
        if outcome.failed and not check:
            make_console(stderr=True).print(
                f"warning: {len(outcome.failed)} check(s) failed (run with --check to fail the job)"
            )
        if check:
            outcome.raise_for_checks()
