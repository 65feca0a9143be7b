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

from .calibration import CalibrationSpec
from .calibration.registry import parse_source
from .checkpoint.manifest import MANIFEST_NAME, Manifest
from .checkpoint.reader import load as read_checkpoint
from .checkpoint.reader import load_with_tokenizer, open_model
from .checkpoint.structure import form_reason, stage_structure
from .checkpoint.writer import check_output_dir, save_checkpoint
from .engine import distributed
from .engine.memory_plan import device_budget
from .errors import InputError
from .evaluation.perplexity import perplexity
from .evaluation.sparsity import count_parameters, measure_sparsity
from .methods import MethodResult, PruneJob, get_method
from .methods.base import LOAD_MODES, check_prune_options  # noqa: F401  (LOAD_MODES: also api's name)
from .methods.sparsify import calibration_record, prepare_job
from .models.context import fit_seqlen
from .models.loading import resolve_device
from .models.placement import move_model
from .outputs import option_inputs
from .pruning import Pattern

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
    # 1. every option its value alone decides, before anything is loaded
    entry = get_method(method)
    calib = entry.calibration_setting("calib", calib)
    calib_format = entry.calibration_setting("format", calib_format)
    nsamples = entry.calibration_setting("nsamples", nsamples)
    default_seqlen = entry.calibration_setting("seqlen", None)  # an unset seqlen: this, fitted to the model
    pat, config, pruner_name = check_prune_options(entry, sparsity=sparsity, pattern=pattern, pruner=pruner,
                                                   include=include, exclude=exclude, load=load,
                                                   method_options=method_options or {})
    calibration = job_calibration(calib=calib, calib_format=calib_format, nsamples=nsamples, seqlen=seqlen,
                                  default_seqlen=default_seqlen, seed=seed, num_incontext=num_incontext,
                                  text_field=text_field, batch_size=batch_size)
    dev = resolve_device(device)
    budget, budget_name = device_budget(dev, max_gpu_memory)  # validates the size before loading
    # 2. the output: never an input, a foreign directory, the cwd, ... (every path an option reads is an input)
    if out is not None:
        check_output_dir(out, force, input_path=model if isinstance(model, str) else None,
                         inputs=option_inputs(calib, config.model_dump(), pruner_options))
    dev = distributed.local_device(dev)  # under torchrun: this rank's GPU
    distributed.init_from_env(dev)
    # 3. the model (checkpoint/reader.py: lazily unless --load in-memory), and the job around it
    t0 = time.perf_counter()
    loaded = open_model(model, tokenizer=tokenizer, dtype=dtype, revision=revision, lazy=load == "lazy",
                        # changed blocks are spilled beside the output: the disk that must hold the result anyway
                        spill_root=Path(out).expanduser().resolve().parent if out is not None else None)
    load_s = time.perf_counter() - t0
    job = PruneJob(model=loaded.model, tokenizer=loaded.tokenizer, adapter=loaded.adapter, device=dev,
                   sparsity=sparsity if pat.kind == "unstructured" else pat.sparsity, pattern=pat, pruner=pruner_name,
                   calibration=calibration, seqlen_given=seqlen is not None, batch_size=batch_size,
                   offload_activations=offload_activations, include=include, exclude=exclude,
                   pruner_options=dict(pruner_options or {}), progress=progress)
    # where a method may keep resumable state beside the output (evopress: <out>.search-state/)
    job.out = Path(out).expanduser().resolve() if out is not None else None
    # 4. what the model decides (pattern fits, selection matches, context, device memory), then the method
    memory = prepare_job(job, entry, config, pat, pruner_name, budget, budget_name)
    params_before = count_parameters(loaded.model)
    t0 = time.perf_counter()
    result = entry.run(job, config)
    method_s = time.perf_counter() - t0
    # 5. the record: measured, not assumed
    measured = measure_sparsity(job.adapter)
    structure = stage_structure(loaded.model, {e.get("kind") for e in result.structure})
    manifest = Manifest(
        base_model=loaded.provenance,
        stages=loaded.stages(),
        revision=loaded.revision(revision),
        method=method,
        hyperparameters={
            "sparsity": job.sparsity,
            "pattern": str(pat),
            # a config may say its kind (evopress: sparsity at --level matrix, structural at sublayer / block)
            "pruner": pruner_name if getattr(config, "prune_kind", entry.kind) == "sparsity" else None,
            "include": include,
            "exclude": exclude,
            "device": str(dev),
            "batch_size": batch_size,
            "loading": loaded.loading,
            **(memory.record() if memory is not None else {}),
            **({"data_parallel_ranks": distributed.world_size()} if distributed.is_active() else {}),
            **job.pruner_options,
            **result.config,
        },
        calibration=calibration_record(job) if entry.needs_calibration(job, config) else None,
        block_ratios=result.block_ratios,
        method_details=result.details,
        sparsity=measured,
        parameters={
            "total_before": params_before,
            "total_after": count_parameters(loaded.model),
            "decoder_linear": measured["decoder_linear_params"],
            "decoder_linear_nonzero": measured["decoder_linear_params"] - measured["decoder_linear_zeros"],
        },
        structure=structure,
        loadable_with_transformers=not structure,
        form_reason=form_reason(result.form_reason, bool(result.structure), structure),
        dtype=str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
        timings={"load_s": load_s, "method_s": method_s, **result.timings},
    )
    # 6. the checkpoint (data-parallel: rank 0 writes, the others wait)
    out_path = None
    if out is not None and distributed.is_writer():
        t0 = time.perf_counter()
        manifest.timings["total_s"] = time.perf_counter() - t_start
        out_path = save_checkpoint(loaded.model, loaded.tokenizer, out, manifest, force=force)
        manifest.timings["save_s"] = time.perf_counter() - t0
        manifest.write(out_path)
    distributed.barrier()
    manifest.timings["total_s"] = time.perf_counter() - t_start
    return PruneOutcome(model=loaded.model, tokenizer=loaded.tokenizer, manifest=manifest, out=out_path, result=result)


