"""EvoPress's search: elitist (1+λ) evolution over integer level vectors (Sieberling et al., ICML 2025).

Pure: no model knowledge. A candidate is a list of integer levels, one per compressible unit; each
unit belongs to a *group* and the level-switch mutation moves one level down and one level up
inside a group, so the sum of levels of every group never changes (for sparsity one group and
levels that differ by the same count of non-zeros: the parameter budget stays exact; for depth one
group per sublayer type with on/off levels: the number of removed attentions / MLPs stays exact).

Selection is the reference's multi-step one: the offspring are scored on few calibration tokens,
the best few re-scored on more, the parent joins only the last stage and is re-scored there with
them. The fitness is a callable ``fitness(candidates, tokens, draw=..., parent=...) -> list[float]``
(lower is better). ``draw`` names the minibatch: ``(generation, stage)`` — the fitness draws a
fresh random minibatch of calibration sequences for every stage of every generation, as the
reference's ``selection`` does, reproducibly from the search seed and ``draw`` — or ``None`` for
every calibration token (:func:`final_selection`). A fixed minibatch let the search fit its own
sample: on SmolLM2 at 70 %, the line that won on one fixed 1,024-token sample had a higher KL on
the whole calibration set than the AlphaPruning seed it had beaten on that sample (methods.md
§14.3). ``parent`` is the current parent, whose block inputs the fitness may reuse. The parent's
fitness is therefore a fresh estimate every generation, not a running minimum.

The state after every generation (:class:`EvolutionState`, including the random generator's
state) is what ``evolve(state=...)`` continues from, bit-identically to an uninterrupted run.
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Stage:
    """One selection step: candidates scored on ``tokens`` calibration tokens, ``survivors`` go on."""

    tokens: int
    survivors: int


@dataclass(frozen=True)
class Schedule:
    """How long and how wide the search is: generations, offspring per generation, selection stages."""

    name: str
    generations: int
    offspring: int
    stages: tuple[Stage, ...]

    def __post_init__(self) -> None:
        if self.generations < 0:
            raise ValueError(f"generations must be >= 0, got {self.generations}")
        if self.offspring < 1:
            raise ValueError(f"offspring must be >= 1, got {self.offspring}")
        if not self.stages:
            raise ValueError("a schedule needs at least one selection stage")
        if self.stages[-1].survivors != 1:
            raise ValueError(f"the last stage keeps 1 survivor, got {self.stages[-1].survivors}")
        for stage in self.stages:
            if stage.tokens < 1 or stage.survivors < 1:
                raise ValueError(f"stage tokens and survivors must be >= 1, got {stage}")
        survivors = [s.survivors for s in self.stages]
        if survivors != sorted(survivors, reverse=True):
            raise ValueError(f"survivors must not grow from stage to stage, got {survivors}")

    @property
    def max_tokens(self) -> int:
        return max(stage.tokens for stage in self.stages)

    def with_overrides(
        self,
        generations: int | None = None,
        offspring: int | None = None,
        tokens: Sequence[int] | None = None,
        survivors: Sequence[int] | None = None,
    ) -> Schedule:
        """This schedule with some fields replaced (the CLI's --generations/--offspring/--tokens/--survivors).

        ``tokens`` and ``survivors`` replace the stages' values; given alone, each must have as many
        entries as the schedule has stages; given together they define new stages.
        """
        stages = self.stages
        if tokens is not None or survivors is not None:
            toks = list(tokens) if tokens is not None else [s.tokens for s in stages]
            surv = list(survivors) if survivors is not None else [s.survivors for s in stages]
            if len(toks) != len(surv):
                raise ValueError(
                    f"{len(toks)} stage token counts but {len(surv)} survivor counts: give both lists "
                    "with one entry per selection stage"
                )
            stages = tuple(Stage(int(t), int(s)) for t, s in zip(toks, surv))
        return Schedule(
            name=self.name,
            generations=self.generations if generations is None else int(generations),
            offspring=self.offspring if offspring is None else int(offspring),
            stages=stages,
        )


# The reference's scripts (scripts/run_prune_search.sh, run_drop_search.sh).
PAPER_SPARSITY = Schedule("paper", 400, 64, (Stage(2048, 8), Stage(16384, 2), Stage(65536, 1)))


def paper_depth_schedule(units: int, removed: int) -> Schedule:
    """The reference's depth schedule: k(n-k)/1.5 generations, 32 offspring, 2 -> 1 on 2,048 -> 32,768 tokens.

    ``units`` is n (blocks, or sublayers of one type), ``removed`` is k.
    """
    generations = max(1, int(removed * (units - removed) / 1.5))
    return Schedule("paper", generations, 32, (Stage(2048, 2), Stage(32768, 1)))


# Measured to finish SmolLM2-135M at 70 % (Wanda levels) on a 2-core CPU well under an hour;
# see docs/methods.md (EvoPress) for the figure and the command.
FAST_SPARSITY = Schedule("fast", 30, 8, (Stage(256, 2), Stage(1024, 1)))


def fast_depth_schedule(units: int, removed: int) -> Schedule:
    """``fast`` for depth genes: a third of the paper's generations (at least 10), 16 offspring."""
    generations = max(10, int(removed * (units - removed) / 4.5))
    return Schedule("fast", generations, 16, (Stage(512, 2), Stage(4096, 1)))


SCHEDULE_NAMES = ("fast", "paper")


def sparsity_schedule(name: str) -> Schedule:
    if name == "paper":
        return PAPER_SPARSITY
    if name == "fast":
        return FAST_SPARSITY
    raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULE_NAMES)}")


