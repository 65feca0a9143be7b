"""Zero-shot / few-shot scores through lm-eval 0.4.x, with the model that is already in memory.

The Wanda lineage patched lm-eval so ``simple_evaluate`` could score the pruned model without
saving it (methods.md §1.5); lm-eval 0.4 does this natively: ``HFLM(pretrained=<nn.Module>)``.
Task names may be lm-eval tasks, groups or tags, named sets from ``compresskit/evaluation/tasks/sets.yaml``
(``zeroshot7``, ``cdmoe8``, ``finercut9``) or local task YAMLs (``tasks/`` of the repository and
``task_files``), which is how offline machines evaluate (``piqa_local``).

The raw lm-eval output is normalised to one entry per requested name: the metric used (by the
set's preference, see ``task_sets``), its value and stderr, every metric lm-eval reported, the
task version, fewshot, limit and number of scored examples — the things a paper table needs to
be comparable (methods.md §11.3: "store the metric key per task and the lm-eval version").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import yaml

from compresskit import hub
from compresskit.errors import EvaluationError
from compresskit.models.placement import move_model
from compresskit.evaluation.task_sets import (
    DEFAULT_METRICS,
    TaskSet,
    choose_metric,
    load_task_sets,
    tasks_dir,
    unweighted_mean,
)
from compresskit.compat import internal

# lm-eval's "auto" batch size grows until CUDA runs out of memory; on CPU nothing ever fails, so
# it would settle on its maximum (64 sequences of full context). Use a fixed size there instead.
CPU_AUTO_BATCH_SIZE = 8
_LOAD_ERRORS = (KeyError, ValueError, TypeError, OSError, ImportError, AttributeError, yaml.YAMLError)
_OFFLINE_HINT = "pass a local task YAML with --task-file, or use a task shipped with compresskit (e.g. --tasks piqa_local)"


@dataclass(frozen=True)
class TaskRequest:
    """One name to evaluate and the protocol to run it under."""

    name: str
    fewshot: int = 0
    limit: int | float | None = None
    # metric preference and set membership do not change what runs: every metric is kept
    metrics: tuple[str, ...] = field(default=DEFAULT_METRICS, compare=False)
    seed: int = 0
    sets: tuple[str, ...] = field(default=(), compare=False)

    def protocol(self) -> str:
        return f"fewshot {self.fewshot}, limit {self.limit}, seed {self.seed}"


def expand_requests(
    tasks: str | Sequence[str],
    *,
    sets: Mapping[str, TaskSet],
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    seed: int | None = None,
) -> list[TaskRequest]:
    """Set names → their tasks with the set's per-task protocol; explicit arguments override it.

    A task requested twice under the same protocol (e.g. ``boolq`` in two sets) runs once; under
    two different protocols it is an error, since one results file holds one score per task.
    """
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    out: dict[str, TaskRequest] = {}

    def add(req: TaskRequest) -> None:
        prior = out.get(req.name)
        if prior is None:
            out[req.name] = req
        elif prior != req:
            raise EvaluationError(
                f"task {req.name!r} is requested under two protocols ({prior.protocol()} vs {req.protocol()}); "
                "evaluate the sets separately"
            )
        else:  # same run; the first set's metric preference is the task's headline metric
            out[req.name] = TaskRequest(**{**prior.__dict__, "sets": prior.sets + req.sets})

    for name in filter(None, names):
        if name in sets:
            task_set = sets[name]
            for t in task_set.tasks:
                add(
                    TaskRequest(
                        name=t.name,
                        fewshot=t.fewshot if num_fewshot is None else num_fewshot,
                        limit=t.limit if limit is None else limit,
                        metrics=t.metrics,
                        seed=task_set.seed if seed is None else seed,
                        sets=(name,),
                    )
                )
        else:
            add(TaskRequest(name=name, fewshot=num_fewshot or 0, limit=limit, seed=seed or 0))
    if not out:
        raise EvaluationError(
            "no lm-eval task given; name tasks (e.g. piqa_local) or a set (zeroshot7, cdmoe8, finercut9)"
        )
    return list(out.values())


# ----------------------------------------------------------------------------- task lookup
def _yaml_task_name(path: Path) -> str:
    load_yaml = internal("lm_eval.tasks._yaml_loader.load_yaml")
    try:
        cfg = load_yaml(path, resolve_func=False)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise EvaluationError(f"task file {path} cannot be read: {str(exc).splitlines()[0]}") from exc
    name = cfg.get("task") if isinstance(cfg.get("task"), str) else cfg.get("group")
    if not isinstance(name, str):
        raise EvaluationError(f"task file {path} has no `task:` (or `group:`) name")
    return name


def _split_task_files(task_files: Iterable[str | Path]) -> tuple[list[Path], dict[str, str]]:
    """Task files → folders for lm-eval's index, and YAML path → task name for paths used as names.

    A file's whole folder is indexed (lm-eval's ``--include_path`` semantics), so a group YAML
    finds its member tasks beside it.
    """
    dirs: list[Path] = []
    names: dict[str, str] = {}
    for entry in task_files:
        path = Path(entry).expanduser()
        if path.is_dir():
            dirs.append(path.resolve())
        elif path.is_file():
            dirs.append(path.resolve().parent)
            names[str(entry)] = _yaml_task_name(path)
        else:
            raise EvaluationError(f"task file {path} not found")
    return list(dict.fromkeys(dirs)), names


def _local_task_manager(include_paths: tuple[str, ...]):
    """Only the local folders: indexing them takes milliseconds, so it is redone every call."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_paths), include_defaults=False)


