"""``compresskit.evaluate``: one call that scores a model or checkpoint the way the papers do.

Perplexity (non-overlapping windows, methods.md §1.4), lm-eval tasks and named task sets on the
in-memory model (§1.5, §11.3), and optionally efficiency figures, all recorded in one versioned
``EvalResult`` (schema v1) together with the checkpoint's manifest summary, so a results file
says what was evaluated and how without the checkpoint at hand.

A checkpoint is loaded from disk with ``checkpoint.reader.load_with_tokenizer`` (module replacements
rebuilt), any other model with ``checkpoint.reader.open_model`` (in memory), never taken from the
pruning process's memory: what is scored is what was saved.
``baseline=True`` scores the dense model a checkpoint was compressed from (the manifest's
``base_model``) with exactly the same settings, which is what makes ``compare dense.json
ckpt.json`` an honest before/after table.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from .checkpoint.manifest import MANIFEST_NAME, Manifest
from .errors import InputError
from .evaluation.results import Efficiency, EvalResult, ModelInfo, PerplexityResult, compute_set_means

# torch and transformers are imported by the functions that load and score a model, so that
# ``check_options`` (which ``compresskit eval`` calls first) answers a bad option without them.

Progress = Callable[[str, int, int, str], None]
#: ``demo``: the shipped public-domain sample; ``auto``: WikiText-2, else ``demo`` (keyed by the one used).
PPL_DATASETS = ("wikitext2", "c4", "demo", "auto")
#: The papers' perplexity window (methods.md §1.4); an unset --seqlen is this, fitted to the model.
DEFAULT_PPL_SEQLEN = 2048


# ----------------------------------------------------------------------------- what is evaluated
def is_checkpoint(target: Any) -> bool:
    return isinstance(target, (str, Path)) and (Path(target).expanduser() / MANIFEST_NAME).is_file()


def base_model_of(checkpoint: str | Path) -> str:
    """The dense model a checkpoint was made from (the first stage's input for chained stages)."""
    if not is_checkpoint(checkpoint):
        raise InputError(
            f"{checkpoint} is not a compresskit checkpoint (no {MANIFEST_NAME}); --baseline needs one, "
            "or name the dense model with --model"
        )
    return Manifest.read(Path(checkpoint).expanduser()).base_model


def base_model_and_revision(checkpoint: str | Path) -> tuple[str, str | None]:
    """``base_model_of`` and the Hub revision recorded with it (a commit sha, or None for local models)."""
    base = base_model_of(checkpoint)
    return base, Manifest.read(Path(checkpoint).expanduser()).revision


def manifest_summary(manifest: Manifest) -> dict:
    """What a results table needs from ``compresskit.json``: method, settings, measured sparsity."""
    calib = manifest.calibration or {}
    return {
        "method": manifest.method,
        "base_model": manifest.base_model,
        "stages": [s.get("method") for s in manifest.stages] + [manifest.method],
        "hyperparameters": {k: v for k, v in manifest.hyperparameters.items() if v is not None},
        "sparsity": manifest.sparsity.get("overall"),
        "parameters": dict(manifest.parameters),
        "calibration": {k: calib[k] for k in ("source", "source_used", "source_label", "format", "nsamples", "seqlen", "seqlen_default", "seed", "hash") if k in calib}
        or None,
        "structure_entries": len(manifest.structure),
        "created": manifest.created,
    }


def _load(target, tokenizer, *, device, dtype: str, revision: str | None):
    """(model, tokenizer, ModelInfo, folder holding its weights or None)."""
    from .checkpoint.reader import load_with_tokenizer, open_model
    from .models.loading import resolve_dtype
    from .models.placement import move_model

    if not isinstance(target, (str, Path)):
        if tokenizer is None:
            raise InputError("evaluating an in-memory model needs its tokenizer (tokenizer=...)")
        name = getattr(getattr(target, "config", None), "_name_or_path", None) or "in-memory"
        return move_model(target, device), tokenizer, ModelInfo(path=str(name)), None
    if is_checkpoint(target):
        path = Path(target).expanduser()
        manifest = Manifest.read(path)
        model, tok = load_with_tokenizer(path, device=str(device), dtype=resolve_dtype(dtype))
        info = ModelInfo(path=str(target), base_model=manifest.base_model, method=manifest.method,
                         manifest=manifest_summary(manifest))
        return model, tok, info, path
    name = str(target)
    loaded = open_model(name, dtype=dtype, revision=revision, device=device)
    folder = loaded.source.directory or _hub_snapshot(name, revision)
    return loaded.model, loaded.tokenizer, ModelInfo(path=name), folder


def _hub_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The local snapshot of a Hub model, for its size on disk (None when it cannot be found)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - a size we cannot measure is reported as missing, not as an error
        return None


# ----------------------------------------------------------------------------- perplexity requests
def ppl_requests(ppl: str | Sequence[str] | None, ppl_files: Iterable[str | Path] = ()) -> dict[str, str]:
    """Result key → dataset spec. Named datasets keep their name (``wikitext2``); a file is keyed by
    its stem (``file:texts/val.jsonl`` → ``val``), which is also its check-metric prefix
    (``val_ppl``). Two requests with the same key are refused rather than overwritten."""
    names = [p.strip() for p in ppl.split(",")] if isinstance(ppl, str) else list(ppl or [])
    specs = [n for n in names if n] + [f"file:{Path(str(f).removeprefix('file:'))}" for f in ppl_files]
    out: dict[str, str] = {}
    for spec in specs:
        if spec in PPL_DATASETS:
            key = spec
        elif spec.startswith("file:") or Path(spec).suffix in {".txt", ".raw", ".jsonl"}:
            spec = spec if spec.startswith("file:") else f"file:{spec}"
            key = re.sub(r"[^A-Za-z0-9_]+", "_", Path(spec.removeprefix("file:")).stem).strip("_") or "file"
        else:
            raise InputError(f"unknown perplexity dataset {spec!r}; use wikitext2, c4, demo, auto or a file (--ppl-file PATH)")
        if key in out and out[key] != spec:
            raise InputError(f"two perplexity files are both named {key!r} ({out[key]} and {spec}); rename one")
        out[key] = spec
    if "auto" in out and ({"wikitext2", "demo"} & set(out)):
        raise InputError("--ppl auto already means wikitext2, else demo; drop auto or the other one")
    return out


def _parse_batch_size(batch_size: int | str) -> int | str:
    if isinstance(batch_size, int) or str(batch_size) == "auto":
        return batch_size
    try:
        value = int(str(batch_size))
    except ValueError:
        raise InputError(f"--batch-size must be 'auto' or a positive integer, got {batch_size!r}") from None
    if value < 1:
        raise InputError(f"--batch-size must be 'auto' or a positive integer, got {batch_size!r}")
    return value


def check_options(*, seqlen: int | None = None, max_windows: int | None = None, limit: int | float | None = None,
                  ppl_batch_size: int = 1, batch_size: int | str = "auto") -> int | str:
    """The checks that the option values alone decide, one line each (``InputError``), without torch:
    ``compresskit eval`` calls this before it imports anything that loads a model. Returns the
    parsed lm-eval ``batch_size``."""
    batch_size = _parse_batch_size(batch_size)
    if seqlen is not None and seqlen < 1:
        raise InputError(f"--seqlen must be at least 1, got {seqlen}")
    if limit is not None and (isinstance(limit, bool) or limit <= 0):
        raise InputError(f"--limit must be a positive number of examples (100) or a fraction (0.1), got {limit!r}")
    if max_windows is not None and max_windows < 1:
        raise InputError(f"--max-windows must be at least 1 (omit it for all windows), got {max_windows}")
    if ppl_batch_size < 1:
        raise InputError(f"--ppl-batch-size must be at least 1, got {ppl_batch_size}")
    return batch_size


# ----------------------------------------------------------------------------- entry point
def evaluate(
    path_or_model,
    *,
    tokenizer=None,
    tasks: str | Sequence[str] | None = None,
    task_files: Iterable[str | Path] = (),
    ppl: str | Sequence[str] | None = None,
    ppl_file: str | Path | Sequence[str | Path] | None = None,
    seqlen: int | None = None,
    max_windows: int | None = None,
    ppl_batch_size: int = 1,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int | str = "auto",
    seed: int | None = None,
    efficiency: bool = False,
    device: str = "auto",
    dtype: str = "auto",
    revision: str | None = None,
    baseline: bool = False,
    progress: Progress | None = None,
) -> EvalResult:
    """Evaluate a checkpoint directory, model (hub id, directory, built-in name) or in-memory model.

    ``tasks``: lm-eval task names, named sets (``zeroshot7``, ``cdmoe8``, ``finercut9``) or task
    YAML paths; ``task_files``: local task YAMLs / folders to index (offline tasks such as
    ``compresskit/evaluation/tasks/piqa_local.yaml``, indexed by default). ``ppl``: ``wikitext2`` / ``c4`` (list or comma-separated);
    ``ppl_file``: local text / jsonl files. With nothing requested, WikiText-2 perplexity is
    computed. ``num_fewshot`` / ``limit`` / ``seed`` left as None take each set's protocol.
    ``efficiency``: parameters, nonzeros, weight bytes on disk, peak memory of loading +
    evaluating, prefill / decode tokens/s (labelled with the device they were timed on).
    ``baseline=True``: evaluate the dense model the checkpoint ``path_or_model`` was compressed
    from instead (its manifest's ``base_model``); ``extra["baseline_of"]`` names the checkpoint.
    ``seqlen`` None: the papers' 2048, lowered to the model's context when that is shorter (a note,
    and ``extra["seqlen_default"]`` records the default that was lowered).
    """
    from .evaluation.efficiency import peak_memory

    files = [ppl_file] if isinstance(ppl_file, (str, Path)) else list(ppl_file or [])
    ppl_specs = ppl_requests(ppl, files)
    task_names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks or [])
    task_names = [t for t in task_names if t]
    if not task_names and task_files:  # a task file alone runs its own task
        task_names = [str(f) for f in task_files if Path(f).is_file()]
        if not task_names:
            raise InputError("--task-file with a folder indexes its tasks; name the ones to run with --tasks")
    if not ppl_specs and not task_names and not efficiency:
        ppl_specs = ppl_requests("wikitext2")
    batch_size = check_options(seqlen=seqlen, max_windows=max_windows, limit=limit, ppl_batch_size=ppl_batch_size,
                               batch_size=batch_size)
    from .models import resolve_device

    dev = resolve_device(device)
    extra: dict[str, Any] = {}
    if baseline:
        extra["baseline_of"] = str(path_or_model)
        path_or_model, recorded = base_model_and_revision(path_or_model)
        revision = revision or recorded

    meter = peak_memory(dev) if efficiency else nullcontext()
    with meter as peak:
        model, tok, info, folder = _load(path_or_model, tokenizer, device=dev, dtype=dtype, revision=revision)
        if ppl_specs:
            from .models.context import fit_seqlen

            seqlen, lowered = fit_seqlen(model, seqlen, DEFAULT_PPL_SEQLEN)
            if lowered is not None:
                extra["seqlen_default"] = lowered
        result = EvalResult(model=info, device=str(dev), extra=extra,
                            dtype=str(next(model.parameters()).dtype).removeprefix("torch."))
        for key, spec in ppl_specs.items():
            scored = _perplexity(model, tok, key, spec, seqlen, max_windows, ppl_batch_size, dev, progress)
            result.perplexity[scored.dataset if spec == "auto" else key] = scored
        if task_names:
            from .evaluation.lmeval import run_lm_eval

            result.add_lm_eval(run_lm_eval(model, tok, task_names, num_fewshot=num_fewshot, limit=limit,
                                           batch_size=batch_size, seed=seed, task_files=task_files))
        speed = _throughput(model, tok, dev) if efficiency else None
    if efficiency:
        result.efficiency = _efficiency(model, folder, peak, speed)
    return compute_set_means(result)


