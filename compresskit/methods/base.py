"""The method registry and what every method receives and returns.

A method is one small module that declares a pydantic config (its hyperparameters, defaults =
the paper's, each with a help line and its CLI flag) and a ``run(job, config)`` function. The
CLI options and recipe fields are generated from the config, so nothing is written twice.
Adding a method never edits the engine or another method.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict

from ..errors import InputError


class MethodConfig(BaseModel):
    """Base of every method's hyperparameters. ``json_schema_extra={"flag": "--owl-m"}`` names the CLI flag."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class NoOptions(MethodConfig):
    pass


@dataclass
class PruneJob:
    """Everything shared by all methods: the model, its adapter, the common options."""

    model: Any
    tokenizer: Any
    adapter: Any
    device: Any
    sparsity: float | None
    pattern: Any  # compresskit.pruning.Pattern
    pruner: str
    calibration: Any = None  # CalibrationSpec or None
    batch_size: int = 8
    offload_activations: bool = False
    include: str | None = None
    exclude: str | None = None
    pruner_options: dict = field(default_factory=dict)
    progress: Callable[[str, int, int, str], None] | None = None  # (phase, done, total, label)
    #: False: ``calibration.seqlen`` is a default, lowered to the model's context by ``fit_calibration``
    seqlen_given: bool = True
    #: the default ``fit_calibration`` lowered (recorded as ``calibration.seqlen_default``), else None
    seqlen_default: int | None = None
    _calibration_data: Any = None
    _calibration_fitted: bool = False

    def fit_calibration(self):
        """The calibration spec with its length fitted to the model (``models.context.fit_seqlen``):
        a given ``--seqlen`` is checked, a default is lowered to the model's context with a note.
        Idempotent; call it before anything reads ``calibration.seqlen`` (memory plan, loading)."""
        if self.calibration is None:
            raise InputError("this method needs calibration data; pass --calib")
        if not self._calibration_fitted:
            import dataclasses

            from ..models.context import fit_seqlen

            seqlen = self.calibration.seqlen
            fitted, self.seqlen_default = fit_seqlen(self.model, seqlen if self.seqlen_given else None, seqlen)
            self.calibration = dataclasses.replace(self.calibration, seqlen=fitted)
            self._calibration_fitted = True
        return self.calibration

    def calibration_data(self):
        """Load (once) and return the calibration samples."""
        if self._calibration_data is None:
            from ..calibration import load_calibration

            spec = self.fit_calibration()  # before any calibration compute
            self._calibration_data = load_calibration(spec, self.tokenizer)
        return self._calibration_data


@dataclass
class MethodResult:
    """What a method reports back: its decisions per block and any module replacements."""

    method: str
    config: dict
    block_ratios: list[float] | None = None
    details: dict = field(default_factory=dict)  # e.g. OWL's outlier ratios D per block
    structure: list[dict] = field(default_factory=list)  # module replacements, rebuilt on load
    form_reason: str | None = None  # structural methods: why the result is / is not a stock checkpoint
    timings: dict = field(default_factory=dict)


@dataclass(frozen=True)
class MethodEntry:
    name: str
    config_cls: type[MethodConfig]
    run: Callable[[PruneJob, MethodConfig], MethodResult]
    description: str
    needs_calibration: Callable[[PruneJob, MethodConfig], bool]
    default_pruner: str | None = None  # the pruner a method name implies ("wanda" -> wanda)
    kind: str = "sparsity"  # "sparsity" (takes --sparsity / --pattern) or "structural"
    #: the paper's calibration where it differs from the Wanda lineage's c4 128 × 2048 random windows
    #: (keys of CALIBRATION_DEFAULTS: calib, format, nsamples, seqlen)
    calibration_defaults: dict = field(default_factory=dict)

    def make_config(self, options: dict, context: str | None = None) -> MethodConfig:
        """This method's config from the options given (None = unset). A bad value is one
        ``InputError`` in our words, naming the option by its flag (``errors.pydantic_message``),
        after ``context`` (default ``--method NAME``)."""
        from pydantic import ValidationError

        from ..errors import pydantic_message

        try:
            return self.config_cls(**{k: v for k, v in options.items() if v is not None})
        except ValidationError as exc:
            err = exc.errors()[0]
            message = pydantic_message(err)
            fields = self.config_cls.model_fields
            if err["loc"] and err["loc"][0] in fields and not message.startswith("--"):
                message = f"{option_flag(err['loc'][0], fields[err['loc'][0]])} {message}"
            context = context or f"--method {self.name}"
            if not message.startswith(f"{context} "):
                message = f"{context}: {message}"
            raise InputError(message) from None

    def calibration_setting(self, name: str, given):
        """``given`` when the user set it, else this method's paper default, else the global default."""
        if given is not None:
            return given
        return self.calibration_defaults.get(name, CALIBRATION_DEFAULTS[name])


