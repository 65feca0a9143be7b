"""Named lm-eval task sets (``compresskit/evaluation/tasks/sets.yaml``) and the metric / mean rules that go with them.

The papers disagree on which metric they average: the Wanda lineage (zeroshot7) reports ``acc``
for every task, FinerCut reports ``acc_norm`` where a task has it and ``acc`` otherwise. A set
therefore carries a metric *preference*; the first metric lm-eval reported for a task wins and is
recorded next to the value. Sets are data (a YAML file), like lm-eval's own task definitions, so
adding a protocol needs no code.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

from compresskit.errors import EvaluationError

SETS_FILE = "sets.yaml"
# For a task named outside any set: accuracy first (what the papers average), then the usual
# metrics of generation and perplexity tasks; anything else falls back to lm-eval's first metric.
DEFAULT_METRICS: tuple[str, ...] = (
    "acc",
    "acc_norm",
    "exact_match",
    "word_perplexity",
    "perplexity",
    "bits_per_byte",
)
LOWER_IS_BETTER_METRICS = frozenset({"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"})


def tasks_dir() -> Path:
    """Local lm-eval task YAMLs shipped with compresskit as package data (``COMPRESSKIT_TASKS_DIR``
    overrides)."""
    env = os.environ.get("COMPRESSKIT_TASKS_DIR")
    return Path(env).expanduser() if env else Path(__file__).resolve().parent / "tasks"


@dataclass(frozen=True)
class SetTask:
    """One task of a set with the protocol it is run under."""

    name: str
    fewshot: int
    limit: int | float | None
    metrics: tuple[str, ...]


@dataclass(frozen=True)
class TaskSet:
    name: str
    description: str
    reference: str
    seed: int
    tasks: tuple[SetTask, ...]

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]


def _parse_set(name: str, raw: Mapping, source: Path) -> TaskSet:
    if not isinstance(raw, Mapping) or not isinstance(raw.get("tasks"), list):
        raise EvaluationError(f"task set {name!r} in {source} needs a `tasks:` list")
    defaults = {
        "fewshot": int(raw.get("fewshot", 0)),
        "limit": raw.get("limit"),
        "metrics": tuple(raw.get("metric", DEFAULT_METRICS)),
    }
    tasks = []
    for entry in raw["tasks"]:
        if isinstance(entry, str):
            tasks.append(SetTask(name=entry, **defaults))
        elif isinstance(entry, Mapping) and len(entry) == 1:
            (task_name, override), = entry.items()
            override = dict(override or {})
            tasks.append(
                SetTask(
                    name=task_name,
                    fewshot=int(override.get("fewshot", defaults["fewshot"])),
                    limit=override.get("limit", defaults["limit"]),
                    metrics=tuple(override.get("metric", defaults["metrics"])),
                )
            )
        else:
            raise EvaluationError(
                f"task set {name!r} in {source}: each task is a name or a one-key mapping, got {entry!r}"
            )
    return TaskSet(
        name=name,
        description=str(raw.get("description", "")),
        reference=str(raw.get("reference", "")),
        seed=int(raw.get("seed", 0)),
        tasks=tuple(tasks),
    )


@lru_cache(maxsize=8)
def _load_sets_file(path: Path, mtime_ns: int) -> dict[str, TaskSet]:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise EvaluationError(f"task set file {path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(raw, Mapping):
        raise EvaluationError(f"task set file {path} must map set names to definitions")
    return {name: _parse_set(name, body, path) for name, body in raw.items()}


def load_task_sets(path: Path | None = None) -> dict[str, TaskSet]:
    """All named sets, keyed by name (``zeroshot7``, ``cdmoe8``, ``finercut9``, ...)."""
    path = Path(path) if path is not None else tasks_dir() / SETS_FILE
    if not path.is_file():
        raise EvaluationError(
            f"task set file {path} not found; set COMPRESSKIT_TASKS_DIR to the folder holding {SETS_FILE}"
        )
    return _load_sets_file(path, path.stat().st_mtime_ns)


def choose_metric(available: Iterable[str], preference: Iterable[str]) -> str | None:
    """The first preferred metric that lm-eval reported, else lm-eval's first one, else None."""
    available = list(available)
    for metric in preference:
        if metric in available:
            return metric
    return available[0] if available else None


def unweighted_mean(values: Iterable[float]) -> float:
    """The papers' set score: every task counts once, whatever its size."""
    values = list(values)
    if not values:
        raise ValueError("mean of no values")
    return math.fsum(values) / len(values)


def higher_is_better(metric: str) -> bool:
    return metric not in LOWER_IS_BETTER_METRICS
