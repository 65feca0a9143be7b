"""The ``compresskit`` command line: a thin layer over ``compresskit.api``.

Method-specific options (``--owl-m``, ``--alpha-epsilon``, ...) are generated from each registered
method's config class, so a new method gets its flags without editing this file. Errors a user
can cause print one line (``error: ...``) and exit 2; a failed quality check exits 1.
"""

from __future__ import annotations

import inspect as _inspect
import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table
from rich.text import Text

from .commands.console import console as _console
from .commands.progress import PhaseProgress
from .errors import CompressKitError, InputError

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="Compress large language models: OWL, AlphaPruning, Wanda, SparseGPT, magnitude, WeLore, ...",
)
# Markup and emoji off: user text (paths, sources, messages) prints exactly as typed.
err_console = _console(stderr=True)
out_console = _console()


# --------------------------------------------------------------------------- method options
def _method_option_fields() -> dict[str, tuple[str, str, object]]:
    """CLI parameter name -> (flag, field name, pydantic FieldInfo), over all registered methods."""
    return {param: (flag, field_name, owners[0][1]) for param, (flag, field_name, owners) in _method_option_owners().items()}


def _method_option_owners() -> dict[str, tuple[str, str, list[tuple[str, object]]]]:
    """CLI parameter name -> (flag, field name, [(method, FieldInfo), ...]): every method declaring it."""
    from .methods import available_methods, get_method
    from .methods.base import option_flag

    fields: dict[str, tuple[str, str, list[tuple[str, object]]]] = {}
    for name in available_methods():
        for field_name, info in get_method(name).config_cls.model_fields.items():
            flag = option_flag(field_name, info)
            param = flag.lstrip("-").replace("-", "_")
            fields.setdefault(param, (flag, field_name, []))[2].append((name, info))
    return fields


def _method_option_help(owners: list[tuple[str, object]]) -> str:
    """One help text for a flag several methods declare: shared text once, else each method's own
    (``finercut: ... | evopress: ...``); the methods' defaults where they are set."""
    texts = list(dict.fromkeys(info.description or "" for _, info in owners))
    if len(texts) == 1:
        text = texts[0]
    else:
        text = " | ".join(f"{', '.join(m for m, i in owners if (i.description or '') == t)}: {t}" for t in texts)
    defaults = list(dict.fromkeys(repr(info.default) for _, info in owners if info.default is not None))
    if len(defaults) == 1 and len({m for m, i in owners if i.default is not None}) == len(owners):
        return text + f" [method default: {owners[0][1].default}]"
    notes = [f"{m} {i.default}" for m, i in owners if i.default is not None]
    return text + (f" [method default: {', '.join(notes)}]" if notes else "")


def _option_annotation(info) -> type:
    ann = info.annotation
    args = getattr(ann, "__args__", None)
    if args:  # Optional[X] / X | None
        ann = next((a for a in args if a is not type(None)), str)
    return ann if ann in (int, float, bool, str) else str


def _with_method_options(func):
    """Append one keyword-only CLI option per method hyperparameter to ``func``'s signature."""
    sig = _inspect.signature(func)
    params = [p for p in sig.parameters.values() if p.kind != _inspect.Parameter.VAR_KEYWORD]
    for param, (flag, _field, owners) in _method_option_owners().items():
        ann = _option_annotation(owners[0][1])
        opt_flags = [f"{flag}/--no-{flag[2:]}"] if ann is bool else [flag]
        params.append(
            _inspect.Parameter(
                param,
                _inspect.Parameter.KEYWORD_ONLY,
                default=typer.Option(None, *opt_flags, help=_method_option_help(owners),
                                     rich_help_panel="Method options"),
                annotation=Optional[ann],
            )
        )
    func.__signature__ = sig.replace(parameters=params)
    return func


def _split_method_options(method: str, extra: dict) -> dict:
    from .methods import get_method

    fields = _method_option_fields()
    own = set(get_method(method).config_cls.model_fields)
    chosen = {}
    for param, value in extra.items():
        if value is None:
            continue
        flag, field_name, _ = fields[param]
        if field_name not in own:
            raise InputError(f"{flag} does not apply to --method {method}")
        chosen[field_name] = value
    return chosen


