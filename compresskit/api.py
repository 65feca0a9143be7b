"""The Python API. The CLI is a thin layer over these functions, and the tests call them too.

``prune`` validates everything a user can get wrong *before* loading anything (method, sparsity,
pattern, output directory), loads the model, runs the method, measures what it did, and writes an
atomic checkpoint with a manifest.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .engine import distributed
from .engine.memory_plan import device_budget
from .models.placement import move_model
from .checkpoint import MANIFEST_NAME, Manifest, check_output_dir, load_with_tokenizer, save_checkpoint
from .errors import InputError
from .evaluation.sparsity import count_parameters, measure_sparsity
from .methods import MethodResult, PruneJob, get_method
from .methods.base import LOAD_MODES, check_prune_options  # noqa: F401  (LOAD_MODES: also api's name)
from .models.loading import resolve_device
from .pruning import PRUNERS, Pattern

Progress = Callable[[str, int, int, str], None]


@dataclass
class PruneOutcome:
    model: Any
    tokenizer: Any
    manifest: Manifest
    out: Path | None = None
    result: MethodResult | None = None

    def summary(self) -> dict:
        m = self.manifest
        return {
            "out": str(self.out) if self.out else None,
            "method": m.method,
            "hyperparameters": m.hyperparameters,
            "sparsity": {k: v for k, v in m.sparsity.items() if k != "per_module"},
            "block_ratios": m.block_ratios,
            "parameters": m.parameters,
            "timings": m.timings,
            "calibration": m.calibration,
        }


def prune(
    model: str | Any,
    method: str,
    *,
    sparsity: float | None = None,
    pattern: str = "unstructured",
    pruner: str | None = None,
    calib: str | None = None,
    calib_format: str | None = None,
    nsamples: int | None = None,
    seqlen: int | None = None,
    seed: int = 0,
    num_incontext: int | None = None,
    text_field: str | None = None,
    out: str | Path | None = None,
    force: bool = False,
    device: str = "auto",
    dtype: str = "auto",
    batch_size: int = 8,
    offload_activations: bool = False,
    max_gpu_memory: str | int | None = None,
    include: str | None = None,
    exclude: str | None = None,
    revision: str | None = None,
    method_options: dict | None = None,
    pruner_options: dict | None = None,
    tokenizer: Any = None,
    progress: Progress | None = None,
    load: str = "lazy",
) -> PruneOutcome:
    """Compress ``model`` (hub id, local dir, built-in name, or an already loaded model) with ``method``.

    ``calib`` / ``calib_format`` / ``nsamples`` / ``seqlen`` left as None take the method's paper
    defaults (random c4 windows, 128 × 2048 for the Wanda lineage; FinerCut's first 10 × 256 tokens
    of WikiText-2, format ``prefix``; CD-MoE's 100 × 256 C4 windows). The manifest records the
    resolved values.

    ``load``: ``"lazy"`` (default: decoder blocks stay on disk until used, host RAM ≈ one block; falls
    back to memory with the reason in the manifest) or ``"in-memory"`` (the whole model first)."""
    t_start = time.perf_counter()
    entry = get_method(method)
    calib = entry.calibration_setting("calib", calib)
    calib_format = entry.calibration_setting("format", calib_format)
    nsamples = entry.calibration_setting("nsamples", nsamples)
    default_seqlen = entry.calibration_setting("seqlen", None)  # an unset seqlen: this, fitted to the model
    pat, config, pruner_name = check_prune_options(entry, sparsity=sparsity, pattern=pattern, pruner=pruner,
                                                   include=include, exclude=exclude, load=load,
                                                   method_options=method_options or {})
    model_name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "in-memory")
    if out is not None:  # before any compute: never an input, a foreign directory, the cwd, ...
        from .outputs import option_inputs

        # every path an option reads is an input (--calib file:..., --from-order, any method option)
        check_output_dir(out, force, input_path=model if isinstance(model, str) else None,
                         inputs=option_inputs(calib, config.model_dump(), pruner_options))
    dev = resolve_device(device)
    budget, budget_name = device_budget(dev, max_gpu_memory)  # validates the size before loading
    dev = distributed.local_device(dev)  # under torchrun: this rank's GPU
    distributed.init_from_env(dev)

    t0 = time.perf_counter()
    job = build_job(
        model, tokenizer=tokenizer, dtype=dtype, revision=revision, device=dev, sparsity=sparsity, pattern=pat,
        pruner=pruner_name, calib=calib, calib_format=calib_format, nsamples=nsamples, seqlen=seqlen,
        default_seqlen=default_seqlen, seed=seed,
        num_incontext=num_incontext, text_field=text_field, batch_size=batch_size,
        offload_activations=offload_activations, include=include, exclude=exclude, pruner_options=pruner_options,
        progress=progress, lazy=load == "lazy",
        # changed blocks are spilled beside the output: the disk that must hold the result anyway
        spill_root=Path(out).expanduser().resolve().parent if out is not None else None,
    )
    load_s = time.perf_counter() - t0
    # where a method may keep resumable state beside the output (evopress: <out>.search-state/)
    job.out = Path(out).expanduser().resolve() if out is not None else None
    model_obj, tok, adapter = job.model, job.tokenizer, job.adapter
    from .methods.sparsify import validate_pattern

    validate_pattern(job, [pat] * adapter.num_blocks)
    if include or exclude:
        from .methods.sparsify import check_selection

        check_selection(job)
    memory = None
    if entry.needs_calibration(job, config):
        from .methods.sparsify import plan_activation_memory

        job.fit_calibration()  # an unset --seqlen fits the model's context before the memory plan reads it

        needs = PRUNERS[pruner_name].needs if entry.kind == "sparsity" else "none"
        memory = plan_activation_memory(job, budget, needs, budget_name)
        job.offload_activations = memory.offload_activations
    params_before = count_parameters(model_obj)
    t0 = time.perf_counter()
    result = entry.run(job, config)
    method_s = time.perf_counter() - t0

    measured = measure_sparsity(adapter)
    uses_calib = entry.needs_calibration(job, config)
    calib_record = None
    if uses_calib and job._calibration_data is not None:
        calib_record = dict(job.calibration.to_dict(), hash=job._calibration_data.hash,
                            **job._calibration_data.provenance(),
                            **({"seqlen_default": job.seqlen_default} if job.seqlen_default is not None else {}))
    hyper = {
        "sparsity": job.sparsity,
        "pattern": str(pat),
        "pruner": pruner_name if entry.kind == "sparsity" else None,
        "include": include,
        "exclude": exclude,
        "device": str(dev),
        "batch_size": batch_size,
        "loading": getattr(model_obj, "_compresskit_loading", "in-memory: model object passed in"),
        **(memory.record() if memory is not None else {}),
        **({"data_parallel_ranks": distributed.world_size()} if distributed.is_active() else {}),
        **job.pruner_options,
        **result.config,
    }
    base_model, stages = _previous_stages(model)
    structure = _structure(model_obj, result)
    manifest = Manifest(
        base_model=str(base_model or _provenance_name(model_name)),
        stages=stages,
        revision=stages[-1].get("revision") if stages else _resolved_revision(model, model_obj, revision),
        method=method,
        hyperparameters=hyper,
        calibration=calib_record,
        block_ratios=result.block_ratios,
        method_details=result.details,
        sparsity=measured,
        parameters={
            "total_before": params_before,
            "total_after": count_parameters(model_obj),
            "decoder_linear": measured["decoder_linear_params"],
            "decoder_linear_nonzero": measured["decoder_linear_params"] - measured["decoder_linear_zeros"],
        },
        structure=structure,
        loadable_with_transformers=not structure,
        form_reason=_form_reason(result, structure),
        dtype=str(next(model_obj.parameters()).dtype).removeprefix("torch."),
        timings={"load_s": load_s, "method_s": method_s, **result.timings},
    )
    out_path = None
    if out is not None and distributed.is_writer():  # data-parallel: rank 0 writes, the others wait
        t0 = time.perf_counter()
        manifest.timings["total_s"] = time.perf_counter() - t_start
        try:
            out_path = save_checkpoint(model_obj, tok, out, manifest, force=force)
        except BaseException:
            # nothing of a failed save stays beside the output, spills of a lazily loaded model included
            store = getattr(model_obj, "_compresskit_lazy_store", None)
            if store is not None:
                store.discard_spills()
            raise
        manifest.timings["save_s"] = time.perf_counter() - t0
        manifest.write(out_path)
    distributed.barrier()
    manifest.timings["total_s"] = time.perf_counter() - t_start
    return PruneOutcome(model=model_obj, tokenizer=tok, manifest=manifest, out=out_path, result=result)


def build_job(
    model, *, tokenizer=None, dtype="auto", revision=None, device="auto", sparsity=None, pattern="unstructured",
    pruner="wanda", calib="c4", calib_format="window", nsamples=128, seqlen=None, default_seqlen=2048, seed=0,
    num_incontext=None, text_field=None, batch_size=8, offload_activations=False, include=None, exclude=None,
    pruner_options=None, progress=None, lazy=True, spill_root=None,
) -> PruneJob:
    """Load the model (unless given one), find its adapter, and gather the shared options.

    Options are validated before the model is loaded. ``seqlen`` None: ``default_seqlen``, lowered
    to the model's context (``PruneJob.fit_calibration``, when calibration is first needed); a given
    ``seqlen`` is checked against the model's position limit at that point."""
    from .calibration import CalibrationSpec
    from .models import get_adapter

    pat = Pattern.parse(pattern)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"--batch-size must be an integer >= 1, got {batch_size!r}")
    spec_kwargs = dict(source=calib, format=calib_format, nsamples=nsamples,
                       seqlen=default_seqlen if seqlen is None else seqlen, seed=seed, text_field=text_field)
    if num_incontext is not None:
        spec_kwargs["num_incontext"] = num_incontext
    calibration = CalibrationSpec(**spec_kwargs)
    from .calibration.registry import parse_source

    parse_source(calib, text_field=text_field)  # a malformed or unknown --calib fails before the model loads
    if isinstance(model, str):
        # Decoder blocks stay on disk until onload reads them (checkpoint/reader.py); a
        # compresskit checkpoint (a second stage) gets its replaced modules rebuilt too.
        from .checkpoint.reader import open_model

        loaded = open_model(model, dtype=dtype, revision=revision, lazy=lazy, spill_root=spill_root)
        model_obj, tok = loaded.model, loaded.tokenizer
    else:
        model_obj, tok = model, tokenizer
    return PruneJob(
        model=model_obj,
        tokenizer=tok,
        adapter=get_adapter(model_obj),
        device=resolve_device(device),
        sparsity=sparsity if pat.kind == "unstructured" else pat.sparsity,
        pattern=pat,
        pruner=pruner,
        calibration=calibration,
        seqlen_given=seqlen is not None,
        batch_size=batch_size,
        offload_activations=offload_activations,
        include=include,
        exclude=exclude,
        pruner_options=dict(pruner_options or {}),
        progress=progress,
    )