def depth_schedule(name: str, units: int, removed: int) -> Schedule:
    if name == "paper":
        return paper_depth_schedule(units, removed)
    if name == "fast":
        return fast_depth_schedule(units, removed)
    raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULE_NAMES)}")


def group_sums(levels: Sequence[int], groups: Sequence[int]) -> dict[int, int]:
    sums: dict[int, int] = {}
    for level, group in zip(levels, groups):
        sums[group] = sums.get(group, 0) + int(level)
    return sums


def _check_vector(levels: Sequence[int], groups: Sequence[int], low: Sequence[int], high: Sequence[int]) -> None:
    if not (len(levels) == len(groups) == len(low) == len(high)):
        raise ValueError(
            f"levels ({len(levels)}), groups ({len(groups)}), low ({len(low)}) and high ({len(high)}) "
            "must have one entry per unit"
        )
    for i, (level, lo, hi) in enumerate(zip(levels, low, high)):
        if not lo <= level <= hi:
            raise ValueError(f"unit {i}: level {level} outside its range [{lo}, {hi}]")


def level_switch(
    levels: Sequence[int],
    groups: Sequence[int],
    low: Sequence[int],
    high: Sequence[int],
    rng: random.Random,
) -> list[int]:
    """The reference's mutation: ``min(U1, U2)`` flips with U ~ Uniform{1, 2, 3}.

    Each flip picks a group uniformly among those where a flip is possible, lowers one unit of it
    (level > low) and raises another unit of the same group (level < high), both uniformly among the
    eligible units, so every group's sum of levels is unchanged. (The reference has one group for
    sparsity and picks the sublayer type uniformly for depth, as here; it also allows the lowered
    and raised unit to coincide, a no-op flip, which is excluded here.) Returns a new list; when no
    flip is possible at all the copy is returned unchanged.
    """
    child = [int(v) for v in levels]
    flips = min(rng.randint(1, 3), rng.randint(1, 3))
    for _ in range(flips):
        members: dict[int, list[int]] = {}
        for i, g in enumerate(groups):
            members.setdefault(g, []).append(i)
        options = []
        for g, units in members.items():
            down = [i for i in units if child[i] > low[i]]
            up = [i for i in units if child[i] < high[i]]
            # a flip needs a lowerable unit and a different raisable one
            if down and up and not (len(down) == 1 and up == down):
                options.append((g, down, up))
        if not options:
            break
        _, down, up = options[rng.randrange(len(options))]
        while True:
            d = down[rng.randrange(len(down))]
            candidates = [i for i in up if i != d]
            if candidates:
                break
        u = candidates[rng.randrange(len(candidates))]
        child[d] -= 1
        child[u] += 1
    return child


