"""Every private or undocumented name compresskit uses from another library, in one place.

compresskit prefers public APIs. Where none exists, the name is listed in :data:`INTERNALS` and
reached only through :func:`internal`; no other module imports a private name of another library.
When a new release moves or removes one, :func:`internal` raises :class:`CompatError` with one
line naming the library, the installed version, the name, and the version compresskit was checked
against (:data:`CHECKED_WITH`, kept equal to the pinned test environment in
``requirements/ci.txt`` by ``tests/test_compat.py``), and ``tests/test_compat.py`` fails the
same way for every entry — so an upgrade (``scripts/upgrade-deps.sh``) shows at once what broke.

What each group is for:

* **transformers loading internals** — lazy loading (``models/lazy.py``) replays transformers 5's
  own ``from_pretrained`` steps (dtype resolution, key renames, fused experts, tied weights) one
  block at a time. A transformers without them loads in memory instead (``LazyUnsupported``).
* **auto-class mappings** — which model class a config maps to, without loading it.
* **torch** — ``Module._apply`` moves every tensor of a lazily loaded model except those left on
  ``meta``; ``Tensor._version`` (in-place modification counter) tells a lazily loaded block whose
  tensors were not modified, so it can be released without a copy.
* **typer** — Typer ≥ 0.24 vendors click as ``typer._click`` (older releases use click itself).
* **lm-eval** — its task-YAML reader (``!function`` tags) to read a task file's name; the
  evaluator's ``git describe`` of the current folder, replaced while it runs (``evaluation/lmeval.py``).

Formats are not internals: the safetensors dtype names are the file format's specification, not a
library's private table; they live with the other safetensors-format code (``models/weight_files.py``).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from importlib import metadata

#: Versions the entries below were checked against (= requirements/ci.txt; a test keeps them equal).
CHECKED_WITH = {"transformers": "5.25.0", "torch": "2.13.0", "typer": "0.29.2", "lm-eval": "0.4.13"}


class CompatError(RuntimeError):
    """A library no longer has an internal compresskit relies on (one line, naming the versions)."""


@dataclass(frozen=True)
class Internal:
    library: str  # distribution name (for its version)
    module: str
    attr: str  # dotted path inside the module
    used_by: str
    params: tuple[str, ...] = ()  # parameter names the call relies on, in order (empty: not checked)


INTERNALS: dict[str, Internal] = {
    e.module + "." + e.attr: e
    for e in [
        Internal("transformers", "transformers.modeling_utils", "_get_dtype", "lazy loading: the dtype from_pretrained picks",
                 ("dtype", "checkpoint_files", "config", "sharded_metadata", "state_dict", "weights_only", "hf_quantizer")),
        Internal("transformers", "transformers.modeling_utils", "LoadStateDictConfig", "lazy loading: dtype plan and key mapping"),
        Internal("transformers", "transformers.conversion_mapping", "get_model_conversion_mapping", "lazy loading: key renames"),
        Internal("transformers", "transformers.core_model_loading", "WeightConverter", "lazy loading: fused weights"),
        Internal("transformers", "transformers.core_model_loading", "WeightRenaming", "lazy loading: key renames"),
        Internal("transformers", "transformers.core_model_loading", "build_glob_alternation", "lazy loading: dtype plan"),
        Internal("transformers", "transformers.core_model_loading", "dot_natural_key", "lazy loading: key order"),
        Internal("transformers", "transformers.core_model_loading", "rename_source_key", "lazy loading: key renames"),
        Internal("transformers", "transformers.core_model_loading", "convert_and_load_state_dict_in_model",
                 "lazy loading: the step it replays"),
        Internal("transformers", "transformers.utils.loading_report", "LoadStateDictInfo", "lazy loading: conversion errors"),
        Internal("transformers", "transformers.utils.generic", "ContextManagers", "lazy loading: the init context"),
        Internal("transformers", "transformers", "PreTrainedModel.get_init_context", "lazy loading: meta init"),
        Internal("transformers", "transformers", "PreTrainedModel._get_dtype_plan", "lazy loading: per-tensor dtypes"),
        Internal("transformers", "transformers", "PreTrainedModel.mark_tied_weights_as_initialized", "lazy loading: tied weights"),
        Internal("transformers", "transformers", "PreTrainedModel._move_missing_keys_from_meta_to_device",
                 "lazy loading: non-block tensors"),
        Internal("transformers", "transformers", "PreTrainedModel._initialize_missing_keys", "lazy loading: non-block tensors"),
        Internal("transformers", "transformers", "AutoModelForCausalLM._model_mapping", "which class a config loads as"),
        Internal("transformers", "transformers", "AutoModelForImageTextToText._model_mapping", "which class a config loads as"),
        Internal("torch", "torch.nn", "Module._apply", "moving a lazily loaded model (meta tensors stay)"),
        Internal("typer", "typer._click", "exceptions", "usage errors turned into one line (Typer >= 0.24)"),
        Internal("lm-eval", "lm_eval.tasks._yaml_loader", "load_yaml", "reading a task file's name"),
        Internal("lm-eval", "lm_eval.evaluator", "get_git_commit_hash",
                 "eval --tasks: not asking git for the current folder's commit (its 'fatal:' line)"),
    ]
}


def version(library: str) -> str:
    try:
        return metadata.version(library)
    except metadata.PackageNotFoundError:
        return "not installed"


def _message(entry: Internal, problem: str) -> str:
    checked = CHECKED_WITH.get(entry.library, "?")
    return (f"{entry.library} {version(entry.library)} {problem} {entry.module}.{entry.attr} (used for {entry.used_by}; "
            f"compresskit was checked with {entry.library} {checked}: see compresskit/compat.py)")


def internal(name: str):
    """The object ``name`` (a key of :data:`INTERNALS`), or :class:`CompatError` naming the versions."""
    entry = INTERNALS[name]
    try:
        obj = importlib.import_module(entry.module)
    except ImportError:
        raise CompatError(_message(entry, "has no module for")) from None
    for part in entry.attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise CompatError(_message(entry, "has no")) from None
    if entry.params:
        try:
            found = tuple(inspect.signature(obj).parameters)[: len(entry.params)]
        except (TypeError, ValueError):
            found = ()
        if found != entry.params:
            raise CompatError(_message(entry, f"changed the parameters ({', '.join(found)}) of"))
    return obj


def method(instance, name: str):
    """``instance``'s own (possibly overridden) method for the internal ``name``, checked present."""
    internal(name)
    return getattr(instance, name.rsplit(".", 1)[1])