def _structure(model_obj, result) -> list[dict]:
    """The output's module replacements, read off the model (``checkpoint.describe_structure``):
    the input checkpoint's and this stage's, renumbered and merged as the model now holds them."""
    from .checkpoint.structure import describe_structure

    structure = describe_structure(model_obj)
    missing = {e.get("kind") for e in result.structure} - {e["kind"] for e in structure}
    if missing:  # a method replaced modules of a kind that cannot be read back: a bug, not a user error
        raise RuntimeError(f"structure kind(s) {sorted(missing)} are not described by the model's modules")
    return structure


def _form_reason(result, structure: list[dict]) -> str | None:
    """The method's own reason, unless earlier stages left module replacements that keep the output
    from being stock although this stage's result alone would be (FinerCut stubs, then CD-MoE stock)."""
    if structure and not result.structure:
        kinds = ", ".join(sorted({e["kind"] for e in structure}))
        return (f"not a stock checkpoint: an earlier stage's {kinds} stays (this stage alone"
                + (f": {result.form_reason}" if result.form_reason else " would be stock") + ")")
    return result.form_reason


def _torch_dtype(name: str) -> torch.dtype:
    from .models import resolve_dtype

    return resolve_dtype(name)


def _previous_stages(model) -> tuple[str | None, list[dict]]:
    """Base model and stage history of an input that is itself a compresskit checkpoint."""
    if not isinstance(model, str):
        return None, []
    path = Path(model).expanduser()
    if not (path / MANIFEST_NAME).is_file():
        return None, []
    previous = Manifest.read(path)
    record = previous.model_dump(exclude={"stages"})
    record["sparsity"] = {k: v for k, v in previous.sparsity.items() if k != "per_module"}
    record["path"] = str(path.resolve())
    return previous.base_model, [*previous.stages, record]


