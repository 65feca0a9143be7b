"""The results file of one evaluation: a versioned JSON schema (pydantic), saved atomically.

Every number carries what is needed to compare it honestly with another run or a paper: the
perplexity protocol (seqlen, windows, join), the lm-eval metric key / task version / fewshot /
limit, the versions of lm-eval, torch and transformers, and where timings were taken. Bump
``SCHEMA_VERSION`` whenever a field changes meaning; ``load`` refuses other versions instead of
misreading them.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from compresskit.errors import EvaluationError
from compresskit.evaluation.task_sets import TaskSet, choose_metric, load_task_sets, unweighted_mean
from compresskit.outputs import write_text

SCHEMA_VERSION = 1


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelInfo(_Model):
    path: str | None = None
    base_model: str | None = None
    method: str | None = None
    manifest: dict[str, Any] | None = None  # summary of the checkpoint's compresskit.json


class PerplexityResult(_Model):
    """Exactly what ``perplexity.perplexity`` returns (non-overlapping windows, methods.md §1.4)."""

    value: float
    seqlen: int
    n_windows: int
    tokens: int  # tokens scored: n_windows · seqlen
    total_tokens: int | None = None  # tokens in the text, remainder included
    join: str | None = None  # how documents were joined ("\n\n" for WikiText-2, " " for C4)
    source: str | None = None  # file path or dataset id the text came from
    dataset: str | None = None
    seconds: float | None = None
    requested: str | None = None  # what was asked when a fallback chain chose `dataset` (``auto``)
    fallback: str | None = None  # why the chain's earlier choice (WikiText-2) was skipped


class MetricValue(_Model):
    value: float
    stderr: float | None = None


class TaskResult(_Model):
    metric: str  # the metric reported in `value` (acc / acc_norm / ...), chosen by the set's preference
    value: float
    stderr: float | None = None
    version: str | None = None  # lm-eval task version
    fewshot: int = 0
    limit: int | float | None = None
    n: int | None = None  # examples scored
    metrics: dict[str, MetricValue] = Field(default_factory=dict)  # every metric lm-eval reported
    aggregation: Literal["lm-eval", "mean-of-subtasks"] = "lm-eval"
    subtasks: dict[str, float] = Field(default_factory=dict)
    sets: list[str] = Field(default_factory=list)

    def metric_value(self, metric: str) -> float | None:
        if metric in self.metrics:
            return self.metrics[metric].value
        return self.value if metric == self.metric else None


class TaskSetResult(_Model):
    mean: float | None
    tasks: list[str]  # tasks of the set present in this result
    metrics: dict[str, str] = Field(default_factory=dict)  # task → metric averaged
    complete: bool  # every task of the set is present
    matches_protocol: bool  # complete, and every task ran with the set's fewshot and limit


class Efficiency(_Model):
    params_total: int | None = None
    params_decoder_linear: int | None = None
    nonzeros_total: int | None = None
    nonzeros_decoder_linear: int | None = None
    disk_bytes: int | None = None
    peak_memory_bytes: int | None = None
    peak_memory_kind: str | None = None  # "cuda_max_allocated" | "cpu_maxrss_delta"
    prefill_tokens_per_s: float | None = None
    decode_tokens_per_s: float | None = None
    timing_device: Literal["cpu", "cuda"] | None = None
    note: str | None = None


def _version_of(module: str) -> str | None:
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return None
    try:
        return version(module)
    except PackageNotFoundError:
        return None


def _compresskit_version() -> str:
    import compresskit

    return getattr(compresskit, "__version__", None) or _version_of("compresskit") or "unknown"


class EvalResult(_Model):
    schema_version: Literal[1] = SCHEMA_VERSION
    model: ModelInfo = Field(default_factory=ModelInfo)
    created: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    compresskit_version: str = Field(default_factory=_compresskit_version)
    lm_eval_version: str | None = None
    torch_version: str | None = Field(default_factory=lambda: _version_of("torch"))
    transformers_version: str | None = Field(default_factory=lambda: _version_of("transformers"))
    device: str | None = None
    dtype: str | None = None
    perplexity: dict[str, PerplexityResult] = Field(default_factory=dict)
    tasks: dict[str, TaskResult] = Field(default_factory=dict)
    task_sets: dict[str, TaskSetResult] = Field(default_factory=dict)
    efficiency: Efficiency | None = None
    extra: dict[str, Any] = Field(default_factory=dict)

    @property
    def label(self) -> str:
        """Short name for tables: the checkpoint folder, else the method, else "model"."""
        if self.model.path:
            return Path(self.model.path.rstrip("/")).name or self.model.path
        return self.model.method or "model"

    def add_lm_eval(self, lm_eval_output: dict) -> EvalResult:
        """Merge ``run_lm_eval``'s output (tasks + lm-eval version) and refresh the set means."""
        self.lm_eval_version = lm_eval_output.get("lm_eval_version", self.lm_eval_version)
        for name, task in lm_eval_output.get("tasks", {}).items():
            self.tasks[name] = TaskResult.model_validate(task)
        return compute_set_means(self)

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (a temp file in the same folder, then rename over the target), with the
        permissions of a normal file (umask); a write failure (disk full, permissions) is one
        ``OutputError`` line. Callers check the path first (``compresskit.outputs.OutputGuard``)."""

        return write_text(path, self.model_dump_json(indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> EvalResult:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise EvaluationError(f"results file {path} not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise EvaluationError(f"results file {path} is not valid JSON ({exc}); re-run the evaluation") from exc
        if not isinstance(data, dict):
            raise EvaluationError(f"results file {path} must hold a JSON object; re-run the evaluation")
        found = data.get("schema_version")
        if found != SCHEMA_VERSION:
            raise EvaluationError(
                f"results file {path} has schema_version {found!r}, this compresskit reads version "
                f"{SCHEMA_VERSION}; re-run the evaluation to regenerate it"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            raise EvaluationError(f"results file {path}: field {where}: {err['msg']}") from exc


def set_result(result: EvalResult, task_set: TaskSet) -> TaskSetResult | None:
    """The set's unweighted mean over the tasks present, each with the set's preferred metric."""
    present = [t for t in task_set.tasks if t.name in result.tasks]
    if not present:
        return None
    values, metrics = [], {}
    for t in present:
        task = result.tasks[t.name]
        metric = choose_metric(list(task.metrics) or [task.metric], t.metrics)
        metrics[t.name] = metric
        values.append(task.metric_value(metric))
    complete = len(present) == len(task_set.tasks)
    protocol = all(
        result.tasks[t.name].fewshot == t.fewshot and result.tasks[t.name].limit == t.limit for t in present
    )
    return TaskSetResult(
        mean=unweighted_mean(values),
        tasks=[t.name for t in present],
        metrics=metrics,
        complete=complete,
        matches_protocol=complete and protocol,
    )


def compute_set_means(result: EvalResult, sets: dict[str, TaskSet] | None = None) -> EvalResult:
    """Fill ``result.task_sets`` for every named set that has at least one task in the result.

    A set mean over missing tasks is still reported (``complete: false``) so partial runs are
    visible, but only a complete set is comparable with a paper's number.
    """
    sets = load_task_sets() if sets is None else sets
    result.task_sets = {
        name: res for name, task_set in sets.items() if (res := set_result(result, task_set)) is not None
    }
    return result
