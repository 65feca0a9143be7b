"""``compresskit run recipe.yaml``: compress (every stage) → save → evaluate → check → report.

Layout of ``output`` (the recipe's, default ``out/<recipe stem>``):

* with stages, ``output/`` is the final checkpoint; an earlier stage *k* is saved beside it as
  ``<output>.stage<k>-<method>/`` and is the next stage's input (the manifest's ``stages`` keeps
  the history); without stages, the recipe evaluates ``model`` itself and ``output/`` only holds
  the results;
* ``eval.json`` (``EvalResult`` schema v1 of the final model), ``baseline.json`` (the dense model
  evaluated with the same settings, when the recipe asks for it or a ratio check needs it),
  ``report.md`` (stages, before/after table, checks) and ``report.json`` (the same for machines).

Everything a user can get wrong in the recipe is caught by ``load_recipe`` before any work
starts; output directories are checked before the first stage runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import CheckFailed
from .evaluate import evaluate
from .evaluation.checks import CheckOutcome, evaluate_checks
from .evaluation.compare import compare, format_value, render_markdown
from .evaluation.results import EvalResult
from .recipe import Recipe, load_recipe

Progress = Callable[[str, int, int, str], None]
RESULT_FILE, BASELINE_FILE, REPORT_MD, REPORT_JSON = "eval.json", "baseline.json", "report.md", "report.json"


@dataclass
class RunOutcome:
    recipe: Recipe
    output: Path
    stage_dirs: list[Path]
    result: EvalResult
    baseline: EvalResult | None
    checks: list[CheckOutcome] = field(default_factory=list)
    stage_summaries: list[dict] = field(default_factory=list)

    @property
    def failed(self) -> list[CheckOutcome]:
        return [c for c in self.checks if not c.passed]

    @property
    def passed(self) -> bool:
        return not self.failed

    def raise_for_checks(self) -> None:
        """``CheckFailed`` (exit 1) naming every violated threshold."""
        if self.failed:
            raise CheckFailed(
                f"{len(self.failed)} of {len(self.checks)} checks failed: " + "; ".join(c.describe() for c in self.failed)
            )

    def to_dict(self) -> dict:
        return {
            "written_by": "compresskit run",  # lets a later run replace this report (compresskit.outputs)
            "recipe": self.recipe.provenance(),
            "model": self.recipe.model,
            "output": str(self.output),
            "stages": self.stage_summaries,
            "results": str(self.output / RESULT_FILE),
            "baseline": str(self.output / BASELINE_FILE) if self.baseline is not None else None,
            "checks": [{**c.__dict__, "description": c.describe()} for c in self.checks],
            "passed": self.passed,
        }


def stage_dirs(recipe: Recipe) -> list[Path]:
    """Where each stage's checkpoint goes: the last one is ``output`` itself."""
    out = Path(recipe.output)
    n = len(recipe.stages)
    return [out if k == n else out.with_name(f"{out.name}.stage{k}-{s.method}") for k, s in enumerate(recipe.stages, 1)]


def _check_outputs(recipe: Recipe) -> None:
    """Every checkpoint and file the recipe writes, against everything it reads, before any work."""
    from .outputs import OutputGuard, option_inputs

    calib = recipe.calibration.source
    ev = recipe.evaluation
    baseline_file = recipe.baseline if recipe.baseline.endswith(".json") else None
    guard = OutputGuard([recipe.model, recipe.source, *option_inputs(calib, [s.method_options for s in recipe.stages]),
                         *ev.ppl_files, *ev.task_files, baseline_file])
    for path in stage_dirs(recipe):
        guard.directory(path, force=recipe.force, flag="")
    output = Path(recipe.output)
    guard.file(output / RESULT_FILE, kind="results", flag="")
    if baseline_file is None and recipe.needs_baseline:
        guard.file(output / BASELINE_FILE, kind="results", flag="")
    guard.file(output / REPORT_MD, kind="markdown", flag="")
    guard.file(output / REPORT_JSON, kind="report", flag="")


