"""compresskit: compress large language models from the command line or from Python.

    import compresskit
    out = compresskit.prune("smollm2-135m", "wanda", sparsity=0.5, calib="file:texts.jsonl", out="out/w50")
    model = compresskit.load("out/w50")

The public names below are imported on first use (PEP 562): ``import compresskit.cli`` must not
import torch and transformers, so ``compresskit --help`` and option errors answer at once.
"""

import sys
import types
from importlib import import_module

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS = {
    "CompressKitError": ".errors",
    "Manifest": ".checkpoint",
    "PruneOutcome": ".api",
    "evaluate": ".evaluate",
    "evaluate_perplexity": ".api",
    "inspect": ".api",
    "load": ".api",
    "prune": ".api",
    "save_checkpoint": ".checkpoint",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """``compresskit.evaluate`` is the function, although a submodule has the same name: importing
    the submodule sets the package attribute to the module, which this property ignores."""

    @property
    def evaluate(self):
        from .evaluate import evaluate

        return evaluate

    @evaluate.setter
    def evaluate(self, _module) -> None:
        pass


sys.modules[__name__].__class__ = _Package