@dataclass
class EvolutionState:
    """Everything needed to continue a search: ``generation`` generations are done."""

    generation: int
    parent: list[int]
    parent_fitness: float
    parent_origin: str
    history: list[dict]
    rng_state: tuple
    tokens_seen: int
    seed_fitness: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (the random state's tuples become lists)."""
        data = asdict(self)
        data["rng_state"] = _jsonable(self.rng_state)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvolutionState:
        return cls(
            generation=int(data["generation"]),
            parent=[int(v) for v in data["parent"]],
            parent_fitness=float(data["parent_fitness"]),
            parent_origin=str(data["parent_origin"]),
            history=[dict(h) for h in data["history"]],
            rng_state=_tupled(data["rng_state"]),
            tokens_seen=int(data["tokens_seen"]),
            seed_fitness={str(k): float(v) for k, v in dict(data.get("seed_fitness", {})).items()},
        )


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


def _tupled(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tupled(v) for v in value)
    return value


def _score(fitness, candidates: list[list[int]], tokens: int | None, draw: tuple[int, int] | None,
           parent: list[int] | None) -> list[float]:
    values = [float(v) for v in fitness(candidates, tokens, draw=draw, parent=parent)]
    if len(values) != len(candidates):
        raise ValueError(f"fitness returned {len(values)} values for {len(candidates)} candidates")
    return values


def _best_first(values: Sequence[float]) -> list[int]:
    # stable: equal fitness keeps the earlier candidate first (NaN sorts last)
    return sorted(range(len(values)), key=lambda i: (values[i] != values[i], values[i], i))


def evolve(
    seeds: Mapping[str, list[int]],
    fitness: Callable[..., list[float]],
    schedule: Schedule,
    groups: Sequence[int],
    low: Sequence[int],
    high: Sequence[int],
    seed: int,
    state: EvolutionState | None = None,
    on_generation: Callable[[EvolutionState], None] | None = None,
) -> EvolutionState:
    """Run (or continue) the search until ``schedule.generations`` generations are done.

    ``seeds``: named starting vectors, all with the same per-group sums, scored together on one
    last-stage minibatch (draw ``(0, last stage)``); the best is the first parent and its name the
    origin of its line. Generation g makes ``schedule.offspring`` distinct :func:`level_switch`
    children of the parent (never the parent itself) and scores them stage by stage on draw
    ``(g, stage)``, keeping each stage's ``survivors``; the parent joins the last stage, and that
    stage's best (the parent itself when no child beats it on the same tokens) is the next parent.
    ``tokens_seen`` counts candidate-tokens scored (candidates x tokens, summed over fitness calls).
    ``on_generation`` gets a copy of the state after each generation; exceptions (KeyboardInterrupt
    included) propagate, and the last state handed out is the one to resume from.
    """
    last_index = len(schedule.stages) - 1
    last_tokens = schedule.stages[-1].tokens
    if state is None:
        if not seeds:
            raise ValueError("evolve needs at least one seed vector")
        names = list(seeds)
        vectors = [[int(v) for v in seeds[n]] for n in names]
        for name, vec in zip(names, vectors):
            try:
                _check_vector(vec, groups, low, high)
            except ValueError as exc:
                raise ValueError(f"seed {name!r}: {exc}") from None
        sums = group_sums(vectors[0], groups)
        for name, vec in zip(names[1:], vectors[1:]):
            if group_sums(vec, groups) != sums:
                raise ValueError(
                    f"seed {name!r} has per-group level sums {group_sums(vec, groups)}, "
                    f"seed {names[0]!r} has {sums}: all seeds must spend the same budget"
                )
        values = _score(fitness, vectors, last_tokens, (0, last_index), None)
        best = _best_first(values)[0]
        state = EvolutionState(
            generation=0,
            parent=list(vectors[best]),
            parent_fitness=values[best],
            parent_origin=names[best],
            history=[],
            rng_state=random.Random(seed).getstate(),
            tokens_seen=len(vectors) * last_tokens,
            seed_fitness=dict(zip(names, values)),
        )
    else:
        state = copy.deepcopy(state)
        _check_vector(state.parent, groups, low, high)

    rng = random.Random()
    rng.setstate(state.rng_state)
    while state.generation < schedule.generations:
        started = time.perf_counter()
        generation = state.generation + 1
        parent = state.parent
        offspring: list[list[int]] = []
        seen = {tuple(parent)}
        attempts = 0
        # a small search space may hold fewer distinct children than asked for
        while len(offspring) < schedule.offspring and attempts < 50 * schedule.offspring:
            attempts += 1
            child = level_switch(parent, groups, low, high, rng)
            key = tuple(child)
            if key in seen:
                continue
            seen.add(key)
            offspring.append(child)

        tokens_seen = state.tokens_seen
        candidates = offspring
        values: list[float] = []
        for index, stage in enumerate(schedule.stages):
            last = index == last_index
            if not last and stage.survivors >= len(candidates):
                continue  # nothing to cut: save the scoring, the next stage sees the same set
            if last:
                candidates = [*candidates, list(parent)]  # elitist: the parent competes on the same tokens
            values = _score(fitness, candidates, stage.tokens, (generation, index), parent)
            tokens_seen += len(candidates) * stage.tokens
            order = _best_first(values)[: stage.survivors]
            candidates = [candidates[i] for i in order]
            values = [values[i] for i in order]

        improved = candidates[0] != parent
        state.parent = list(candidates[0])
        state.parent_fitness = values[0]
        state.generation = generation
        state.tokens_seen = tokens_seen
        state.rng_state = rng.getstate()
        state.history.append(
            {
                "generation": state.generation,
                "best_fitness": state.parent_fitness,
                "origin": state.parent_origin,
                "improved": improved,
                "offspring": len(offspring),
                "tokens_seen": tokens_seen,
                "seconds": round(time.perf_counter() - started, 3),
            }
        )
        if on_generation is not None:
            on_generation(copy.deepcopy(state))
    return state


def final_selection(state: EvolutionState, seeds: Mapping[str, list[int]],
                    fitness: Callable[..., list[float]]) -> tuple[list[int], str, dict[str, float]]:
    """The search's result: the last parent, unless a seed scores lower than it on *every*
    calibration token (``draw=None``). With fresh minibatches the parent is the winner of many noisy
    comparisons; this one comparison on the whole calibration set keeps the promise that the result
    is never worse, on the search's own fitness, than a heuristic it was seeded with. Returns
    (vector, ``"search"`` or the seed's name, fitness of every compared vector by name)."""
    names, vectors = ["search"], [list(state.parent)]
    for name, vec in seeds.items():
        if list(vec) not in vectors:
            names.append(name)
            vectors.append([int(v) for v in vec])
    values = _score(fitness, vectors, None, None, None)
    best = _best_first(values)[0]
    return vectors[best], names[best], dict(zip(names, values))