def _perplexity(model, tok, key, spec, seqlen, max_windows, batch_size, dev, progress) -> PerplexityResult:
    from .evaluation.perplexity import perplexity

    report = None if progress is None else (lambda done, total: progress(f"ppl {key}", done, total, ""))
    raw = perplexity(model, tok, spec, seqlen=seqlen, batch_size=batch_size, device=dev,
                     max_windows=max_windows, progress=report)
    return PerplexityResult.model_validate(raw)


def _throughput(model, tok, dev) -> dict:
    from .evaluation.efficiency import measure_throughput

    return measure_throughput(model, tok, device=dev)


def _efficiency(model, folder: Path | None, peak, speed: dict) -> Efficiency:
    from .evaluation.efficiency import count_nonzeros, count_parameters, disk_bytes
    from .errors import UnsupportedArchitectureError
    from .models import get_adapter

    try:
        adapter = get_adapter(model)
    except UnsupportedArchitectureError:
        adapter = None  # whole-model counts only
    return Efficiency(
        **count_parameters(model, adapter),
        **count_nonzeros(model, adapter),
        disk_bytes=disk_bytes(folder, weights_only=True) if folder is not None else None,
        peak_memory_bytes=peak.bytes,
        peak_memory_kind=peak.kind,
        prefill_tokens_per_s=speed["prefill_tokens_per_s"],
        decode_tokens_per_s=speed["decode_tokens_per_s"],
        timing_device=speed["device"],
        note=speed["note"] + "; disk_bytes counts weight files only; peak memory covers loading + evaluating",
    )

