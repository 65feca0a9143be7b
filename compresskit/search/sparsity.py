"""EvoPress's sparsity search on our engine: the units (target matrices), the level database pass,
and the model seen at any level vector.

The caller (``methods/evopress.py``) provides two seams, so nothing here knows about jobs, lazy
loading or MoE layouts:

* ``block_scope(i)`` — a context yielding ``(block, {local name: nn.Linear})``: block ``i`` on the
  compute device (``models.placement.onload``; a lazily loaded block is read and released), its
  targeted linears after ``--include/--exclude``, fused experts presented per expert;
* ``measure(reduce, needs)`` — one sequential pass over the *dense* model
  (``methods.sparsify.collect_block_statistics``) calling ``reduce(i, linears, stats)`` per block.

A candidate is installed by swapping each targeted linear's ``weight`` for its level's tensor
while the block runs and putting the very same Parameter back afterwards, so the model (and a lazy
store's pristine copy) never changes until ``LevelModel.apply`` writes the winner in place.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..engine import distributed
from ..pruning import PRUNERS, Pattern, wanda_scores
from .database import LevelDatabase, level_codes, top_up
from .levels import LevelPlan

BlockScope = Callable[[int], AbstractContextManager[tuple[nn.Module, dict[str, nn.Linear]]]]


@dataclass(frozen=True)
class Unit:
    block: int
    block_name: str
    local: str
    shape: tuple[int, int]

    @property
    def name(self) -> str:
        return f"{self.block_name}.{self.local}"

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


def list_units(adapter, linears_of: Callable[[int], AbstractContextManager[dict[str, nn.Linear]]]) -> list[Unit]:
    """Every targeted matrix, block by block (shapes only: no weight is read)."""
    units = []
    for i in range(adapter.num_blocks):
        with linears_of(i) as linears:
            for local, module in linears.items():
                units.append(Unit(i, adapter.block_name(i), local, tuple(module.weight.shape)))
    return units


@contextmanager
def swapped_weights(linears: dict[str, nn.Linear], tensor_of: Callable[[str, torch.Tensor], torch.Tensor]):
    """Every linear's weight replaced by ``tensor_of(local, dense weight)`` (frozen) inside the
    context; the very same Parameters are put back afterwards, so a lazily loaded block goes back
    to its source unchanged."""
    originals: dict[str, nn.Parameter] = {}
    try:
        for local, module in linears.items():
            tensor = tensor_of(local, module.weight.detach())
            originals[local] = module.weight
            module.weight = nn.Parameter(tensor, requires_grad=False)
        yield
    finally:
        for local, weight in originals.items():
            linears[local].weight = weight


class LevelModel:
    """The model at any level vector, through the database (see the module docstring)."""

    def __init__(self, adapter, units: Sequence[Unit], plan: LevelPlan, database: LevelDatabase,
                 block_scope: BlockScope):
        self.adapter, self.units, self.plan, self.db = adapter, list(units), plan, database
        self.block_scope = block_scope
        self.unit_of = {(u.block, u.local): k for k, u in enumerate(self.units)}

    def _tensor(self, unit: int, level: int, dense: torch.Tensor) -> torch.Tensor:
        u = self.units[unit]
        return self.db.weight(u.block_name, u.local, level - self.plan.low[unit], dense)

    @contextmanager
    def installed(self, i: int, levels: Sequence[int] | None):
        with self.block_scope(i) as (block, linears):
            if levels is None:
                yield block
                return
            def tensor_of(local: str, dense: torch.Tensor) -> torch.Tensor:
                unit = self.unit_of[(i, local)]
                return self._tensor(unit, levels[unit], dense)

            with swapped_weights(linears, tensor_of):
                yield block

    @torch.no_grad()
    def apply(self, levels: Sequence[int], progress=None) -> None:
        """Write the levels' weights into the model, in place (a lazy store spills the changed blocks)."""
        n = self.adapter.num_blocks
        for i in range(n):
            with self.block_scope(i) as (_, linears):
                for local, module in linears.items():
                    unit = self.unit_of[(i, local)]
                    module.weight.data.copy_(self._tensor(unit, levels[unit], module.weight.detach()))
            if progress is not None:
                progress("apply levels", i + 1, n, self.adapter.block_name(i))


