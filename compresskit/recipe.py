"""Recipes: one YAML file that says how to compress a model, evaluate it, and what must hold.

A recipe is checked into a repository and run by ``compresskit run recipe.yaml [--check]`` in
CI. Its schema (pydantic, unknown fields refused) is below; a stage's method options are
validated against the method registry (``get_method(name).config_cls``), so a method registered
later needs no change here. Every error names the field and the line to fix
(``recipe.yaml:12: stages.0.owl_m: ...``).

Strings may use ``${VAR}`` or ``${VAR:-default}``; ``COMPRESSKIT_SHARED_DIR`` defaults to
``compresskit.paths.shared_dir()`` and ``RECIPE_DIR`` is the recipe file's folder. Relative
paths are relative to the working directory, as on the command line.

Overrides (``--set stages.0.sparsity=0.6``, ``--set evaluation.limit=20``) replace one field
each before validation; the value is parsed as YAML (``0.6`` a number, ``null``, ``[a, b]``).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from .errors import CompressKitError, RecipeError, pydantic_message
from .evaluation.checks import EFFICIENCY_METRICS, Threshold
from .yaml_lines import YamlDocument, YamlSourceError, parse_yaml

BASELINE_MODES = ("auto", "always", "never")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Calibration(_Strict):
    """Calibration data shared by every stage; unset source / format / nsamples / seqlen take each
    stage's method defaults (the papers': random C4 windows 128 × 2048 for the Wanda lineage,
    FinerCut the first 10 × 256 tokens of WikiText-2, format prefix)."""

    source: str | None = None
    format: str | None = None
    nsamples: int | None = Field(None, ge=1)
    seqlen: int | None = Field(None, ge=1)
    seed: int = 0
    num_incontext: int | None = Field(None, ge=0)
    batch_size: int = Field(8, ge=1)
    offload_activations: bool = False


class Stage(BaseModel):
    """One compression step. Fields besides these are the method's own options (``owl_m``,
    ``alpha_epsilon``, ``rank_reduction``, ...), checked against the method's config class."""

    model_config = ConfigDict(extra="allow")

    method: str
    sparsity: float | None = Field(None, ge=0, lt=1)
    pattern: str = "unstructured"
    pruner: str | None = None
    include: str | None = None
    exclude: str | None = None
    blocksize: int | None = Field(None, ge=1)
    percdamp: float | None = Field(None, ge=0)

    @property
    def method_options(self) -> dict[str, Any]:
        """The method's own options; ``null`` means the method's default (so ``--set`` can unset one)."""
        return {k: v for k, v in (self.model_extra or {}).items() if v is not None}

    @property
    def pruner_options(self) -> dict[str, Any]:
        return {k: v for k, v in {"blocksize": self.blocksize, "percdamp": self.percdamp}.items() if v is not None}


class Evaluation(_Strict):
    ppl: list[str] = Field(default_factory=list)
    ppl_files: list[str] = Field(default_factory=list)
    seqlen: int | None = Field(None, ge=1)  # None: 2048, or the model's context when shorter
    max_windows: int | None = Field(None, ge=1)
    ppl_batch_size: int = Field(1, ge=1)
    tasks: list[str] = Field(default_factory=list)
    task_files: list[str] = Field(default_factory=list)
    num_fewshot: int | None = Field(None, ge=0)
    limit: int | float | None = Field(None, gt=0)
    batch_size: int | Literal["auto"] = "auto"
    seed: int | None = None
    efficiency: bool = False

    @field_validator("ppl", "tasks", mode="before")
    @classmethod
    def _comma_string(cls, value):
        return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value

    def settings(self) -> dict[str, Any]:
        """Keyword arguments of ``compresskit.evaluate``."""
        return dict(
            ppl=self.ppl, ppl_file=self.ppl_files, seqlen=self.seqlen, max_windows=self.max_windows,
            ppl_batch_size=self.ppl_batch_size, tasks=self.tasks, task_files=self.task_files,
            num_fewshot=self.num_fewshot, limit=self.limit, batch_size=self.batch_size, seed=self.seed,
            efficiency=self.efficiency,
        )