#: ``--load``: lazy (blocks stay on disk until used) or in-memory
LOAD_MODES = ("lazy", "in-memory")


def check_prune_options(entry: MethodEntry, *, sparsity: float | None, pattern: str, pruner: str | None,
                        include: str | None, exclude: str | None, load: str, method_options: dict):
    """Every ``prune`` option that can be checked from its value alone, before anything is loaded
    (the CLI calls it before torch is imported; ``api.prune`` for Python callers):
    ``(parsed pattern, method config, pruner name)``."""
    import re

    from ..pruning import PRUNERS, Pattern

    if load not in LOAD_MODES:
        raise InputError(f"--load must be one of {', '.join(LOAD_MODES)}, got {load!r}")
    pat = Pattern.parse(pattern)
    if pruner is not None and pruner not in PRUNERS:
        raise InputError(f"unknown pruner '{pruner}'; choose one of: {', '.join(sorted(PRUNERS))}")
    # A config may say which kind of method it makes (EvoPress: sparsity at --level matrix, structural
    # at --level sublayer|block), and check the target its own way (``check_target``).
    config = entry.make_config(method_options) if hasattr(entry.config_cls, "prune_kind") else None
    kind = config.prune_kind if config is not None else entry.kind
    label = getattr(config, "kind_label", entry.name)
    if kind == "sparsity":
        if pat.kind == "unstructured":
            if sparsity is None:
                raise InputError("pass --sparsity (a fraction in [0, 1), e.g. 0.5) or an N:M --pattern")
        if sparsity is not None and not (0.0 <= sparsity < 1.0):
            raise InputError(f"--sparsity must be in [0, 1), got {sparsity}")
    elif sparsity is not None or pat.kind != "unstructured" or pruner is not None:
        # Structural methods (welore) set their own reduction; a silently ignored target would mislead the manifest.
        raise InputError(f"--sparsity / --pattern / --pruner do not apply to --method {label}; drop them")
    config = config if config is not None else entry.make_config(method_options)
    if kind == "sparsity" and hasattr(config, "check_target"):
        config.check_target(sparsity, pat)
    if entry.default_pruner and pruner and pruner != entry.default_pruner:
        raise InputError(f"--method {entry.name} implies --pruner {entry.default_pruner}; "
                         f"use --method uniform --pruner {pruner}")
    if pat.kind == "nm" and sparsity is not None and abs(sparsity - pat.sparsity) > 1e-9:
        raise InputError(f"--pattern {pat} fixes the sparsity at {pat.sparsity:g}; drop --sparsity {sparsity:g}")
    for regex in (include, exclude):
        if regex is not None:
            try:
                re.compile(regex)
            except re.error as exc:
                raise InputError(f"invalid module-name regex {regex!r}: {exc}") from None
    return pat, config, pruner or entry.default_pruner or "wanda"


def option_flag(field_name: str, info) -> str:
    """The CLI flag of a config field: ``json_schema_extra={"flag": ...}``, else ``--field-name``."""
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    return extra.get("flag") or "--" + field_name.replace("_", "-")


METHODS: dict[str, MethodEntry] = {}
#: Wanda / SparseGPT / OWL / AlphaPruning: 128 random C4 windows of 2048 tokens (methods.md §1.2)
CALIBRATION_DEFAULTS = {"calib": "c4", "format": "window", "nsamples": 128, "seqlen": 2048}


def register(name: str, config_cls: type[MethodConfig], description: str, needs_calibration=None, default_pruner=None,
             kind: str = "sparsity", calibration_defaults: dict | None = None):
    def deco(fn):
        METHODS[name] = MethodEntry(
            name=name,
            config_cls=config_cls,
            run=fn,
            description=description,
            needs_calibration=needs_calibration or (lambda job, cfg: True),
            default_pruner=default_pruner,
            kind=kind,
            calibration_defaults=dict(calibration_defaults or {}),
        )
        return fn

    return deco


def get_method(name: str) -> MethodEntry:
    _load_builtin_methods()
    try:
        return METHODS[name]
    except KeyError:
        raise InputError(f"unknown method '{name}'; choose one of: {', '.join(sorted(METHODS))}") from None


def available_methods() -> list[str]:
    _load_builtin_methods()
    return sorted(METHODS)


def _load_builtin_methods() -> None:
    # Importing a method module registers it; the list is the only place that names them.
    from . import BUILTIN_METHOD_MODULES  # noqa: F401
    import importlib

    for module in BUILTIN_METHOD_MODULES:
        importlib.import_module(f"{__package__}.{module}")
