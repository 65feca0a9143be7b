"""Errors a user can cause.

Every error that bad input can trigger is a ``CompressKitError`` subclass with a one-line,
actionable message. The CLI prints ``error: <message>`` and exits with ``exit_code`` (2 for bad
input, 1 for a failed quality check). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class CompressKitError(Exception):
    """Base class: a user-facing error with a one-line message."""

    exit_code = 2


class InputError(CompressKitError):
    """A bad argument, option or value (sparsity outside [0, 1), unknown method, ...)."""


class ModelLoadError(CompressKitError):
    """The model path / hub id cannot be loaded."""


class UnsupportedArchitectureError(CompressKitError):
    """The model family has no adapter."""


class CalibrationError(CompressKitError):
    """Calibration data cannot be produced (missing file, documents too short, source offline)."""


class CheckpointError(CompressKitError):
    """A checkpoint cannot be written or read (output exists without --force, corrupt manifest)."""


class OutputError(CompressKitError):
    """An output path would lose data (an input, a foreign file, a directory) or cannot be written."""


class EvaluationError(CompressKitError):
    """An evaluation cannot run (dataset unreachable offline, bad task file)."""


class RecipeError(CompressKitError):
    """A recipe file is invalid; the message names the field and line."""


class CompressKitWarning(UserWarning):
    """Something the user should know but that does not stop the run; the CLI prints ``warning: ...``."""


class CompressKitNote(CompressKitWarning):
    """A choice made for the user (a default fitted to the model); the CLI prints ``note: ...``."""


class CheckFailed(CompressKitError):
    """A quality / size / speed threshold of a recipe was violated."""

    exit_code = 1


def pydantic_message(err: dict) -> str:
    """One pydantic error (an item of ``ValidationError.errors()``) in our words: without pydantic's
    "Value error, " prefix, "must be" for "Input should be", and the value given unless the message
    already names it ("got ..."). The one formatter for method options and recipe fields."""
    if err["type"] == "missing":
        return "required field is missing"
    message = err["msg"].removeprefix("Value error, ").replace("Input should be", "must be")
    value = err.get("input")
    if value is not None and not isinstance(value, (dict, list)) and "got " not in message:
        message += f" (got {value!r})"
    return message