def run_recipe(
    recipe: Recipe | str | Path, *, overrides: tuple[str, ...] = (), progress: Progress | None = None
) -> RunOutcome:
    """Run a recipe end to end. Threshold violations are reported in the outcome, not raised:
    call ``outcome.raise_for_checks()`` for CI semantics (``compresskit run --check``)."""
    from . import api

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides=overrides)
    _check_outputs(recipe)
    baseline = EvalResult.load(recipe.baseline) if recipe.baseline.endswith(".json") else None
    calib = recipe.calibration
    current, summaries = recipe.model, []
    dirs = stage_dirs(recipe)
    for stage, out in zip(recipe.stages, dirs):
        if stage.method == "heal":  # heal the previous stage's checkpoint (recipe.heal_stage)
            summaries.append(_heal(stage, current, out, recipe, progress))
            current = str(out)
            continue
        outcome = api.prune(
            current, stage.method, sparsity=stage.sparsity, pattern=stage.pattern, pruner=stage.pruner,
            calib=calib.source, calib_format=calib.format, nsamples=calib.nsamples, seqlen=calib.seqlen,
            seed=calib.seed, num_incontext=calib.num_incontext, out=out, force=recipe.force,
            device=recipe.device, dtype=recipe.dtype, batch_size=calib.batch_size,
            offload_activations=calib.offload_activations, include=stage.include, exclude=stage.exclude,
            revision=recipe.revision if current == recipe.model else None,
            method_options=stage.method_options, pruner_options=stage.pruner_options, progress=progress,
        )
        summaries.append(outcome.summary())
        del outcome  # free the in-memory model: the next step loads what was saved
        current = str(out)

    output = Path(recipe.output)
    output.mkdir(parents=True, exist_ok=True)
    settings = dict(recipe.evaluation.settings(), device=recipe.device, dtype=recipe.dtype, progress=progress)
    result = evaluate(current, revision=recipe.revision if current == recipe.model else None, **settings)
    result.extra["recipe"] = recipe.provenance()
    result.save(output / RESULT_FILE)
    if baseline is None and recipe.needs_baseline:
        baseline = evaluate(recipe.model, revision=recipe.revision, **settings)
        baseline.extra["recipe"] = recipe.provenance()
        baseline.extra["baseline_of"] = str(output)
        baseline.save(output / BASELINE_FILE)

    run = RunOutcome(recipe, output, dirs, result, baseline, stage_summaries=summaries)
    run.checks = evaluate_checks(recipe.checks, result, baseline)
    write_report(run)
    return run


def _heal(stage, current: str, out: Path, recipe: Recipe, progress) -> dict:
    from .heal.workflow import heal
    from .recipe import heal_stage

    healing = heal_stage(stage)
    outcome = heal(current, out, healing.settings(), device=recipe.device, teacher_device=healing.teacher_device,
                   resume=False, force=recipe.force, progress=progress)
    record = outcome.record
    details = record["method_details"]
    curve = details["evals"]
    return {"method": "heal", "out": str(outcome.out), "sparsity": record["sparsity"],
            "hyperparameters": {"loss": details["loss"]["kind"], "trained": " + ".join(details["trained"]["trained"]),
                                "teacher": (details["teacher"] or {}).get("model"), "tokens": details["tokens"],
                                "steps": details["steps"],
                                "held_out_ppl": (f"{curve[0]['ppl']:.3f} -> {curve[-1]['ppl']:.3f}" if curve else None)},
            "method_details": {k: details[k] for k in ("trained", "teacher", "loss", "tokens", "steps", "evals",
                                                       "sparsity_kept")}}


# ----------------------------------------------------------------------------- report
def result_markdown(result: EvalResult) -> str:
    """One result without a baseline: metric | value."""
    lines = [f"| metric | {result.label} |", "|---|---:|"]
    lines += [f"| {row.label} | {format_value(row.kind, row.baseline)} |" for row in compare(result).rows]
    return "\n".join(lines)


def _stage_line(i: int, s: dict) -> str:
    hyper = ", ".join(f"{k}={v}" for k, v in s["hyperparameters"].items() if v is not None and k != "device")
    sparsity = s["sparsity"].get("overall")
    measured = f"; measured decoder-linear sparsity {sparsity:.4f}" if sparsity is not None else ""
    return f"{i}. `{s['method']}` → `{s['out']}` ({hyper}){measured}"


def render_report(run: RunOutcome) -> str:
    r = run.recipe
    lines = [f"# compresskit run: {r.source or 'recipe'}", ""]
    if r.description:
        lines += [r.description.strip(), ""]
    lines += [f"model `{r.model}` · output `{run.output}` · recipe sha256 `{(r.provenance()['sha256'] or '')[:12]}`"]
    if r.provenance()["overrides"]:
        lines += ["overrides: " + ", ".join(f"`{o}`" for o in r.provenance()["overrides"])]
    lines += ["", "## Stages", ""]
    lines += [_stage_line(i, s) for i, s in enumerate(run.stage_summaries, 1)] or ["(none: the model itself)"]
    lines += ["", "## Results", ""]
    if run.baseline is not None:
        lines += [render_markdown(compare(run.baseline, run.result))]
    else:
        lines += [result_markdown(run.result), ""]
    lines += ["## Checks", ""]
    if run.checks:
        lines += ["| metric | rule | threshold | observed | result |", "|---|---|---:|---:|---|"]
        lines += [
            f"| {c.metric} | {c.rule} | {c.threshold:g} | {c.observed:.6g} | {'pass' if c.passed else '**FAIL**'} |"
            for c in run.checks
        ]
        lines += ["", f"{len(run.checks) - len(run.failed)} of {len(run.checks)} checks passed."]
    else:
        lines += ["(no checks in the recipe)"]
    return "\n".join(lines) + "\n"


def write_report(run: RunOutcome) -> None:
    from .outputs import MARKDOWN_MARKER, write_text

    write_text(run.output / REPORT_MD, f"{MARKDOWN_MARKER}\n{render_report(run)}")
    write_text(run.output / REPORT_JSON, json.dumps(run.to_dict(), indent=2, default=str) + "\n")
