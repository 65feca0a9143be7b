"""The pure EvoPress search (compresskit/search/evolution.py): mutation, selection, determinism, resume."""

from __future__ import annotations

import random

import pytest

from compresskit.search.evolution import (
    PAPER_SPARSITY,
    EvolutionState,
    Schedule,
    Stage,
    evolve,
    final_selection,
    group_sums,
    level_switch,
    paper_depth_schedule,
)


def test_level_switch_keeps_group_sums_and_bounds():
    rng = random.Random(3)
    groups = [0, 0, 0, 1, 1, 1, 1, 2]
    low = [-2, -1, 0, 0, 0, 0, 0, -3]
    high = [2, 3, 1, 1, 1, 1, 1, 3]
    levels = [0, 0, 0, 1, 0, 1, 0, 0]
    sums = group_sums(levels, groups)
    changed = 0
    for _ in range(2000):
        child = level_switch(levels, groups, low, high, rng)
        assert group_sums(child, groups) == sums
        assert all(lo <= v <= hi for v, lo, hi in zip(child, low, high))
        # group 2 has a single unit: it can never move
        assert child[7] == 0
        changed += child != levels
        levels = child
    assert changed > 1500  # a flip is always possible here, so children differ nearly always


def test_level_switch_flip_count_follows_min_of_two_uniforms():
    rng = random.Random(0)
    n = 50
    counts = {1: 0, 2: 0, 3: 0}
    for _ in range(3000):
        child = level_switch([0] * n, [0] * n, [-5] * n, [5] * n, rng)
        moved = sum(abs(v) for v in child) // 2
        if moved in counts:
            counts[moved] += 1
    # P(min(U1,U2)=1) = 5/9, 2 -> 3/9, 3 -> 1/9 (flips on 50 units rarely cancel)
    assert 0.50 < counts[1] / 3000 < 0.61
    assert 0.28 < counts[2] / 3000 < 0.39
    assert 0.07 < counts[3] / 3000 < 0.15


def test_level_switch_without_possible_flip_returns_copy():
    levels = [1, 1]
    assert level_switch(levels, [0, 1], [0, 0], [1, 1], random.Random(0)) == [1, 1]


def _toy_fitness(target, calls=None):
    """Separable: sum of (level - target)^2 plus a token-dependent but order-preserving offset."""

    def fitness(candidates, tokens, *, draw, parent):
        if calls is not None:
            calls.append((len(candidates), tokens, draw, None if parent is None else list(parent)))
        return [sum((v - t) ** 2 for v, t in zip(c, target)) + (0.0 if tokens is None else 1.0 / tokens)
                for c in candidates]

    return fitness


SMALL = Schedule("test", 150, 8, (Stage(16, 3), Stage(64, 1)))


def test_toy_optimum_is_reached_and_parent_never_worsens():
    n = 12
    target = [3, -3, 2, -2, 1, -1, 0, 0, 3, -3, 0, 0]  # sums to 0: reachable from the all-zero start
    history = []
    state = evolve(
        {"uniform": [0] * n}, _toy_fitness(target), SMALL, [0] * n, [-4] * n, [4] * n, seed=1,
        on_generation=lambda s: history.append(s.parent_fitness),
    )
    assert state.parent == target
    assert state.generation == SMALL.generations
    assert all(b <= a for a, b in zip(history, history[1:]))
    assert [h["generation"] for h in state.history] == list(range(1, SMALL.generations + 1))
    assert all(h["origin"] == "uniform" for h in state.history)


def test_best_seed_becomes_parent_and_origin():
    n = 6
    target = [2, -2, 1, -1, 0, 0]
    seeds = {"uniform": [0] * n, "good": [2, -2, 0, 0, 0, 0], "bad": [-2, 2, 0, 0, 0, 0]}
    state = evolve(seeds, _toy_fitness(target), Schedule("s", 0, 4, (Stage(8, 1),)), [0] * n, [-3] * n, [3] * n, 0)
    assert state.parent_origin == "good" and state.parent == seeds["good"]
    assert set(state.seed_fitness) == set(seeds)
    with pytest.raises(ValueError, match="same budget"):
        evolve({"a": [0] * n, "b": [1] + [0] * (n - 1)}, _toy_fitness(target), SMALL, [0] * n, [-3] * n, [3] * n, 0)


