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
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from . import api
from .errors import CompressKitError, InputError

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="Compress large language models: OWL, AlphaPruning, Wanda, SparseGPT, magnitude, WeLore, ...",
)
err_console = Console(stderr=True)
out_console = Console()


# --------------------------------------------------------------------------- progress
class _Progress:
    """A rich progress bar per phase (one row per phase: measure, prune, ...)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._progress = None
        self._tasks: dict[str, int] = {}

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[label]}"), TimeElapsedColumn(), console=err_console,
            )
            self._progress.__enter__()
        return self

    def __call__(self, phase: str, done: int, total: int, label: str = "") -> None:
        if self._progress is None:
            return
        if phase not in self._tasks:
            self._tasks[phase] = self._progress.add_task(phase, total=total, label=label)
        self._progress.update(self._tasks[phase], completed=done, total=total, label=label)

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.__exit__(*exc)


# --------------------------------------------------------------------------- method options
def _method_option_fields() -> dict[str, tuple[str, str, object]]:
    """CLI parameter name -> (flag, field name, pydantic FieldInfo), over all registered methods."""
    from .methods import available_methods, get_method

    fields: dict[str, tuple[str, str, object]] = {}
    for name in available_methods():
        for field_name, info in get_method(name).config_cls.model_fields.items():
            extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
            flag = extra.get("flag") or "--" + field_name.replace("_", "-")
            param = flag.lstrip("-").replace("-", "_")
            fields.setdefault(param, (flag, field_name, info))
    return fields


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
    for param, (flag, _field, info) in _method_option_fields().items():
        ann = _option_annotation(info)
        opt_flags = [f"{flag}/--no-{flag[2:]}"] if ann is bool else [flag]
        default_note = f" [method default: {info.default}]" if info.default is not None else ""
        params.append(
            _inspect.Parameter(
                param,
                _inspect.Parameter.KEYWORD_ONLY,
                default=typer.Option(None, *opt_flags, help=(info.description or "") + default_note,
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
    calib: str = typer.Option("c4", help="Calibration source: c4, wikitext2, pile, gsm8k, ..., hf:DS[:CFG]:SPLIT:FIELD, file:PATH."),
    calib_format: str = typer.Option("window", help="window | icl | cot | single | zero."),
    nsamples: int = typer.Option(128, help="Calibration samples."),
    seqlen: int = typer.Option(2048, help="Calibration sequence length (tokens)."),
    seed: int = typer.Option(0, help="Calibration sampling seed."),
    num_incontext: Optional[int] = typer.Option(None, help="Question/answer pairs per sample for icl / cot."),
    include: Optional[str] = typer.Option(None, help="Only touch decoder linears whose full name matches this regex."),
    exclude: Optional[str] = typer.Option(None, help="Never touch modules whose full name matches this regex."),
    device: str = typer.Option("auto", help="cpu | cuda | cuda:N | auto."),
    dtype: str = typer.Option("auto", help="auto | float32 | bfloat16 | float16."),
    batch_size: int = typer.Option(8, help="Calibration samples per block forward."),
    offload_activations: bool = typer.Option(False, help="Keep calibration activations on CPU (saves GPU memory)."),
    blocksize: Optional[int] = typer.Option(None, help="SparseGPT column block size [default 128]."),
    percdamp: Optional[float] = typer.Option(None, help="SparseGPT dampening, fraction of mean diag(H) [default 0.01]."),
    revision: Optional[str] = typer.Option(None, help="Hub revision of the model."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output directory."),
    json_out: bool = typer.Option(False, "--json", help="Print a machine-readable summary instead of tables."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    **method_options,
):
    """Prune or compress a model and write a checkpoint with a compresskit.json manifest."""
    options = _split_method_options(method, method_options)
    pruner_options = {k: v for k, v in {"blocksize": blocksize, "percdamp": percdamp}.items() if v is not None}
    with _Progress(enabled=not (quiet or json_out)) as progress:
        outcome = api.prune(
            model, method, sparsity=sparsity, pattern=pattern, pruner=pruner, calib=calib,
            calib_format=calib_format, nsamples=nsamples, seqlen=seqlen, seed=seed,
            num_incontext=num_incontext, out=out, force=force, device=device, dtype=dtype,
            batch_size=batch_size, offload_activations=offload_activations, include=include,
            exclude=exclude, revision=revision, method_options=options, pruner_options=pruner_options,
            progress=progress,
        )
    if json_out:
        print(json.dumps(outcome.summary(), indent=2))
    elif not quiet:
        _print_block_table(outcome.manifest, title=f"{method} → {outcome.out}")


def _print_block_table(manifest, title: str) -> None:
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
    path: Optional[str] = typer.Argument(None, help="Checkpoint directory (or model name with --model)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Evaluate a model (hub id, dir, built-in) instead of a checkpoint."),
    ppl: Optional[str] = typer.Option(None, help="Perplexity dataset: wikitext2 | c4 (comma-separated for several)."),
    ppl_file: Optional[Path] = typer.Option(None, help="Perplexity of a local text file (.txt as-is, .jsonl 'text' rows joined by blank lines)."),
    seqlen: int = typer.Option(2048, help="Perplexity window length."),
    max_windows: Optional[int] = typer.Option(None, help="Only the first N windows (a quick estimate; recorded in the output)."),
    device: str = typer.Option("auto", help="cpu | cuda | auto."),
    batch_size: int = typer.Option(1, help="Windows per forward."),
    json_out: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
):
    """Evaluate a checkpoint: perplexity with the papers' protocol."""
    target = path or model
    if target is None:
        raise InputError("give a checkpoint directory or --model")
    datasets = [d for d in (ppl.split(",") if ppl else []) if d]
    if ppl_file is not None:
        datasets.append(f"file:{ppl_file}")
    if not datasets:
        datasets = ["wikitext2"]
    results = {}
    with _Progress(enabled=not (quiet or json_out)) as progress:
        for ds in datasets:
            results[ds] = api.evaluate_perplexity(
                target, ds, seqlen=seqlen, device=device, batch_size=batch_size, max_windows=max_windows,
                progress=lambda d, t, ds=ds: progress(f"ppl {ds}", d, t, ""),
            )
    if json_out:
        print(json.dumps({"model": target, "perplexity": results}, indent=2))
        return
    table = Table(title=f"perplexity of {target}")
    for col in ("dataset", "ppl", "seqlen", "windows", "join"):
        table.add_column(col)
    for ds, r in results.items():
        table.add_row(ds, f"{r['value']:.3f}", str(r["seqlen"]), str(r["n_windows"]), r["join"])
    out_console.print(table)


