"""Pure tensor math of the base pruners: masks, magnitude, Wanda, SparseGPT, and their statistics.

No model, no hooks: the engine collects statistics (``SquaredNormStat``, ``HessianStat``) and
calls a pruner per matrix. ``PRUNERS`` gives every pruner one signature,
``prune(weight, stat, sparsity, pattern, **options) -> mask``, so allocation methods (uniform,
OWL, AlphaPruning) can treat them alike.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import import_module
from types import MappingProxyType
from typing import TYPE_CHECKING, Literal

from compresskit.errors import InputError
from compresskit.pruning.pattern import Pattern, check_divisible, validate_sparsity

if TYPE_CHECKING:
    import torch

    from compresskit.pruning.stats import HessianStat, SquaredNormStat

#: The tensor maths, imported on first use (PEP 562): ``Pattern``, ``PRUNERS`` and their names
#: validate options without importing torch (the CLI answers option errors at once).
_LAZY = {
    "magnitude_prune_": "magnitude", "magnitude_scores": "magnitude",
    "matrix_mask": "masks", "nm_mask": "masks", "pattern_mask": "masks", "row_mask": "masks",
    "full_fp32_matmul": "precision",
    "SparseGPTResult": "sparsegpt", "sparsegpt_prune_": "sparsegpt", "sparsegpt_reconstruct_": "sparsegpt",
    "upper_cholesky_of_inverse": "sparsegpt",
    "HessianStat": "stats", "SquaredNormStat": "stats",
    "wanda_prune_": "wanda", "wanda_scores": "wanda",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

StatKind = Literal["none", "sq_norm", "hessian"]


@dataclass(frozen=True)
class PrunerSpec:
    """A pruner as the allocation methods see it.

    ``needs``: which input statistic the engine must collect ("none" | "sq_norm" | "hessian").
    ``options``: the keyword options ``prune`` accepts, with their defaults (the papers').
    ``prune(weight, stat, sparsity, pattern, **options) -> mask``: ``stat`` is the statistic's
    ``value()`` tensor (ignored, may be None, for magnitude).
    """

    name: str
    needs: StatKind
    prune: Callable[..., torch.Tensor]
    options: Mapping[str, object] = field(default_factory=lambda: MappingProxyType({}))

    def new_stat(self, in_features: int) -> SquaredNormStat | HessianStat | None:
        """An empty accumulator of the statistic this pruner needs (None for magnitude)."""
        from compresskit.pruning.stats import HessianStat, SquaredNormStat

        if self.needs == "sq_norm":
            return SquaredNormStat(in_features)
        if self.needs == "hessian":
            return HessianStat(in_features)
        return None


def _reject_unknown(name: str, options: Mapping[str, object], allowed: Mapping[str, object]) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        accepted = ", ".join(sorted(allowed)) or "none"
        raise InputError(f"pruner {name!r} has no option {unknown[0]!r}; its options: {accepted}")


def _magnitude(
    weight: torch.Tensor, stat: torch.Tensor | None, sparsity: float | None, pattern: Pattern, **options: object
) -> torch.Tensor:
    from compresskit.pruning.magnitude import magnitude_prune_

    _reject_unknown("magnitude", options, {})
    return magnitude_prune_(weight, sparsity, pattern)


def _wanda(
    weight: torch.Tensor, stat: torch.Tensor | None, sparsity: float | None, pattern: Pattern, **options: object
) -> torch.Tensor:
    from compresskit.pruning.wanda import wanda_prune_

    _reject_unknown("wanda", options, {})
    if stat is None:
        raise ValueError("wanda needs the squared input-norm statistic (SquaredNormStat.value())")
    return wanda_prune_(weight, stat, sparsity, pattern)


_SPARSEGPT_OPTIONS = MappingProxyType({"blocksize": 128, "percdamp": 0.01})


def _sparsegpt(
    weight: torch.Tensor, stat: torch.Tensor | None, sparsity: float | None, pattern: Pattern, **options: object
) -> torch.Tensor:
    from compresskit.pruning.sparsegpt import sparsegpt_prune_

    _reject_unknown("sparsegpt", options, _SPARSEGPT_OPTIONS)
    if stat is None:
        raise ValueError("sparsegpt needs the Hessian statistic (HessianStat.value())")
    return sparsegpt_prune_(weight, stat, sparsity, pattern, **{**_SPARSEGPT_OPTIONS, **options})


PRUNERS: Mapping[str, PrunerSpec] = MappingProxyType(
    {
        "magnitude": PrunerSpec("magnitude", "none", _magnitude),
        "wanda": PrunerSpec("wanda", "sq_norm", _wanda),
        "sparsegpt": PrunerSpec("sparsegpt", "hessian", _sparsegpt, _SPARSEGPT_OPTIONS),
    }
)


def get_pruner(name: str) -> PrunerSpec:
    """The registered pruner ``name``; ``InputError`` listing the known ones otherwise."""
    try:
        return PRUNERS[name]
    except KeyError:
        raise InputError(f"unknown pruner {name!r}; choose one of: {', '.join(PRUNERS)}") from None


__all__ = [
    "PRUNERS",
    "HessianStat",
    "Pattern",
    "PrunerSpec",
    "SparseGPTResult",
    "SquaredNormStat",
    "check_divisible",
    "full_fp32_matmul",
    "get_pruner",
    "magnitude_prune_",
    "magnitude_scores",
    "matrix_mask",
    "nm_mask",
    "pattern_mask",
    "row_mask",
    "sparsegpt_prune_",
    "sparsegpt_reconstruct_",
    "upper_cholesky_of_inverse",
    "validate_sparsity",
    "wanda_prune_",
    "wanda_scores",
]