def job_calibration(*, calib="c4", calib_format="window", nsamples=128, seqlen=None, default_seqlen=2048, seed=0,
                    num_incontext=None, text_field=None, batch_size=8):
    """The calibration spec of a job, checked before the model loads: a malformed or unknown
    ``--calib`` and a bad ``--batch-size`` fail here. ``seqlen`` None: ``default_seqlen``, lowered to
    the model's context later (``PruneJob.fit_calibration``)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"--batch-size must be an integer >= 1, got {batch_size!r}")
    spec_kwargs = dict(source=calib, format=calib_format, nsamples=nsamples,
                       seqlen=default_seqlen if seqlen is None else seqlen, seed=seed, text_field=text_field)
    if num_incontext is not None:
        spec_kwargs["num_incontext"] = num_incontext
    calibration = CalibrationSpec(**spec_kwargs)
    parse_source(calib, text_field=text_field)
    return calibration


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
    pat = Pattern.parse(pattern)
    calibration = job_calibration(calib=calib, calib_format=calib_format, nsamples=nsamples, seqlen=seqlen,
                                  default_seqlen=default_seqlen, seed=seed, num_incontext=num_incontext,
                                  text_field=text_field, batch_size=batch_size)
    # Decoder blocks stay on disk until onload reads them (checkpoint/reader.py); a compresskit
    # checkpoint (a second stage) gets its replaced modules rebuilt too.
    loaded = open_model(model, tokenizer=tokenizer, dtype=dtype, revision=revision, lazy=lazy, spill_root=spill_root)
    return PruneJob(
        model=loaded.model,
        tokenizer=loaded.tokenizer,
        adapter=loaded.adapter,
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


def load(path: str | Path, device: str = "cpu", dtype=None):
    """Load a compresskit checkpoint (any kind) as a transformers model."""
    return read_checkpoint(path, device=str(resolve_device(device)), dtype=dtype)


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
    dev = resolve_device(device)
    if isinstance(path_or_model, (str, Path)):
        path = Path(path_or_model)
        if path.is_dir() and (path / MANIFEST_NAME).exists():
            model, tok = load_with_tokenizer(path, device=str(dev))
        else:
            loaded = open_model(str(path_or_model), device=dev)
            model, tok = loaded.model, loaded.tokenizer
    else:
        model, tok = path_or_model, tokenizer
        move_model(model, dev)
    seqlen, _ = fit_seqlen(model, seqlen, 2048)
    return perplexity(model, tok, dataset, seqlen=seqlen, batch_size=batch_size, device=dev,
                      max_windows=max_windows, progress=progress)
