"""Regression checks: flat metric names over an ``EvalResult`` and thresholds on them.

A CI job ("compression-regression job") fails when quality, size or speed drifts past limits
written in a recipe. Metric names are flat strings derived from the results file:

* ``<ppl>_ppl``           perplexity: ``wikitext2_ppl``, ``c4_ppl``, ``<file stem>_ppl``
* ``<set>_mean``          a named task set's mean: ``zeroshot7_mean``, ``cdmoe8_mean``
* ``<task>_<metric>``     any metric lm-eval reported: ``piqa_local_acc``, ``boolq_acc``,
                          ``hellaswag_acc_norm``
* ``<task>``              the task's headline metric (the one its set averages)
* efficiency fields:      ``params_total``, ``params_decoder_linear``, ``nonzeros_total``,
                          ``nonzeros_decoder_linear``, ``disk_bytes``, ``peak_memory_bytes``,
                          ``prefill_tokens_per_s``, ``decode_tokens_per_s``
* ``sparsity``            measured decoder-linear sparsity from the checkpoint's manifest

Rules: ``min`` / ``max`` bound the value; ``min_ratio`` / ``max_ratio`` bound value / baseline
(the dense model evaluated with the same settings); ``min_retention`` is ``min_ratio`` under the
name FinerCut and CD-MoE use for accuracy ("keeps 90 % of the accuracy" = ``min_retention: 0.9``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, model_validator

from compresskit.errors import EvaluationError
from compresskit.evaluation.results import Efficiency, EvalResult

EFFICIENCY_METRICS: tuple[str, ...] = tuple(
    name for name, info in Efficiency.model_fields.items() if info.annotation in (int | None, float | None)
)
RATIO_RULES = ("min_ratio", "max_ratio", "min_retention")


class Threshold(BaseModel):
    """One metric's limits; every rule given must hold."""

    model_config = ConfigDict(extra="forbid")

    min: float | None = None
    max: float | None = None
    min_ratio: float | None = None
    max_ratio: float | None = None
    min_retention: float | None = None

    @model_validator(mode="after")
    def _at_least_one(self) -> Threshold:
        if not self.rules():
            raise ValueError("give at least one of min, max, min_ratio, max_ratio, min_retention")
        return self

    def rules(self) -> dict[str, float]:
        return {k: v for k, v in self.model_dump().items() if v is not None}

    @property
    def needs_baseline(self) -> bool:
        return any(rule in RATIO_RULES for rule in self.rules())


def metric_values(result: EvalResult) -> dict[str, float]:
    """Every flat metric name the result can answer, with its value."""
    out: dict[str, float] = {}
    for key, ppl in result.perplexity.items():
        out[f"{key}_ppl"] = ppl.value
    for name, task_set in result.task_sets.items():
        if task_set.mean is not None:
            out[f"{name}_mean"] = task_set.mean
    for name, task in result.tasks.items():
        out[name] = task.value
        out[f"{name}_{task.metric}"] = task.value
        for metric, value in task.metrics.items():
            out[f"{name}_{metric}"] = value.value
    if result.efficiency is not None:
        for field in EFFICIENCY_METRICS:
            value = getattr(result.efficiency, field)
            if value is not None:
                out[field] = float(value)
    sparsity = (result.model.manifest or {}).get("sparsity")
    if isinstance(sparsity, (int, float)):
        out["sparsity"] = float(sparsity)
    return out


@dataclass(frozen=True)
class CheckOutcome:
    metric: str
    rule: str  # "min" | "max" | "min_ratio" | "max_ratio" | "min_retention"
    threshold: float
    value: float
    baseline: float | None  # the dense value, for ratio rules
    observed: float  # what was compared: the value, or value / baseline
    passed: bool

    def describe(self) -> str:
        """``wikitext2_ppl = 35.2 > max 30`` / ``zeroshot7_mean ratio 0.85 (0.52 / 0.61) < min_retention 0.9``."""
        ok = "within" if self.passed else ("below" if self.rule.startswith("min") else "above")
        if self.baseline is None:
            return f"{self.metric} = {self.value:.6g} {ok} {self.rule} {self.threshold:g}"
        return (
            f"{self.metric} ratio {self.observed:.4g} ({self.value:.6g} / dense {self.baseline:.6g}) "
            f"{ok} {self.rule} {self.threshold:g}"
        )


def check_one(metric: str, rule: str, threshold: float, value: float, baseline: float | None = None) -> CheckOutcome:
    """Pure rule arithmetic; a ratio against a zero baseline is undefined and refused."""
    if rule in RATIO_RULES:
        if baseline is None:
            raise EvaluationError(f"check {metric}.{rule} needs a dense baseline evaluation; set `baseline:` in the recipe")
        if baseline == 0:
            raise EvaluationError(f"check {metric}.{rule}: the dense value is 0, so a ratio is undefined; use min/max")
        observed = value / baseline
    else:
        observed, baseline = value, None
    passed = observed >= threshold if rule.startswith("min") else observed <= threshold
    return CheckOutcome(metric, rule, threshold, value, baseline, observed, passed)


def evaluate_checks(
    checks: Mapping[str, Threshold], result: EvalResult, baseline: EvalResult | None = None
) -> list[CheckOutcome]:
    """One outcome per (metric, rule), in recipe order. A metric the results do not hold is an
    input error (a typo in the recipe must not pass silently), not a failed check."""
    values = metric_values(result)
    dense = metric_values(baseline) if baseline is not None else {}
    outcomes = []
    for metric, threshold in checks.items():
        if metric not in values:
            known = ", ".join(sorted(values)) or "none"
            raise EvaluationError(f"check {metric!r}: no such metric in the results (available: {known})")
        for rule, limit in threshold.rules().items():
            base = None
            if rule in RATIO_RULES:
                if baseline is not None and metric not in dense:
                    raise EvaluationError(f"check {metric!r}: the dense baseline results have no {metric}")
                base = dense.get(metric)
            outcomes.append(check_one(metric, rule, limit, values[metric], base))
    return outcomes