class Recipe(_Strict):
    description: str | None = None
    model: str
    revision: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    output: str | None = None  # default: out/<recipe file stem>
    force: bool = False
    calibration: Calibration = Field(default_factory=Calibration)
    stages: list[Stage] = Field(default_factory=list)
    evaluation: Evaluation = Field(default_factory=Evaluation)
    # auto: evaluate the dense model only when a ratio check needs it · always · never · PATH.json
    baseline: str = "auto"
    checks: dict[str, Threshold] = Field(default_factory=dict)

    _source: Path | None = PrivateAttr(default=None)
    _overrides: list[str] = PrivateAttr(default_factory=list)
    _sha256: str | None = PrivateAttr(default=None)

    @field_validator("baseline")
    @classmethod
    def _baseline_mode(cls, value: str) -> str:
        if value not in BASELINE_MODES and not value.endswith(".json"):
            raise ValueError("use auto, always, never, or the path of a dense eval .json")
        return value

    @property
    def source(self) -> Path | None:
        return self._source

    @property
    def needs_baseline(self) -> bool:
        if self.baseline == "always":
            return True
        return self.baseline == "auto" and any(t.needs_baseline for t in self.checks.values())

    def provenance(self) -> dict[str, Any]:
        return {"file": str(self._source) if self._source else None, "sha256": self._sha256,
                "overrides": list(self._overrides)}


# ----------------------------------------------------------------------------- text → data
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _env_defaults(source: Path | None) -> dict[str, str]:
    from .paths import cache_dir, shared_dir

    defaults = {"COMPRESSKIT_SHARED_DIR": str(shared_dir()), "COMPRESSKIT_CACHE_DIR": str(cache_dir())}
    defaults["RECIPE_DIR"] = str(source.resolve().parent) if source else os.getcwd()
    return defaults


def expand_env(value: Any, defaults: Mapping[str, str], path: tuple = ()) -> Any:
    """``${VAR}`` / ``${VAR:-default}`` in every string; an unset variable without a default is an
    error naming its field (``RecipeError`` is raised by the caller with the line)."""
    if isinstance(value, dict):
        return {k: expand_env(v, defaults, (*path, k)) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, defaults, (*path, i)) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        name, fallback = match.group(1), match.group(2)
        found = os.environ.get(name) or defaults.get(name)
        if found is None and fallback is None:
            raise _FieldError(path, f"environment variable {name} is not set; export it or write ${{{name}:-default}}")
        return found if found is not None else fallback

    return _ENV.sub(substitute, value)


class _FieldError(Exception):
    def __init__(self, loc: Sequence[str | int], message: str, missing: bool = False):
        super().__init__(message)
        self.loc, self.message, self.missing = tuple(loc), message, missing