def test_stages_draw_afresh_and_the_parent_is_rescored_in_the_last_stage():
    calls = []
    n = 8
    schedule = Schedule("s", 3, 6, (Stage(16, 3), Stage(64, 1)))
    state = evolve({"u": [0] * n}, _toy_fitness([1, -1] * 4, calls), schedule, [0] * n, [-2] * n, [2] * n, 0)
    # the seed on draw (0, last stage); per generation g: 6 offspring on draw (g, 0), then the 3 survivors
    # and the parent on draw (g, 1) — a fresh minibatch per stage and generation, as the reference's selection
    assert [(c[0], c[1], c[2]) for c in calls] == [(1, 64, (0, 1))] + [
        x for g in (1, 2, 3) for x in ((6, 16, (g, 0)), (4, 64, (g, 1)))]
    assert calls[0][3] is None and all(c[3] is not None for c in calls[1:])  # the parent is named for its block inputs
    assert state.tokens_seen == 64 + 3 * (6 * 16 + 4 * 64)


def test_final_selection_keeps_a_seed_that_beats_the_last_parent_on_every_token():
    n = 4
    target = [1, -1, 0, 0]
    state = evolve({"u": [0] * n}, _toy_fitness(target), Schedule("s", 0, 2, (Stage(8, 1),)), [0] * n, [-2] * n,
                   [2] * n, 0)
    state.parent = [2, -2, 0, 0]  # a parent that a noisy draw favoured, worse than the seed below
    vector, name, values = final_selection(state, {"u": [0] * n, "good": [1, -1, 0, 0]}, _toy_fitness(target))
    assert (vector, name) == ([1, -1, 0, 0], "good")
    assert values == {"search": 2.0, "u": 2.0, "good": 0.0}
    vector, name, _ = final_selection(state, {"bad": [-2, 2, 0, 0]}, _toy_fitness(target))
    assert name == "search" and vector == [2, -2, 0, 0]


def test_deterministic_under_seed_and_differs_across_seeds():
    n = 10
    target = [2, -2, 1, -1, 0, 0, 2, -2, 1, -1]
    args = ({"u": [0] * n}, _toy_fitness(target), Schedule("s", 12, 5, (Stage(8, 2), Stage(32, 1))), [0] * n, [-3] * n, [3] * n)
    a = evolve(*args, seed=7)
    b = evolve(*args, seed=7)
    c = evolve(*args, seed=8)
    strip = lambda s: [{k: v for k, v in h.items() if k != "seconds"} for h in s.history]  # noqa: E731
    assert (a.parent, a.rng_state, strip(a)) == (b.parent, b.rng_state, strip(b))
    assert a.rng_state != c.rng_state


def test_resume_from_saved_state_equals_uninterrupted_run():
    n = 10
    target = [3, -3, 2, -2, 1, -1, 0, 0, 1, -1]
    args = ({"u": [0] * n}, _toy_fitness(target), Schedule("s", 20, 6, (Stage(8, 2), Stage(32, 1))), [0] * n, [-4] * n, [4] * n)
    full = evolve(*args, seed=5)

    saved = []

    def interrupt(state):
        saved.append(EvolutionState.from_dict(state.to_dict()))  # a JSON round trip, as the caller stores it
        if state.generation == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evolve(*args, seed=5, on_generation=interrupt)
    resumed = evolve(*args, seed=5, state=saved[-1])
    assert resumed.generation == 20
    assert resumed.parent == full.parent
    assert resumed.parent_fitness == full.parent_fitness
    assert resumed.rng_state == full.rng_state
    assert resumed.tokens_seen == full.tokens_seen
    assert [h["best_fitness"] for h in resumed.history] == [h["best_fitness"] for h in full.history]


def test_small_search_space_does_not_hang():
    # two units, levels 0..1, sum 1: only one other vector exists
    state = evolve({"u": [1, 0]}, _toy_fitness([0, 1]), SMALL, [0, 0], [0, 0], [1, 1], seed=0)
    assert state.parent == [0, 1]
    assert all(h["offspring"] <= 1 for h in state.history)


def test_schedules_record_the_reference():
    assert PAPER_SPARSITY.generations == 400 and PAPER_SPARSITY.offspring == 64
    assert [(s.tokens, s.survivors) for s in PAPER_SPARSITY.stages] == [(2048, 8), (16384, 2), (65536, 1)]
    depth = paper_depth_schedule(32, 8)
    assert depth.generations == int(8 * 24 / 1.5) and depth.offspring == 32
    assert [(s.tokens, s.survivors) for s in depth.stages] == [(2048, 2), (32768, 1)]
    with pytest.raises(ValueError, match="last stage"):
        Schedule("x", 1, 1, (Stage(8, 2),))
    over = PAPER_SPARSITY.with_overrides(tokens=[512, 1024, 4096], generations=3)
    assert [s.tokens for s in over.stages] == [512, 1024, 4096] and over.generations == 3