@torch.no_grad()
def _unit_codes(db: LevelDatabase, unit: Unit, zeros: list[int], weight: torch.Tensor, stat, pruner: str) -> None:
    if pruner == "wanda" and stat is not None:
        code = level_codes(wanda_scores(weight, stat), zeros, per_row=True)
    else:  # magnitude, or a matrix no calibration token reached (an unrouted expert): |W| over the matrix
        code = level_codes(weight.detach().abs(), zeros, per_row=False)
    db.write_codes(unit.block_name, unit.local, code, zeros)


@torch.no_grad()
def _unit_sparsegpt(db: LevelDatabase, unit: Unit, zeros: list[int], weight: torch.Tensor, hessian,
                    options: dict) -> None:
    for j, z in enumerate(zeros):
        w = weight.detach().clone()
        pruned = torch.zeros(w.shape, dtype=torch.bool, device=w.device)
        if z >= w.numel():  # the top level of a small matrix may empty it (the pruners take s < 1)
            w.zero_()
            pruned.fill_(True)
        elif z > 0:
            if hessian is None:  # no token reached it: magnitude, as prune_blocks falls back
                pruned = PRUNERS["magnitude"].prune(w, None, z / w.numel(), Pattern.unstructured())
            else:
                pruned = PRUNERS["sparsegpt"].prune(w, hessian, z / w.numel(), Pattern.unstructured(), **options)
        reached = top_up(w, pruned, z)
        db.write_level(unit.block_name, unit.local, j, w, reached)


def build_database(db: LevelDatabase, plan: LevelPlan, units: Sequence[Unit], pruner: str, pruner_options: dict,
                   block_scope: BlockScope, measure, *, write: bool = True, inputs: str = "uniform",
                   progress=None) -> dict:
    """Prune every unit at every level of ``plan`` with ``pruner`` and store it (module docstring of
    ``search.database``). Units already on disk (an interrupted build) are not solved again.
    ``write=False`` (torchrun ranks other than 0) takes part in the pass's collectives only.

    ``inputs``: what the statistics of block i see. ``dense`` — the dense model's activations, as
    the reference's database (``FastOBCPruner`` prunes copies, so its blocks stay dense); ``uniform``
    — the activations of the model whose earlier blocks sit at their base level (every matrix at
    ``--sparsity``), as sequential Wanda / SparseGPT prune, so the database's uniform vector *is*
    the shipped uniform pruning and every seed starts where its heuristic stands."""
    t0 = time.perf_counter()
    index = {(u.block, u.local): k for k, u in enumerate(units)}
    fallback: list[str] = []

    @contextmanager
    def base_levels(i: int, linears: dict[str, nn.Linear]):
        """Block ``i``'s linears at their base level (read back from the database), the same
        Parameters put back afterwards."""
        distributed.barrier()  # rank 0 has written block i's levels

        def tensor_of(local: str, dense: torch.Tensor) -> torch.Tensor:
            k = index[(i, local)]
            return db.weight(units[k].block_name, local, -plan.low[k], dense)

        with swapped_weights(linears, tensor_of):
            yield

    def handle(i: int, linears: dict[str, nn.Linear], stats: dict) -> None:
        if not write:
            return
        for local, module in linears.items():
            k = index[(i, local)]
            unit, zeros = units[k], plan.level_zeros(k)
            if db.has_unit(unit.block_name, unit.local, len(zeros)):
                continue
            stat = stats.get(local)
            if pruner != "magnitude" and stat is None:
                fallback.append(unit.name)
            if pruner == "sparsegpt":
                _unit_sparsegpt(db, unit, zeros, module.weight, stat, pruner_options)
            else:
                _unit_codes(db, unit, zeros, module.weight, stat, pruner)

    if pruner == "magnitude":
        n = len({u.block for u in units})
        for step, i in enumerate(sorted({u.block for u in units})):
            with block_scope(i) as (_, linears):
                handle(i, linears, {})
            if progress is not None:
                progress("level database", step + 1, n, f"block {i}")
    else:
        measure(lambda i, linears, stats: handle(i, linears, stats), "hessian" if pruner == "sparsegpt" else "sq_norm",
                base_levels if inputs == "uniform" else None)
    if not write:
        return {}
    records = []
    for k, unit in enumerate(units):
        count = plan.high[k] - plan.low[k] + 1
        records.append({"name": unit.name, "shape": list(unit.shape), "low": plan.low[k], "high": plan.high[k],
                        "zeros": db.stored_zeros(unit.block_name, unit.local, count)})
    meta = db.finish(records, time.perf_counter() - t0)
    meta["magnitude_fallback"] = fallback
    return meta
