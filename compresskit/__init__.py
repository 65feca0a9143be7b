"""compresskit: compress large language models from the command line or from Python.

    import compresskit
    out = compresskit.prune("smollm2-135m", "wanda", sparsity=0.5, calib="file:texts.jsonl", out="out/w50")
    model = compresskit.load("out/w50")
"""

__version__ = "0.1.0"

from .api import PruneOutcome, evaluate_perplexity, inspect, load, prune  # noqa: E402
from .checkpoint import Manifest, save_checkpoint  # noqa: E402
from .errors import CompressKitError  # noqa: E402
from .evaluate import evaluate  # noqa: E402  (shadows the module attribute; `from compresskit.evaluate import ...` still works)

__all__ = [
    "CompressKitError",
    "Manifest",
    "PruneOutcome",
    "__version__",
    "evaluate",
    "evaluate_perplexity",
    "inspect",
    "load",
    "prune",
    "save_checkpoint",
]
