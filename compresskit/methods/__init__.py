"""Compression methods, one small module each, plugged into a registry by name."""

# Modules imported (and so registered) on first use of the registry.
BUILTIN_METHOD_MODULES = ["uniform", "owl", "alphapruning", "welore", "cdmoe", "reap", "finercut", "evopress"]

from .base import (  # noqa: E402
    METHODS,
    MethodConfig,
    MethodEntry,
    MethodResult,
    PruneJob,
    available_methods,
    get_method,
    register,
)

__all__ = [
    "METHODS",
    "MethodConfig",
    "MethodEntry",
    "MethodResult",
    "PruneJob",
    "available_methods",
    "get_method",
    "register",
]