def parse_override(text: str) -> tuple[tuple[str | int, ...], Any]:
    """``"stages.0.sparsity=0.6"`` → ``(("stages", 0, "sparsity"), 0.6)``."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"--set {text!r}: write FIELD=VALUE, e.g. --set stages.0.sparsity=0.6")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    path = tuple(int(p) if p.isdigit() else p for p in key.strip().split("."))
    return path, value


def apply_override(data: dict, path: tuple[str | int, ...], value: Any) -> None:
    """Set ``data[path] = value``, creating missing mappings; list items must already exist."""
    node: Any = data
    for i, part in enumerate(path):
        last = i == len(path) - 1
        where = ".".join(map(str, path[: i + 1]))
        if isinstance(node, list):
            if not isinstance(part, int) or not 0 <= part < len(node):
                raise RecipeError(f"--set {'.'.join(map(str, path))}: {where} is not an existing list item")
        elif isinstance(node, dict):
            part = str(part)
        else:
            raise RecipeError(f"--set {'.'.join(map(str, path))}: {where} is inside a value that is not a mapping")
        if last:
            node[part] = value
        else:
            if isinstance(node, dict) and node.get(part) is None:
                node[part] = {}
            node = node[part]


# ----------------------------------------------------------------------------- validation
def _section_model(loc: tuple) -> type[BaseModel] | None:
    """The schema class whose field list applies at ``loc`` (for "unknown field" hints)."""
    if len(loc) == 1:
        return Recipe
    if len(loc) == 2 and loc[0] in ("calibration", "evaluation"):
        return Calibration if loc[0] == "calibration" else Evaluation
    if len(loc) == 3 and loc[0] == "checks":
        return Threshold
    return None


def _pydantic_message(err: dict) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        section = _section_model(tuple(err["loc"]))
        allowed = f" (allowed: {', '.join(section.model_fields)})" if section else ""
        return "unknown field" + allowed
    return pydantic_message(err)


def _first_error(exc: ValidationError, prefix: tuple = ()) -> _FieldError:
    err = exc.errors()[0]
    loc = (*prefix, *err["loc"])
    message = _pydantic_message(err)
    if err["type"] == "extra_forbidden":
        return _FieldError(loc, message)
    return _FieldError(loc, message, missing=err["type"] == "missing")


class HealStage(_Strict):
    """A ``method: heal`` stage: ``compresskit heal``'s options (``compresskit heal --help``). The
    previous stage's checkpoint (or ``model``) is healed; the result is a checkpoint, so
    ``train: lora`` needs ``merge: true``."""

    method: Literal["heal"]
    data: list[str]
    steps: int | None = Field(None, ge=1)
    tokens: int | str | None = None
    loss: str = "kd"
    kd_weight: float | None = None
    temperature: float = 1.0
    kl_top_k: int | None = Field(None, ge=1)
    train: str = "auto"
    lora_rank: int | None = Field(None, ge=1)
    lora_alpha: float | None = None
    lora_targets: str | None = None
    merge: bool = False
    teacher: str | None = None
    teacher_device: str | None = None
    lr: float = 1e-4
    batch_size: int = Field(4, ge=1)
    seqlen: int | None = Field(None, ge=1)
    warmup: int | None = Field(None, ge=0)
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    data_format: str = "window"
    text_field: str | None = None
    seed: int = 0
    grad_checkpointing: bool = False
    eval_data: str | None = None
    eval_every: int = Field(100, ge=1)
    eval_windows: int = Field(8, ge=1)
    save_every: int = Field(100, ge=1)

    @field_validator("data", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return [value] if isinstance(value, str) else value

    def settings(self):
        """The ``HealSettings`` of this stage (its options checked)."""
        from .heal.workflow import HealSettings, parse_tokens

        fields = self.model_dump(exclude={"method", "teacher_device"})
        fields["data"] = tuple(fields["data"])
        fields["tokens"] = parse_tokens(fields["tokens"])
        settings = HealSettings(**fields)
        settings.check_options()
        if settings.steps is not None:
            settings.validate()
        return settings


def heal_stage(stage: Stage) -> HealStage:
    return HealStage.model_validate({"method": stage.method, **(stage.model_extra or {})})


def _validate_heal_stage(i: int, stage: Stage) -> None:
    here = ("stages", i)
    for name in ("sparsity", "pruner", "include", "exclude", "blocksize", "percdamp"):
        if getattr(stage, name) is not None:
            raise _FieldError((*here, name), "does not apply to a heal stage; drop it")
    if stage.pattern != "unstructured":
        raise _FieldError((*here, "pattern"), "does not apply to a heal stage; drop it")
    try:
        healing = heal_stage(stage)
    except ValidationError as exc:
        err = _first_error(exc, here)
        if exc.errors()[0]["type"] == "extra_forbidden":
            err.message = f"unknown option for a heal stage (allowed: {', '.join(HealStage.model_fields)})"
        raise err from None
    if i == 0:
        raise _FieldError((*here, "method"), "a heal stage heals the checkpoint of an earlier stage; put a "
                                             "compression stage before it")
    try:
        settings = healing.settings()
    except CompressKitError as exc:
        raise _FieldError(here, str(exc)) from None
    if settings.train == "lora" and not settings.merge:
        raise _FieldError((*here, "merge"), "a recipe's heal stage writes a checkpoint: with train: lora set "
                                            "merge: true", missing=True)


def _validate_stage(i: int, stage: Stage) -> None:
    from .methods import get_method
    from .pruning import PRUNERS, Pattern

    here = ("stages", i)
    if stage.method == "heal":
        _validate_heal_stage(i, stage)
        return
    try:
        entry = get_method(stage.method)
    except CompressKitError as exc:
        raise _FieldError((*here, "method"), str(exc)) from None
    try:
        entry.config_cls(**stage.method_options)
    except ValidationError as exc:
        err = _first_error(exc, here)
        name = exc.errors()[0]["loc"][:1]
        if name and name[0] not in stage.method_options:  # a required option the stage lacks
            err.missing = True
        if exc.errors()[0]["type"] == "extra_forbidden":
            allowed = sorted({*Stage.model_fields, *entry.config_cls.model_fields})
            err.message = f"unknown option for method {stage.method} (allowed: {', '.join(allowed)})"
        raise err from None
    try:
        pattern = Pattern.parse(stage.pattern)
    except CompressKitError as exc:
        raise _FieldError((*here, "pattern"), str(exc)) from None
    if stage.pruner is not None and stage.pruner not in PRUNERS:
        raise _FieldError((*here, "pruner"), f"unknown pruner; choose one of {', '.join(sorted(PRUNERS))}")
    if entry.kind != "sparsity":
        for name in ("sparsity", "pruner"):
            if getattr(stage, name) is not None:
                raise _FieldError((*here, name), f"does not apply to the structural method {stage.method}; drop it")
        if pattern.kind != "unstructured":
            raise _FieldError((*here, "pattern"), f"does not apply to the structural method {stage.method}; drop it")
        return
    if entry.default_pruner and stage.pruner and stage.pruner != entry.default_pruner:
        raise _FieldError((*here, "pruner"), f"method {stage.method} implies pruner {entry.default_pruner}; "
                                             f"use method uniform with pruner {stage.pruner}")
    if pattern.kind == "unstructured" and stage.sparsity is None:
        raise _FieldError((*here, "sparsity"), f"method {stage.method} needs a sparsity in [0, 1) or an N:M pattern",
                          missing=True)
    if pattern.kind == "nm" and stage.sparsity is not None and abs(stage.sparsity - pattern.sparsity) > 1e-9:
        raise _FieldError((*here, "sparsity"), f"pattern {pattern} fixes the sparsity at {pattern.sparsity:g}; drop it")


def _task_file_name(path: Path) -> str | None:
    """The ``task:`` name of an lm-eval YAML (read as text: its ``!function`` tags are not safe YAML)."""
    match = re.search(r"^(?:task|group):\s*['\"]?([\w.\-]+)", path.read_text(encoding="utf-8"), re.MULTILINE)
    return match.group(1) if match else None


def producible_metrics(recipe: Recipe) -> tuple[set[str], list[str]]:
    """(exact metric names, task names whose ``<task>_<metric>`` names are producible)."""
    from .evaluate import ppl_requests
    from .evaluation.task_sets import load_task_sets

    ev = recipe.evaluation
    exact = {f"{key}_ppl" for key in ppl_requests(ev.ppl, ev.ppl_files)}
    if not exact and not ev.tasks and not ev.task_files and not ev.efficiency:
        exact.add("wikitext2_ppl")  # evaluate's default
    sets = load_task_sets()
    tasks: list[str] = []
    requested = ev.tasks or [f for f in ev.task_files if f.endswith((".yaml", ".yml"))]  # files alone run their task
    field = "tasks" if ev.tasks else "task_files"
    for i, name in enumerate(requested):
        if name in sets:
            exact.add(f"{name}_mean")
            tasks += sets[name].task_names
        elif name.endswith((".yaml", ".yml")):
            if not Path(name).is_file():
                raise _FieldError(("evaluation", field, i), f"task file {name} not found")
            tasks.append(_task_file_name(Path(name)) or name)
        else:
            tasks.append(name)
    if ev.efficiency:
        exact |= set(EFFICIENCY_METRICS)
    if recipe.stages:
        exact.add("sparsity")
    return exact, tasks


def _validate_checks(recipe: Recipe) -> None:
    exact, tasks = producible_metrics(recipe)
    for metric, threshold in recipe.checks.items():
        if metric not in exact and not any(metric == t or metric.startswith(f"{t}_") for t in tasks):
            known = sorted(exact) + [f"{t}_<metric>" for t in tasks]
            raise _FieldError(("checks", metric), f"unknown metric; this recipe's evaluation gives: {', '.join(known)}")
        if threshold.needs_baseline and recipe.baseline == "never":
            raise _FieldError(("checks", metric), "a ratio / retention check needs a baseline, but baseline is never")
    for i, path in enumerate(recipe.evaluation.task_files):
        if not Path(path).exists():
            raise _FieldError(("evaluation", "task_files", i), f"task file {path} not found")
    if recipe.baseline.endswith(".json") and not Path(recipe.baseline).is_file():
        raise _FieldError(("baseline",), f"baseline results file {recipe.baseline} not found")


def _validate(data: Any) -> Recipe:
    if not isinstance(data, dict):
        raise _FieldError((), "a recipe is a YAML mapping (model:, stages:, evaluation:, checks:, ...)")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise _first_error(exc) from None
    for i, stage in enumerate(recipe.stages):
        _validate_stage(i, stage)
    _validate_checks(recipe)
    return recipe


def _overridden(loc: tuple, overrides: Iterable[tuple]) -> str | None:
    for path in overrides:
        if tuple(map(str, loc[: len(path)])) == tuple(map(str, path)):
            return ".".join(map(str, path))
    return None


def load_recipe(
    source: str | Path | None = None, *, text: str | None = None, overrides: Sequence[str] = ()
) -> Recipe:
    """Read, expand, override and validate a recipe; any problem is one ``RecipeError`` line."""
    path = Path(source) if source is not None else None
    label = str(path) if path else "<recipe>"
    if text is None:
        if path is None:
            raise RecipeError("give a recipe file")
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise RecipeError(f"recipe file {path} not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise RecipeError(f"recipe file {path} cannot be read ({exc})") from None
    try:
        doc = parse_yaml(text)
    except YamlSourceError as exc:
        raise RecipeError(f"{label}:{exc.line or '?'}: {exc}") from None
    parsed = [parse_override(o) for o in overrides]
    try:
        data = expand_env(doc.data, _env_defaults(path)) if doc.data is not None else {}
        if isinstance(data, dict):
            for key, value in parsed:
                apply_override(data, key, value)
        recipe = _validate(data)
    except _FieldError as err:
        raise RecipeError(_where(label, doc, err, [p for p, _ in parsed])) from None
    if recipe.output is None:
        recipe.output = str(Path("out") / (path.stem if path else "recipe"))
    recipe._source = path
    recipe._overrides = list(overrides)
    recipe._sha256 = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return recipe


def _where(label: str, doc: YamlDocument, err: _FieldError, overrides: list[tuple]) -> str:
    field, line = doc.locate(err.loc, missing=err.missing)
    by_flag = _overridden(err.loc, overrides)
    if by_flag:
        return f"{label}: {field} (set by --set {by_flag}): {err.message}"
    return f"{label}:{line if line is not None else '?'}: {field}: {err.message}"
