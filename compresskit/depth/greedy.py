"""FinerCut's greedy search (methods.md §8.2), on ``engine.replay.BlockReplay``.

Each step scores every remaining candidate c by d(c) = distance(softmax(z_ref), softmax(z_c)),
z_ref the unpruned model's logits (computed once), z_c the logits with everything removed so far
plus c, and removes argmin d (ties: the smaller module name, as the reference's sorted names).
Scoring c replays only from c's block: the hidden state entering that block is cached, and after
every removal the cache is refreshed from the removed block onward (one pass over the later
blocks), so a step costs Σ_c (L − block(c)) block forwards instead of one full forward per
candidate. ``prefix_cache=False`` replays from block 0 every time (the cost the cache saves; the
benchmark measures both). ``one_shot`` scores each candidate once on the unpruned model and
removes them in that order (the paper's ablation).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .candidates import Candidate, excluded_front_blocks, put_back_after
from .scoring import DistanceAccumulator


class OutputScorer:
    """Distance of the model's output from the unpruned reference, replaying from any block."""

    def __init__(self, replay, distance: str, js_form: str):
        self.replay = replay
        self.distance, self.js_form = distance, js_form
        n = replay.adapter.num_blocks
        self.reference = [replay.head([h])[0] for h in replay.block_inputs[n]]
        self.block_runs = 0

    def _compare(self, hidden: list[torch.Tensor]) -> float:
        acc = DistanceAccumulator(self.distance, self.js_form)
        for b, h in enumerate(hidden):
            acc.add(self.reference[b], self.replay.head([h])[0], self.replay.token_mask(b))
        return acc.value()

    def score(self, start: int, swaps: dict) -> float:
        """Distance with ``swaps`` installed, replaying blocks ``start ..`` from the cached input."""
        self.block_runs += self.replay.adapter.num_blocks - start
        return self._compare(self.replay.run_from(start, swaps))

    def refresh(self, start: int) -> None:
        """Recompute the cached block inputs after the model changed in block ``start``."""
        n = self.replay.adapter.num_blocks
        for i in range(start, n):
            self.replay.block_inputs[i + 1] = self.replay.run_from(i, stop=i + 1)
        self.block_runs += n - start

    def current(self) -> float:
        """Distance of the model as it is now (from the cached output of the last block)."""
        n = self.replay.adapter.num_blocks
        return self._compare(self.replay.block_inputs[n])


@dataclass
class StopRule:
    """Stop after ``count`` removals, or at the removal count nearest ``params`` parameters.

    ``params`` (``--remove-params``): the greedy order is computed as always; the search stops
    either just before or just after the removal that crosses the target, whichever leaves the
    removed parameter count closer to ``params`` (a tie removes, so the request is met). Removal
    sizes differ (an MLP sublayer holds ~2× an attention's parameters), so "stop once the target
    is reached" could overshoot by a whole sublayer when stopping one step earlier is closer. The
    first removal is always made: a run never returns the model unchanged (as ``--remove``, which
    refuses a fraction that removes nothing).
    """

    count: int | None = None
    params: int | None = None

    def done(self, removed: int, removed_params: int) -> bool:
        if self.count is not None:
            return removed >= self.count
        return removed_params >= (self.params or 0)

    def take(self, removed: int, removed_params: int, next_params: int) -> bool:
        """Whether the greedy step's choice (``next_params`` parameters) is removed; False: stop
        before it (the parameter target is closer without it)."""
        if self.count is not None or removed == 0:
            return True
        target = self.params or 0
        return removed_params + next_params - target <= target - removed_params


@dataclass
class Step:
    step: int
    candidate: Candidate
    distance: float
    removed_params: int
    scored: int
    seconds: float


@dataclass
class SearchResult:
    steps: list[Step] = field(default_factory=list)
    withheld_blocks: int = 0
    put_back_after: int | None = None
    put_back_at_step: int | None = None
    final_distance: float | None = None
    #: the greedy choice of the last step, not removed by the parameter stop rule (name, params, distance)
    declined: dict | None = None
    block_runs: int = 0
    seconds: float = 0.0


def greedy_search(
    scorer: OutputScorer,
    candidates: list[Candidate],
    stop: StopRule,
    swaps_for: Callable[[Candidate], dict],
    apply: Callable[[Candidate], None],
    exclude_front: float | None = None,
    one_shot: bool = False,
    prefix_cache: bool = True,
    progress: Callable[[int, int, str], None] | None = None,
    eligible: Callable[[Candidate, list[Step]], bool] | None = None,
) -> SearchResult:
    """Remove candidates one by one until ``stop``; ``apply`` installs a removal in the model.

    ``exclude_front``: the reference's ``-x`` (``--exclude-front``; 0 still withholds block 0 from the
    first step); None withholds nothing (a plain greedy search). ``eligible(candidate, steps so
    far)``: False leaves a candidate out of this step (EvoPress's seeds: at most k removals of each
    sublayer type, ``search/depth.py``); the search stops when no remaining candidate is eligible."""
    t0 = time.perf_counter()
    num_blocks = scorer.replay.adapter.num_blocks
    result = SearchResult()
    if exclude_front is not None:
        result.withheld_blocks = excluded_front_blocks(num_blocks, exclude_front)
        result.put_back_after = put_back_after(len(candidates), exclude_front)
    remaining = sorted(candidates, key=lambda c: c.name)
    start_of = (lambda c: c.block) if prefix_cache else (lambda c: 0)
    initial: dict[str, float] = {}
    if one_shot:
        for k, c in enumerate(remaining):
            initial[c.name] = scorer.score(start_of(c), swaps_for(c))
            if progress is not None:
                progress(k + 1, len(remaining), f"one-shot score {c.label()}")
    removed_params = 0
    target = stop.count if stop.count is not None else len(candidates)
    while remaining and not stop.done(len(result.steps), removed_params):
        t_step = time.perf_counter()
        back = result.put_back_after is not None and len(result.steps) >= result.put_back_after
        active = [c for c in remaining if back or c.block >= result.withheld_blocks]
        if not active:  # everything outside the front is gone before the put-back count: put back now
            active, back = list(remaining), True
        if eligible is not None:
            active = [c for c in active if eligible(c, result.steps)]
            if not active:
                break
        if back and result.withheld_blocks and result.put_back_at_step is None:
            result.put_back_at_step = len(result.steps) + 1
        if one_shot:
            scores = {c.name: initial[c.name] for c in active}
        else:
            scores = {c.name: scorer.score(start_of(c), swaps_for(c)) for c in active}
        best = min(active, key=lambda c: (scores[c.name], c.name))
        if not stop.take(len(result.steps), removed_params, best.params):
            result.declined = {"name": best.name, "type": best.kind, "block": best.block, "params": best.params,
                               "distance": scores[best.name]}
            break
        apply(best)
        if prefix_cache:
            scorer.refresh(best.block)
        remaining.remove(best)
        removed_params += best.params
        result.steps.append(Step(len(result.steps) + 1, best, scores[best.name], removed_params, len(active),
                                 time.perf_counter() - t_step))
        if progress is not None:
            progress(len(result.steps), target, f"removed {best.label()} (d={scores[best.name]:.3g})")
    if result.steps:
        if not prefix_cache:
            scorer.refresh(0)
        result.final_distance = scorer.current()
    result.block_runs = scorer.block_runs
    result.seconds = time.perf_counter() - t0
    return result