def _provenance_name(name: str) -> str:
    """What the manifest's ``base_model`` records: built-in names and Hub ids as typed, a local
    directory as its absolute path (so ``eval --baseline`` works from any directory)."""
    from .models.builtin import is_builtin

    if is_builtin(name):
        return name
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def _resolved_revision(model, model_obj, requested: str | None) -> str | None:
    """A Hub model's commit sha as transformers resolved it, else the requested revision."""
    if not isinstance(model, str) or Path(model).expanduser().exists():
        return requested
    from .models.builtin import is_builtin

    if is_builtin(model):
        return requested
    return getattr(getattr(model_obj, "config", None), "_commit_hash", None) or requested


def load(path: str | Path, device: str = "cpu", dtype=None):
    """Load a compresskit checkpoint (any kind) as a transformers model."""
    from .checkpoint import load as _load

    return _load(path, device=str(resolve_device(device)), dtype=dtype)


def inspect(path: str | Path) -> Manifest:
    return Manifest.read(Path(path))


def evaluate_perplexity(
    path_or_model,
    dataset: str = "wikitext2",
    seqlen: int | None = None,
    device: str = "auto",
    batch_size: int = 1,
    max_windows: int | None = None,
    tokenizer=None,
    progress=None,
) -> dict:
    """The papers' windowed perplexity of a checkpoint directory, model name, or in-memory model.
    ``seqlen`` None: 2048, or the model's context when shorter (a note says so), as ``eval`` does;
    a given one above the context is an error."""
    from .evaluation.perplexity import perplexity
    from .models.context import fit_seqlen

    dev = resolve_device(device)
    if isinstance(path_or_model, (str, Path)):
        path = Path(path_or_model)
        if path.is_dir() and (path / "compresskit.json").exists():
            model, tok = load_with_tokenizer(path, device=str(dev))
        else:
            from .models import load_model

            model, tok = load_model(str(path_or_model), device=str(dev))
    else:
        model, tok = path_or_model, tokenizer
        move_model(model, dev)
    seqlen, _ = fit_seqlen(model, seqlen, 2048)
    return perplexity(model, tok, dataset, seqlen=seqlen, batch_size=batch_size, device=dev,
                      max_windows=max_windows, progress=progress)