def problems(library: str | None = None) -> list[str]:
    """One line per internal that is missing or changed (empty: all present)."""
    out = []
    for name, entry in INTERNALS.items():
        if library is not None and entry.library != library:
            continue
        try:
            internal(name)
        except CompatError as exc:
            out.append(str(exc))
    return out


def click_exceptions():
    """click's exception classes, as Typer uses them (vendored in Typer >= 0.24)."""
    try:
        return internal("typer._click.exceptions")
    except CompatError:
        from click import exceptions  # Typer < 0.24 depends on click itself

        return exceptions


def causal_lm_class(config, auto) -> type | None:
    """The class ``auto`` (an ``AutoModel…`` class) builds for ``config``, or None if it has none."""
    mapping = internal(f"transformers.{auto.__name__}._model_mapping")
    return mapping[type(config)] if type(config) in mapping else None


def apply_to_tensors(model, fn):
    """``fn`` applied to every parameter and buffer, in place of the tensor (``Module._apply``)."""
    return internal("torch.nn.Module._apply")(model, fn)


def tensor_version(tensor) -> int:
    """torch's in-place modification counter of ``tensor``."""
    return tensor._version


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """``5GB`` / ``500MB`` / ``2GiB`` / ``123`` → bytes (decimal units as huggingface_hub reads them)."""
    if isinstance(size, int):
        return size
    text = str(size).strip().upper().replace(" ", "")
    number = text.rstrip("KMGTIB")
    unit = text[len(number):]
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"size {size!r} is not a number with a unit (e.g. 5GB, 500MB)") from None
    if unit not in _UNITS or value <= 0:
        raise ValueError(f"size {size!r} is not a positive number with a unit (e.g. 5GB, 500MB)")
    return int(value * _UNITS[unit])