@app.command()
def inspect(
    path: Path = typer.Argument(..., help="Checkpoint directory."),
    json_out: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
):
    """Show a checkpoint's manifest and its per-block sparsity table."""
    manifest = api.inspect(path)
    if json_out:
        print(json.dumps(manifest.model_dump(), indent=2))
        return
    out_console.print(f"[bold]{path}[/bold]: {manifest.method} on {manifest.base_model} (created {manifest.created})")
    out_console.print("hyperparameters: " + ", ".join(f"{k}={v}" for k, v in manifest.hyperparameters.items() if v is not None))
    if manifest.calibration:
        c = manifest.calibration
        out_console.print(f"calibration: {c.get('source')} {c.get('format')} {c.get('nsamples')}×{c.get('seqlen')} seed {c.get('seed')} (hash {c.get('hash')})")
    if manifest.structure:
        out_console.print(f"structure: {len(manifest.structure)} replaced module group(s); loads with compresskit.load only")
    _print_block_table(manifest, title="per-block sparsity")


def _register_commands() -> None:
    import importlib

    from .commands import COMMAND_MODULES

    for name in COMMAND_MODULES:
        importlib.import_module(f"{__package__}.commands.{name}").register(app)


_register_commands()


def _quiet_libraries() -> None:
    """Our own progress bars and one-line errors replace the libraries' bars and warnings."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # pragma: no cover - transformers missing is reported by the command itself
        pass


def main() -> None:
    _quiet_libraries()
    try:
        app()
    except CompressKitError as exc:
        err_console.print(f"error: {exc}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted; nothing was written in place of the output", markup=False)
        sys.exit(130)


if __name__ == "__main__":
    main()