@lru_cache(maxsize=2)
def _full_task_manager(include_paths: tuple[str, ...]):
    """Indexing lm-eval's ~15k built-in YAMLs takes seconds: done once per process."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_paths), include_defaults=True)


def _resolve_task_manager(names: list[str], dirs: list[Path]):
    """The cheapest task index that knows every name; built-in tasks must be able to get their data."""
    include = tuple(str(p) for p in [tasks_dir(), *dirs] if p.is_dir())
    local = _local_task_manager(include)
    missing = [n for n in names if n not in local.all_tasks]
    if not missing:
        return local
    manager = _full_task_manager(include)
    for name in missing:
        if name not in manager.all_tasks:
            raise EvaluationError(f"unknown lm-eval task {name!r}; for a local task {_OFFLINE_HINT}")
    if not hub.offline_forced() and not hub.hub_reachable():
        raise EvaluationError(
            f"lm-eval task {missing[0]!r} reads its data from the Hugging Face Hub, which is unreachable; "
            f"{_OFFLINE_HINT} (or set HF_DATASETS_OFFLINE=1 to use a local datasets cache)"
        )
    return manager


def _load(manager, name: str):
    """The Task / Group object(s) for one name; data are read here, so offline failures show up here."""
    try:
        loaded = manager.load([name])
    except _LOAD_ERRORS as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise EvaluationError(f"lm-eval task {name!r} could not be loaded ({reason}); {_OFFLINE_HINT}") from exc
    if name in loaded.get("groups", {}):
        return [loaded["groups"][name]], list(loaded["tasks"])
    if name in loaded["tasks"]:
        return [loaded["tasks"][name]], [name]
    return list(loaded["tasks"].values()), list(loaded["tasks"])  # a tag: its member tasks


def _refuse_overlap(batch: list[TaskRequest], loaded: Mapping[str, tuple]) -> None:
    """lm-eval refuses one leaf task in two requested groups/tags of a run; say which, up front."""
    owner: dict[str, str] = {}
    for req in batch:
        for leaf in loaded[req.name][2]:
            if leaf in owner and owner[leaf] != req.name:
                raise EvaluationError(
                    f"task {leaf!r} is part of both {owner[leaf]!r} and {req.name!r}; request only one of them"
                )
            owner[leaf] = req.name


# ----------------------------------------------------------------------------- normalisation
def parse_metrics(entry: Mapping[str, Any]) -> dict[str, dict[str, float | None]]:
    """lm-eval's ``{"acc,none": v, "acc_stderr,none": s}`` → ``{"acc": {"value": v, "stderr": s}}``.

    Metrics under a filter other than ``none`` keep it in their name (``exact_match,strict-match``).
    """
    values: dict[str, float] = {}
    stderrs: dict[str, float | None] = {}
    for key, val in entry.items():
        if "," not in key:
            continue
        metric, filt = key.split(",", 1)
        is_stderr = metric.endswith("_stderr")
        metric = metric.removesuffix("_stderr")
        name = metric if filt == "none" else f"{metric},{filt}"
        number = float(val) if isinstance(val, (int, float)) and not isinstance(val, bool) else None
        if is_stderr:
            stderrs[name] = number
        elif number is not None:
            values[name] = number
    return {m: {"value": v, "stderr": stderrs.get(m)} for m, v in values.items()}


def _leaves(raw: Mapping, name: str) -> list[str]:
    children = raw.get("group_subtasks", {}).get(name)
    if not children:
        return [name]
    return [leaf for child in children for leaf in _leaves(raw, child)]


def normalise_task_result(raw: Mapping, request: TaskRequest, name: str, members: list[str]) -> dict:
    """One requested name → a ``results.TaskResult``-shaped dict.

    Groups with an lm-eval aggregate (MMLU: size-weighted acc) keep lm-eval's number. Tags and
    groups without one (FinerCut's ``lambada`` = openai + standard) get the unweighted mean of
    their members' chosen metric, and say so in ``aggregation``.
    """
    results = raw["results"]
    leaves = _leaves(raw, name) if name in results else members
    n_samples = raw.get("n-samples", {})
    n = sum(n_samples[leaf]["effective"] for leaf in leaves if leaf in n_samples) or None
    metrics = parse_metrics(results.get(name, {}))
    subtasks: dict[str, float] = {}
    aggregation = "lm-eval"
    if not metrics:  # tag, or group without aggregate
        per_leaf = {leaf: parse_metrics(results[leaf]) for leaf in leaves if leaf in results}
        common = set.intersection(*(set(m) for m in per_leaf.values())) if per_leaf else set()
        metric = choose_metric(sorted(common), request.metrics)
        if metric is None:
            raise EvaluationError(f"lm-eval returned no common metric for the members of {name!r}")
        metrics = {metric: {"value": unweighted_mean(m[metric]["value"] for m in per_leaf.values()), "stderr": None}}
        subtasks = {leaf: m[metric]["value"] for leaf, m in per_leaf.items()}
        aggregation = "mean-of-subtasks"
    metric = choose_metric(metrics, request.metrics)
    if metric is None:
        raise EvaluationError(f"lm-eval returned no metric for task {name!r}")
    if not subtasks and len(leaves) > 1:
        subtasks = {
            leaf: m[metric]["value"] for leaf in leaves if metric in (m := parse_metrics(results.get(leaf, {})))
        }
    version = raw.get("versions", {}).get(name)
    return {
        "metric": metric,
        "value": metrics[metric]["value"],
        "stderr": metrics[metric]["stderr"],
        "metrics": metrics,
        "version": None if version is None else str(version),
        "fewshot": int(raw.get("n-shot", {}).get(name, request.fewshot)),
        "limit": request.limit,
        "n": n,
        "aggregation": aggregation,
        "subtasks": subtasks,
        "sets": list(request.sets),
    }


def _samples(raw: Mapping) -> dict[str, list[dict]]:
    """Per-document responses, JSON-friendly: loglikelihood tuples become lists."""

    def plain(x):
        return [plain(v) for v in x] if isinstance(x, (list, tuple)) else x

    return {
        task: [{"doc_id": s["doc_id"], "target": s.get("target"), "resps": plain(s["filtered_resps"])} for s in rows]
        for task, rows in raw.get("samples", {}).items()
    }


# ----------------------------------------------------------------------------- entry point
@contextmanager
def quiet_lm_eval():
    """While lm-eval runs, our output replaces its own: its log lines (a model passed as an object,
    a default few-shot overwritten) are kept to errors; its tqdm bars reach a terminal but not a file
    or a pipe (as our bars: the plain progress lines stand for them there); and it does not ask git
    for the current folder's commit (meaningless for our results; outside a checkout git printed
    "fatal: not a git repository")."""
    import contextlib
    import logging
    import os
    import sys
    from unittest import mock

    internal("lm_eval.evaluator.get_git_commit_hash")  # one line naming the versions if it is gone
    logger = logging.getLogger("lm_eval")
    level = logger.level
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch("lm_eval.evaluator.get_git_commit_hash", lambda: None))
        if not (getattr(sys.stderr, "isatty", None) and sys.stderr.isatty()):
            stack.enter_context(contextlib.redirect_stderr(stack.enter_context(open(os.devnull, "w"))))
        logger.setLevel(logging.ERROR)
        stack.callback(logger.setLevel, level)
        yield


@quiet_lm_eval()
def run_lm_eval(
    model: torch.nn.Module,
    tokenizer,
    tasks: str | Sequence[str],
    *,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int | str = "auto",
    seed: int | None = None,
    task_files: Iterable[str | Path] = (),
    device: str | torch.device | None = None,
    bootstrap_iters: int = 100_000,
    return_samples: bool = False,
) -> dict:
    """Score ``model`` (in memory) on lm-eval tasks / named sets; returns the normalised results.

    ``num_fewshot`` / ``limit`` / ``seed`` left as None take each set's protocol (else 0 / all / 0).
    Returns ``{"lm_eval_version", "tasks": {name: TaskResult dict}, "sets": [...]}`` plus
    ``"samples"`` (per-document responses) when ``return_samples``.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    if tokenizer is None:
        raise EvaluationError("run_lm_eval needs the model's tokenizer")
    requests = expand_requests(tasks, sets=load_task_sets(), num_fewshot=num_fewshot, limit=limit, seed=seed)
    paths = [r.name for r in requests if r.name.endswith((".yaml", ".yml")) and Path(r.name).is_file()]
    dirs, path_names = _split_task_files([*task_files, *paths])  # a task given as a YAML path is a task file
    names = {r.name: path_names.get(r.name, r.name) for r in requests}
    manager = _resolve_task_manager(list(names.values()), dirs)
    loaded = {r.name: (names[r.name], *_load(manager, names[r.name])) for r in requests}

    original_device, was_training = next(model.parameters()).device, model.training
    if device is not None:
        move_model(model, device)
    model.eval()
    if batch_size == "auto" and next(model.parameters()).device.type == "cpu":
        batch_size = CPU_AUTO_BATCH_SIZE
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out_tasks: dict[str, dict] = {}
        samples: dict[str, list[dict]] = {}
        protocols = sorted({(r.fewshot, r.limit, r.seed) for r in requests}, key=repr)
        for fewshot, lim, run_seed in protocols:
            batch = [r for r in requests if (r.fewshot, r.limit, r.seed) == (fewshot, lim, run_seed)]
            _refuse_overlap(batch, loaded)
            objects = [obj for r in batch for obj in loaded[r.name][1]]
            raw = lm_eval.simple_evaluate(
                model=lm,
                tasks=objects,
                num_fewshot=fewshot,
                limit=lim,
                task_manager=manager,
                bootstrap_iters=bootstrap_iters,
                log_samples=return_samples,
                random_seed=run_seed,
                numpy_random_seed=run_seed,
                torch_random_seed=run_seed,
                fewshot_random_seed=run_seed,
            )
            for r in batch:
                name, _, members = loaded[r.name]
                out_tasks[name] = normalise_task_result(raw, r, name, members)
            samples.update(_samples(raw))
    finally:
        if device is not None:
            move_model(model, original_device)
        model.train(was_training)
    result = {
        "lm_eval_version": lm_eval.__version__,
        "tasks": out_tasks,
        "sets": sorted({s for r in requests for s in r.sets}),
    }
    if return_samples:
        result["samples"] = samples
    return result