# --------------------------------------------------------------------------- commands
@app.command()
@_with_method_options
def prune(
    model: str = typer.Option(..., "--model", "-m", help="Hub id, local directory, or built-in name (smollm2-135m)."),
    method: str = typer.Option(..., "--method", help="wanda | sparsegpt | magnitude | uniform | owl | owled | alphapruning | welore ..."),
    out: Path = typer.Option(..., "--out", "-o", help="Output checkpoint directory (written atomically)."),
    sparsity: Optional[float] = typer.Option(None, help="Target sparsity of the decoder linears, in [0, 1)."),
    pattern: str = typer.Option("unstructured", help="unstructured or N:M (N zeros in every M inputs, e.g. 2:4)."),
    pruner: Optional[str] = typer.Option(None, help="Within-matrix criterion for allocation methods: magnitude | wanda | sparsegpt."),
    calib: Optional[str] = typer.Option(None, help="[default: the method's paper setting, c4 for most] Calibration source: c4, wikitext2, pile, gsm8k, ..., hf:DS[:CFG]:SPLIT:FIELD, file:PATH; demo (shipped sample); auto (wikitext2, else local mirror, else demo)."),
    calib_format: Optional[str] = typer.Option(None, help="[default: the method's paper setting: prefix for finercut, window for the others] window (random seqlen windows of documents) | prefix (the first nsamples×seqlen tokens of the non-empty documents joined with a space, no sampling) | icl | cot | single | zero."),
    text_field: Optional[str] = typer.Option(None, "--text-field", help="Text column of --calib records (file / hf sources) [default: text]."),
    nsamples: Optional[int] = typer.Option(None, help="Calibration samples [default: the method's paper setting, 128 for most]."),
    seqlen: Optional[int] = typer.Option(None, help="Calibration sequence length in tokens [default: the method's paper setting, 2048 for most; the model's context when shorter]."),
    seed: int = typer.Option(0, help="Calibration sampling seed."),
    num_incontext: Optional[int] = typer.Option(None, help="Question/answer pairs per sample for icl / cot."),
    include: Optional[str] = typer.Option(None, help="Only touch decoder linears whose full name matches this regex."),
    exclude: Optional[str] = typer.Option(None, help="Never touch modules whose full name matches this regex."),
    device: str = typer.Option("auto", help="cpu | cuda | cuda:N | auto."),
    dtype: str = typer.Option("auto", help="auto | float32 | bfloat16 | float16."),
    batch_size: int = typer.Option(8, help="Calibration samples per block forward."),
    offload_activations: bool = typer.Option(False, help="Keep calibration activations on CPU (saves GPU memory)."),
    max_gpu_memory: Optional[str] = typer.Option(None, help="Device memory budget, e.g. 20GiB: activations are offloaded automatically when they do not fit beside one block."),
    blocksize: Optional[int] = typer.Option(None, help="SparseGPT column block size [default 128]."),
    percdamp: Optional[float] = typer.Option(None, help="SparseGPT dampening, fraction of mean diag(H) [default 0.01]."),
    revision: Optional[str] = typer.Option(None, help="Hub revision of the model."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output directory."),
    json_out: bool = typer.Option(False, "--json", help="Print a machine-readable summary instead of tables."),
    load: str = typer.Option("lazy", "--load", help="lazy: decoder blocks stay on disk until used (host RAM ≈ one block); in-memory: load the whole model first."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    **method_options,
):
    """Prune or compress a model and write a checkpoint with a compresskit.json manifest."""
    options = _split_method_options(method, method_options)
    from .methods import get_method
    from .methods.base import check_prune_options

    check_prune_options(get_method(method), sparsity=sparsity, pattern=pattern, pruner=pruner, include=include,
                        exclude=exclude, load=load, method_options=options)  # answers before torch is imported
    from . import api

    pruner_options = {k: v for k, v in {"blocksize": blocksize, "percdamp": percdamp}.items() if v is not None}
    from .engine import distributed

    writer = distributed.is_writer()  # under torchrun only rank 0 prints and writes
    with PhaseProgress(enabled=not (quiet or json_out) and writer) as progress:
        outcome = api.prune(
            model, method, sparsity=sparsity, pattern=pattern, pruner=pruner, calib=calib,
            calib_format=calib_format, nsamples=nsamples, seqlen=seqlen, seed=seed,
            num_incontext=num_incontext, text_field=text_field, out=out, force=force, device=device, dtype=dtype,
            batch_size=batch_size, offload_activations=offload_activations, max_gpu_memory=max_gpu_memory, include=include,
            exclude=exclude, revision=revision, method_options=options, pruner_options=pruner_options,
            progress=progress, load=load,
        )
    distributed.shutdown()
    if not writer:
        return
    if not quiet:
        _note_calibration_source(outcome.manifest.calibration)
    if json_out:
        print(json.dumps(outcome.summary(), indent=2))
    elif not quiet:
        _print_block_table(outcome.manifest, title=f"{method} → {outcome.out}")


def _note_calibration_source(calibration: dict | None) -> None:
    """Say on stderr which data calibrated the model when it is not simply what --calib named:
    the source an `auto` chain chose (and why it skipped the others) or shipped demo data."""
    if not calibration or not (calibration.get("source_used") or calibration.get("source_label")):
        return
    used = calibration.get("source_label") or calibration.get("source_used")
    if calibration.get("source_used"):
        used = f"{used} [--calib {calibration.get('source')} chose {calibration['source_used']}]"
    skipped = calibration.get("fallback_skipped") or []
    err_console.print(f"note: calibration data: {used}" + (f"; skipped {'; '.join(skipped)}" if skipped else ""),
                      soft_wrap=True)


def _note_perplexity_sources(*results) -> None:
    """Say on stderr (once per dataset) which text a perplexity used when `--ppl auto` chose it
    or when it is the shipped demo text, not a real benchmark."""
    lines: list[str] = []
    for result in results:
        for key, p in (result.perplexity if result is not None else {}).items():
            if p.requested or key == "demo":
                chose = f" [--ppl {p.requested} chose {key}" + (f"; skipped {p.fallback}]" if p.fallback else "]")
                line = f"note: {key} perplexity: text from {p.source}" + (chose if p.requested else "")
                if line not in lines:
                    lines.append(line)
    for line in lines:
        err_console.print(line, soft_wrap=True)


def _print_rank_plan(manifest, title: str) -> None:
    """Low-rank methods: which matrices were factorised to which rank, and both reductions."""
    d = manifest.method_details
    table = Table(title=title)
    for col in ("matrix", "shape", "full rank", "kept rank", "low rank"):
        table.add_column(col, justify="right" if col != "matrix" else "left")
    for m in d.get("matrices", []):
        if m.get("lowrank"):
            table.add_row(m["name"], "×".join(map(str, m["shape"])), str(m["full_rank"]), str(m["kept_rank"]), "yes")
    out_console.print(table)
    out_console.print(
        f"τ {d.get('tau', float('nan')):.4g} · rank reduction applied {d.get('applied_rank_reduction', 0):.3f} "
        f"(planned {d.get('planned_rank_reduction', 0):.3f}) · parameter reduction applied "
        f"{d.get('applied_param_reduction', 0):.3f} · parameters {manifest.parameters.get('total_after', 0):,}"
    )


def _print_block_table(manifest, title: str) -> None:
    from .commands.structural_report import structural_report

    report = structural_report(manifest)  # FinerCut / CD-MoE / REAP: what went, not a table of zeros
    if report is not None:
        for item in report:
            out_console.print(item)
        return
    if "applied_rank_reduction" in manifest.method_details:
        return _print_rank_plan(manifest, title)
    table = Table(title=title)
    table.add_column("block", justify="right")
    table.add_column("target", justify="right")
    table.add_column("measured sparsity", justify="right")
    extra_cols = [k for k, v in manifest.method_details.items() if isinstance(v, list) and
                  manifest.block_ratios is not None and len(v) == len(manifest.block_ratios)]
    for k in extra_cols:
        table.add_column(k, justify="right")
    per_block = manifest.sparsity.get("per_block", [])
    for i, measured in enumerate(per_block):
        target = manifest.block_ratios[i] if manifest.block_ratios else None
        row = [str(i), "-" if target is None else f"{target:.4f}", f"{measured:.4f}"]
        row += [_fmt(manifest.method_details[k][i]) for k in extra_cols]
        table.add_row(*row)
    out_console.print(table)
    p = manifest.parameters
    out_console.print(
        f"decoder-linear sparsity {manifest.sparsity.get('overall', 0):.4f} · parameters {p.get('total_after', 0):,} "
        f"(decoder linears {p.get('decoder_linear', 0):,}, nonzero {p.get('decoder_linear_nonzero', 0):,}) · "
        + " · ".join(f"{k} {v:.1f}s" for k, v in manifest.timings.items())
    )


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


@app.command("eval")
def eval_(
    path: Optional[str] = typer.Argument(None, help="Checkpoint directory, model directory, hub id or built-in name."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="The model to evaluate; with a checkpoint and --baseline: the dense model to compare with."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="lm-eval tasks and named sets, comma-separated: boolq,rte,... | zeroshot7 | cdmoe8 | finercut9 | piqa_local."),
    task_file: List[Path] = typer.Option([], "--task-file", help="Local lm-eval task YAML (or folder) to index; repeatable. Without --tasks, the files' own tasks run."),
    ppl: Optional[str] = typer.Option(None, help="Perplexity dataset: wikitext2 | c4 | demo (shipped Moby Dick excerpt) | auto (wikitext2, else demo); comma-separated for several."),
    ppl_file: List[Path] = typer.Option([], "--ppl-file", help="Perplexity of a local text file (.txt as-is, .jsonl 'text' rows joined by blank lines); repeatable; keyed by file stem."),
    seqlen: Optional[int] = typer.Option(None, help="Perplexity window length [default: 2048, or the model's context when shorter]."),
    max_windows: Optional[int] = typer.Option(None, help="Only the first N perplexity windows (a quick estimate; recorded)."),
    ppl_batch_size: int = typer.Option(1, help="Perplexity windows per forward (the papers use 1)."),
    num_fewshot: Optional[int] = typer.Option(None, help="Few-shot examples [default: the set's protocol, else 0]."),
    limit: Optional[str] = typer.Option(None, help="Examples per task: N, or a fraction like 0.1 [default: the set's protocol, else all]."),
    batch_size: str = typer.Option("auto", help="lm-eval batch size: auto | N (auto is 8 on CPU)."),
    seed: Optional[int] = typer.Option(None, help="lm-eval seed [default: the set's, else 0]."),
    efficiency: bool = typer.Option(False, "--efficiency", help="Parameters, nonzeros, bytes on disk, peak memory, prefill/decode tokens/s."),
    baseline: bool = typer.Option(False, "--baseline", help="Also evaluate the dense model (manifest base_model, or --model) with the same settings."),
    baseline_json: Optional[str] = typer.Option(None, "--baseline-json", help="Where the dense result goes [default: <--json stem>.baseline.json]."),
    device: str = typer.Option("auto", help="cpu | cuda | auto."),
    dtype: str = typer.Option("auto", help="auto (the checkpoint's) | float32 | bfloat16 | float16."),
    json_path: Optional[str] = typer.Option(None, "--json", help="Write the result (schema v1) to this file; '-' prints it on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
):
    """Evaluate a model or checkpoint: perplexity, lm-eval tasks, efficiency; results as JSON schema v1."""
    if path is not None and model is not None and not baseline:
        raise InputError("give a checkpoint/model PATH or --model, not both (with --baseline, --model is the dense model)")
    target = path or model
    if target is None:
        raise InputError("give a checkpoint directory or --model")
    try:
        parsed_limit = None if limit is None else (float(limit) if "." in limit else int(limit))
    except ValueError:
        raise InputError(f"--limit must be a number of examples (100) or a fraction (0.1), got {limit!r}") from None
    from .evaluate import check_options  # torch-free: a bad value answers before torch is imported

    check_options(seqlen=seqlen, max_windows=max_windows, limit=parsed_limit, ppl_batch_size=ppl_batch_size,
                  batch_size=batch_size)
    from .commands.result_tables import result_table  # after the option checks: these import torch
    from .evaluate import base_model_and_revision, evaluate
    from .evaluation.compare import compare, render_table

    settings = dict(tasks=tasks, task_files=task_file, ppl=ppl, ppl_file=ppl_file, seqlen=seqlen,
                    max_windows=max_windows, ppl_batch_size=ppl_batch_size, num_fewshot=num_fewshot,
                    limit=parsed_limit, batch_size=batch_size, seed=seed, efficiency=efficiency, device=device,
                    dtype=dtype)
    dense = dense_target = dense_revision = None
    if baseline:
        if path is None:
            raise InputError("--baseline compares a checkpoint with its dense model: give the checkpoint PATH")
        dense_target, dense_revision = (model, None) if model else base_model_and_revision(path)
    baseline_path = _check_eval_outputs([path, model, dense_target, *ppl_file, *task_file], json_path,
                                        baseline_json if baseline else None, baseline)
    with PhaseProgress(enabled=not (quiet or json_path == "-")) as progress:
        if baseline:
            dense = evaluate(dense_target, revision=dense_revision, progress=progress, **settings)
            dense.extra["baseline_of"] = str(path)
        result = evaluate(target, progress=progress, **settings)
    if not quiet and json_path != "-":
        _note_perplexity_sources(dense, result)
    if json_path == "-":
        data = result.model_dump(mode="json")
        print(json.dumps({"baseline": dense.model_dump(mode="json"), "result": data} if dense else data, indent=2))
        return
    if json_path:
        result.save(json_path)
    if dense is not None and baseline_path is not None:
        dense.save(baseline_path)
    if not quiet:
        out_console.print(render_table(compare(dense, result)) if dense is not None else result_table(result))


def _check_eval_outputs(inputs: list, json_path: str | None, baseline_json: str | None, baseline: bool):
    """Refuse unsafe --json / --baseline-json paths before anything is evaluated; the baseline's path."""
    from .outputs import OutputGuard

    guard = OutputGuard(inputs)
    if json_path and json_path != "-":
        guard.file(json_path, kind="results", flag="--json")
    baseline_path = baseline_json or (
        str(Path(json_path).with_name(Path(json_path).stem + ".baseline.json")) if baseline and json_path and json_path != "-"
        else None
    )
    if baseline_path is not None and json_path != "-":
        guard.file(baseline_path, kind="results", flag="--baseline-json" if baseline_json else "baseline results")
        return baseline_path
    return None


@app.command()
def inspect(
    path: Path = typer.Argument(..., help="Checkpoint directory."),
    json_out: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="FinerCut checkpoints: draw which sublayers went, by block and type, in which order; EvoPress: the level chosen per unit and the fitness per generation (PNG)."),
):
    """Show a checkpoint's manifest and its per-block sparsity table."""
    from .checkpoint.manifest import Manifest  # api.inspect is Manifest.read: this way torch is not imported

    if plot is not None:  # the guard of every --plot: never an input, a foreign file, a directory; writable
        from .outputs import OutputGuard

        plot = OutputGuard([path]).png(plot, flag="--plot")
    manifest = Manifest.read(path)
    if plot is not None:
        from .depth.plot import plot_evopress, plot_removed

        draw = plot_evopress if manifest.method == "evopress" else plot_removed
        draw(manifest.method_details, plot, title=f"{manifest.method} on {manifest.base_model}")
    if json_out:
        print(json.dumps(manifest.model_dump(), indent=2))
        return
    out_console.print(Text.assemble((str(path), "bold"), f": {manifest.method} on {manifest.base_model} (created {manifest.created})"))
    out_console.print("hyperparameters: " + ", ".join(f"{k}={v}" for k, v in manifest.hyperparameters.items() if v is not None))
    if manifest.calibration:
        c = manifest.calibration
        used = f" → {c.get('source_label') or c.get('source_used')}" if c.get("source_label") or c.get("source_used") else ""
        out_console.print(f"calibration: {c.get('source')}{used} {c.get('format')} {c.get('nsamples')}×{c.get('seqlen')}"
                          + (f" seed {c['seed']}" if c.get("format") != "prefix" and c.get("seed") is not None else "")
                          + f" (hash {c.get('hash')})"
                          + (f"; --seqlen not given: the default {c['seqlen_default']} lowered to the model's context"
                             if c.get("seqlen_default") else ""))
    if manifest.structure:
        out_console.print(f"structure: {len(manifest.structure)} replaced module group(s); loads with compresskit.load only")
    form = "stock transformers checkpoint (plain from_pretrained)" if manifest.loadable_with_transformers \
        else "compresskit form (compresskit.load)"
    out_console.print(f"form: {form}" + (f" — {manifest.form_reason}" if manifest.form_reason else ""),
                      markup=False, emoji=False, highlight=False)
    _print_block_table(manifest, title="per-block sparsity")


def _register_commands() -> None:
    import importlib

    from .commands import COMMAND_MODULES

    for name in COMMAND_MODULES:
        importlib.import_module(f"{__package__}.commands.{name}").register(app)


_register_commands()


def _quiet_libraries() -> None:
    """Our own progress bars and one-line errors replace the libraries' bars and warnings. Through
    the environment, read when transformers / huggingface_hub are imported, so that start-up does
    not import them (only the commands that need them do); set directly if already imported."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "transformers" in sys.modules:  # in-process callers (tests) may have imported it already
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    _show_our_warnings_as_lines()


def _show_our_warnings_as_lines() -> None:
    """``CompressKitWarning``s print as one ``warning: ...`` line on stderr (no file:line, no source),
    ``CompressKitNote``s as one ``note: ...`` line."""
    import warnings

    from .errors import CompressKitNote, CompressKitWarning

    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, CompressKitWarning) and not _speaks():
            return  # under torchrun every rank meets the same warning: rank 0 prints it
        if issubclass(category, CompressKitWarning):
            kind = "note" if issubclass(category, CompressKitNote) else "warning"
            err_console.print(f"{kind}: {message}", soft_wrap=True)
        else:
            previous(message, category, filename, lineno, file, line)

    if not getattr(previous, "_compresskit", False):  # install once per process
        show._compresskit = True  # type: ignore[attr-defined]
        warnings.showwarning = show


def _click_exceptions():
    """Typer ≥ 0.24 vendors click as ``typer._click``; older releases use click itself."""
    from .compat import click_exceptions

    return click_exceptions()


def _broken_pipe_is_not_an_error() -> None:
    """rich answers a closed stdout (``| head -1``) with ``SystemExit(1)``; raise ``BrokenPipeError``
    instead so ``main`` exits 0 quietly, whichever console was printing."""
    from rich.console import Console

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError

    Console.on_broken_pipe = on_broken_pipe  # the hook rich documents for overriding


def _speaks() -> bool:
    """Whether this process prints errors, warnings and notes. Under ``torchrun`` every rank meets
    the same user error: rank 0 prints it once, the others exit with the same code silently. The
    environment is read as ``engine.distributed.launched()`` / ``rank()`` read it (torchrun sets all
    four variables for every rank), here directly so that an option error needs no torch; a stray
    ``RANK`` outside torchrun silences nothing."""
    import os

    env = os.environ
    launched = all(k in env for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")) and env["WORLD_SIZE"] != "1"
    return not launched or env["RANK"] == "0"


class Terminated(KeyboardInterrupt):
    """SIGTERM (torchrun stops the surviving ranks with it, as do schedulers and ``kill``), raised in
    the main thread like Ctrl-C: every clean-up SIGINT runs (temporary checkpoint folders, spills)
    runs for it too."""


_terminated = False  # set by the SIGTERM handler: typer reports any KeyboardInterrupt as exit code 130


def _raise_terminated(signum, frame) -> None:
    import signal

    global _terminated
    _terminated = True
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
    raise Terminated


def _exit_interrupted() -> None:
    what, code = ("terminated", 143) if _terminated else ("interrupted", 130)
    if _speaks():
        err_console.print(f"{what}; nothing was written in place of the output", markup=False)
    sys.exit(code)


def _sigterm_like_sigint():
    """Install the SIGTERM handler; the previous one (to restore), or None off the main thread."""
    import signal

    try:
        return signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread of the interpreter (an embedding application)
        return None


#: seconds a torchrun rank other than 0 waits before exiting on a user error (see ``_exit_silently``)
RANK_ERROR_GRACE_S = 10.0


def _exit_silently(code: int) -> None:
    """A torchrun rank other than 0 that met a user error: exit with ``code`` after giving rank 0
    (which meets the same error) up to ``RANK_ERROR_GRACE_S`` to print its one line — torchrun ends
    every rank as soon as one exits non-zero, so a quick rank 1 could otherwise end rank 0 before
    it spoke. torchrun's SIGTERM during the wait ends it quietly."""
    import time

    try:
        time.sleep(RANK_ERROR_GRACE_S)
    except KeyboardInterrupt:
        pass
    sys.exit(code)


def main() -> None:
    import signal

    global _terminated
    _terminated = False
    previous_sigterm = _sigterm_like_sigint()
    try:
        try:
            _main()
        except KeyboardInterrupt:  # a signal before _main's own handlers were in place (its first imports)
            _exit_interrupted()
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)


def _click_command():
    """The click command typer builds from ``app``, with every help text escaped for rich: typer
    reads help as rich markup, which silently swallowed our ``[default: ...]`` notes as tags."""
    from rich.markup import escape

    def walk(command) -> None:
        if command.help:
            command.help = escape(command.help)
        for param in command.params:
            if getattr(param, "help", None):
                param.help = escape(param.help)
        for sub in getattr(command, "commands", {}).values():
            walk(sub)

    command = typer.main.get_command(app)
    walk(command)
    return command


def _main() -> None:
    click_exc = _click_exceptions()
    _quiet_libraries()
    _broken_pipe_is_not_an_error()
    try:
        # standalone_mode=False: usage errors reach us, so they too are one line and exit 2.
        code = _click_command()(standalone_mode=False)
        if code == 130:  # typer turns a KeyboardInterrupt (Ctrl-C, Terminated) into this code
            _exit_interrupted()
        sys.exit(code if isinstance(code, int) else 0)
    except click_exc.NoArgsIsHelpError as exc:
        print(exc.ctx.get_help() if exc.ctx else str(exc))
        sys.exit(0)
    except click_exc.UsageError as exc:
        path = exc.ctx.command_path if exc.ctx is not None else "compresskit"
        if not _speaks():
            _exit_silently(2)
        err_console.print(f"error: {exc.format_message()} (see: {path} --help)", highlight=False, markup=False,
                          soft_wrap=True)
        sys.exit(2)
    except CompressKitError as exc:
        if not _speaks():
            _exit_silently(exc.exit_code)
        err_console.print(f"error: {exc}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM outside typer's call: the same clean-up ran on the way here
        _exit_interrupted()
    except BrokenPipeError:
        _exit_on_closed_stdout()
    except SystemExit as exc:
        # click turns EPIPE into exit 1 after wrapping stdout in a PacifyFlushWrapper
        if exc.code == 1 and type(sys.stdout).__name__ == "PacifyFlushWrapper":
            _exit_on_closed_stdout()
        raise


def _exit_on_closed_stdout() -> None:
    """The reader went away (`compresskit inspect X | head -1`): not an error, exit 0 quietly. Point
    stdout at devnull so the interpreter's final flush does not fail again (Python docs, "SIGPIPE")."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout without a file descriptor
        pass
    sys.exit(0)


if __name__ == "__main__":
    main()
