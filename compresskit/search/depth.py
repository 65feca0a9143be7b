"""EvoPress's depth search: which attention / MLP sublayers (or which whole blocks) to remove,
chosen by measured search (Sieberling et al., ICML 2025, ``evo_drop_search.py``; methods.md §14).

Genes: one on/off unit per attention sublayer and per MLP (or MoE) sublayer (``--level sublayer``),
or per whole block (``--level block``); level 1 = removed. The sublayer level has two groups, one
per type, so :func:`search.evolution.level_switch` swaps a removed attention with a kept attention
(or an MLP with an MLP) and the number removed of each type never changes, as in the reference.

Budget (``--remove R``): ``k = int(L·R)`` blocks at the block level; at the sublayer level ``k``
attention and ``k`` MLP sublayers, the reference's equal split (its ``blocks_to_remove`` of each
type). So the two levels at the same R remove exactly the same parameters on a model whose blocks
are alike, the comparison the paper makes (FinerCut's ``int(2L·R)`` sublayers of any type can be one
more and of any mix). ``--remove-params P``: the ``k`` whose removed parameters (k of each type, or
k blocks, counted as the mean per unit) are nearest ``P`` of the decoder blocks' parameters.

Fitness: KL(p_dense ‖ p_candidate) per token (``analysis.distances.token_kl``, full logits or the
reference's top-K form), averaged over the first ``tokens`` calibration tokens (whole calibration
batches; ``search.evolution``'s fitness contract: deterministic for a token count). A candidate is
evaluated by swapping the removal stubs of ``depth/removal.sublayer_swaps`` in and replaying the
cached block inputs (``engine.replay.BlockReplay``) from the first block it changes; the model is
never re-loaded and never changed until the winner is installed with the code FinerCut uses
(``depth/removal.remove_sublayer``, ``depth/finish.finish_removal``: identity blocks deleted and
renumbered, a stock checkpoint when only whole blocks go, else the ``removed_sublayers`` structure).

Seeds (``--seed-from``): ``finercut`` (FinerCut's greedy sublayer search, JS code form, allowed at
most k removals of each type, so it ends on exactly the budget) and ``block-greedy`` (FinerCut's
greedy at ``--level block``, k blocks; at the sublayer level both sublayers of those k blocks, the
same k of each type). At ``--level block`` the two names are one search (FinerCut at the block
level *is* block greedy). Without seeds the search starts from the best of a few random vectors of
the budget (the reference draws 64 and keeps the best on 2,048 tokens).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import InputError

LEVELS = ("sublayer", "block")
DEPTH_SEEDS = ("finercut", "block-greedy")
#: random starting vectors scored when no seed is named (and beside named seeds: none)
RANDOM_STARTS = 4


@dataclass(frozen=True)
class Unit:
    """One gene: the ``kind`` ("attn" | "mlp" | "block") of block ``block``; ``params`` removed with it."""

    block: int
    kind: str
    name: str
    params: int

    def label(self) -> str:
        return f"{self.kind}{self.block}"


# ---------------------------------------------------------------------------------------------- units / budget


def depth_units(adapter, level: str, keep: str | None = None) -> tuple[list[Unit], list[int], list[int]]:
    """(units, groups, high): the genes in a fixed order (all attentions by block, then all MLPs; or
    the blocks), their groups (0 attention / 1 MLP; 0 for blocks) and each gene's highest level
    (0 for a unit protected by ``keep`` or already removed by an earlier stage, else 1)."""
    from ..depth.candidates import build_candidates

    if level not in LEVELS:
        raise InputError(f"--method evopress --level must be one of {', '.join(LEVELS)} for a depth search, got {level!r}")
    kinds = ("attn", "mlp") if level == "sublayer" else ("block",)
    units: list[Unit] = []
    groups: list[int] = []
    high: list[int] = []
    for g, kind in enumerate(kinds):
        present = {c.block: c for c in build_candidates(adapter, kind)}
        allowed = {c.block for c in build_candidates(adapter, kind, keep)} if keep else set(present)
        for c in sorted(present.values(), key=lambda c: c.block):
            units.append(Unit(c.block, kind, c.name, c.params))
            groups.append(g)
            high.append(1 if c.block in allowed else 0)
    return units, groups, high


def budget(num_blocks: int, units: list[Unit], groups: list[int], high: list[int], block_params: int,
           remove: float | None, remove_params: float | None, level: str) -> int:
    """``k``: removals per group (see the module docstring); one ``InputError`` when it cannot be met."""
    flag = f"--remove {remove:g}" if remove is not None else f"--remove-params {remove_params:g}"
    if remove is not None:
        k = int(num_blocks * remove + 1e-9)
        if k < 1:
            raise InputError(f"{flag} removes nothing: the model has {num_blocks} blocks and --method evopress "
                             f"--level {level} removes int(L·R) {'blocks' if level == 'block' else 'of each sublayer type'} "
                             f"(the smallest useful value is {1 / num_blocks:.3g})")
    else:
        per_group = len(units) / len(set(groups))  # units of one type (or blocks)
        per_step = sum(u.params for u in units) / per_group  # one more of each type (or one block), on average
        k = max(1, int(round(remove_params * block_params / per_step)))
    for g in sorted(set(groups)):
        free = sum(1 for u, gg, h in zip(units, groups, high) if gg == g and h == 1)
        if k > free:
            what = "blocks" if level == "block" else ("attention sublayers" if g == 0 else "MLP sublayers")
            raise InputError(f"{flag} needs {k} removed {what} but only {free} can be removed"
                             + (" (the rest are kept by --keep or were removed by an earlier stage)"
                                if free < num_blocks else ""))
        if k >= free and level == "block":
            raise InputError(f"{flag} would remove every block of the model")
    return k


# ---------------------------------------------------------------------------------------------- fitness


class DepthFitness:
    """``fitness(candidates, tokens)``: mean per-token KL(dense ‖ candidate) on the first ``tokens``
    calibration tokens (whole batches), replaying from each candidate's first changed block.

    The dense model's logits (or their top ``top_k`` values and ids) are computed once for the
    batches the schedule's largest stage needs; the candidate's logits exist one batch at a time.
    """

    def __init__(self, replay, units: list[Unit], max_tokens: int, top_k: int | None = None):
        import torch

        from ..analysis.distances import top_k_logits

        self.replay, self.units = replay, units
        self.adapter = replay.adapter
        self.top_k = top_k
        self.batch_tokens = []
        for b in range(replay.num_batches):
            mask = replay.token_mask(b)
            h = replay.block_inputs[0][b]
            self.batch_tokens.append(int(mask.sum()) if mask is not None else int(h.shape[0] * h.shape[1]))
        self.available = sum(self.batch_tokens)
        needed = self.batches_for(max_tokens)
        n = self.adapter.num_blocks
        self.reference = []
        for b in range(needed):
            logits = replay.head([replay.block_inputs[n][b]])[0]
            self.reference.append(top_k_logits(logits, top_k) if top_k else logits)
            del logits
        self.calls = 0
        self.block_runs = 0
        self._torch = torch

    def batches_for(self, tokens: int) -> int:
        total = 0
        for b, t in enumerate(self.batch_tokens):
            total += t
            if total >= tokens:
                return b + 1
        return len(self.batch_tokens)

    def tokens_for(self, tokens: int) -> int:
        """The tokens actually scored for a stage of ``tokens`` (whole batches, at most all)."""
        return sum(self.batch_tokens[: self.batches_for(tokens)])

    def swaps(self, genes: Sequence[int]) -> tuple[int, dict]:
        """(first changed block, module path -> stub) for a gene vector; (num_blocks, {}) for none."""
        from ..depth.removal import sublayer_swaps

        start = self.adapter.num_blocks
        swaps: dict = {}
        for unit, g in zip(self.units, genes):
            if g:
                swaps.update(sublayer_swaps(self.adapter, unit.block, unit.kind))
                start = min(start, unit.block)
        return start, swaps

    def _final_hidden(self, start: int, swaps: dict, batches: int) -> list:
        from ..engine.replay import swapped
        from ..models.placement import onload

        replay = self.replay
        hidden = [replay.block_inputs[start][b] for b in range(batches)]
        n = self.adapter.num_blocks
        with swapped(self.adapter.model, swaps):
            for i in range(start, n):
                out = []
                with onload(self.adapter.block(i), replay.device) as block:
                    for b, h in enumerate(hidden):
                        call = replay.call(b, i)
                        y = block(h.to(replay.device), *call.args, **call.kwargs)
                        y = y[0] if isinstance(y, (tuple, list)) else y
                        out.append(y.to(replay.store_device))
                hidden = out
        self.block_runs += (n - start) * batches
        return hidden

    def score(self, genes: Sequence[int], tokens: int) -> float:
        from ..analysis.distances import token_kl

        batches = self.batches_for(tokens)
        start, swaps = self.swaps(genes)
        hidden = self._final_hidden(start, swaps, batches)
        total, count = 0.0, 0
        with self._torch.no_grad():
            for b, h in enumerate(hidden):
                logits = self.replay.head([h])[0]
                kl = token_kl(self.reference[b], logits, self.replay.token_mask(b))
                total += float(kl.sum())
                count += int(kl.numel())
        self.calls += 1
        return total / max(count, 1)

    def __call__(self, candidates: Sequence[Sequence[int]], tokens: int) -> list[float]:
        return [self.score(c, tokens) for c in candidates]


# ---------------------------------------------------------------------------------------------- seeds


def _genes_of(units: list[Unit], removed: set[tuple[str, int]]) -> list[int]:
    return [1 if (u.kind, u.block) in removed else 0 for u in units]


def greedy_seed(replay, adapter, units: list[Unit], groups: list[int], high: list[int], k: int, level: str,
                name: str, progress: Callable[[int, int, str], None] | None = None) -> tuple[list[int], dict]:
    """The gene vector of one greedy heuristic at exactly the budget, and a record of it.

    ``finercut``: FinerCut's greedy sublayer search (its defaults: JS in the code form, block 0
    withheld from the first step) with at most ``k`` removals of each type; ``block-greedy``: its
    greedy at the block level, ``k`` blocks. Runs on ``replay`` (the fitness's cache) and leaves
    both the model and the cache as they were."""
    from ..depth.candidates import Candidate
    from ..depth.greedy import OutputScorer, StopRule, greedy_search
    from ..depth.removal import sublayer_swaps

    t0 = time.perf_counter()
    model = adapter.model
    blocks = name == "block-greedy" or level == "block"
    allowed = [(u, g) for u, g, h in zip(units, groups, high) if h]
    if blocks:
        if level == "block":
            cands = [Candidate(u.block, "block", u.name, u.params) for u, _ in allowed]
        else:  # a block is a candidate when both of its sublayers may go
            attn = {u.block: u for u, _ in allowed if u.kind == "attn"}
            mlp = {u.block: u for u, _ in allowed if u.kind == "mlp"}
            cands = [Candidate(b, "block", adapter.block_name(b), attn[b].params + mlp[b].params)
                     for b in sorted(set(attn) & set(mlp))]
        if len(cands) < k:
            raise InputError(f"--seed-from {name}: only {len(cands)} whole blocks can be removed, the budget is {k}")
        stop, eligible = StopRule(count=k), None
    else:
        cands = [Candidate(u.block, u.kind, u.name, u.params) for u, _ in allowed]
        stop = StopRule(count=2 * k)

        def eligible(c, steps):
            return sum(1 for s in steps if s.candidate.kind == c.kind) < k

    originals: list[tuple] = []

    def apply(c):
        for path, stub in sublayer_swaps(adapter, c.block, c.kind).items():
            parent_path, _, attr = path.rpartition(".")
            parent = model.get_submodule(parent_path)
            originals.append((parent, attr, getattr(parent, attr)))
            setattr(parent, attr, stub)

    saved = list(replay.block_inputs)  # refresh() replaces entries, never a tensor in place
    try:
        scorer = OutputScorer(replay, "js", "code")
        result = greedy_search(scorer, cands, stop, swaps_for=lambda c: sublayer_swaps(adapter, c.block, c.kind),
                               apply=apply, exclude_front=0.0, progress=progress, eligible=eligible)
    finally:
        for parent, attr, module in reversed(originals):
            setattr(parent, attr, module)
        replay.block_inputs[:] = saved
    removed: set[tuple[str, int]] = set()
    for s in result.steps:
        c = s.candidate
        if c.kind == "block" and level == "sublayer":
            removed |= {("attn", c.block), ("mlp", c.block)}
        else:
            removed.add((c.kind, c.block))
    genes = _genes_of(units, removed)
    record = {"order": [s.candidate.label() for s in result.steps], "distance": result.final_distance,
              "seconds": round(time.perf_counter() - t0, 3)}
    return genes, record


def random_seeds(units: list[Unit], groups: list[int], high: list[int], k: int, seed: int,
                 count: int = RANDOM_STARTS) -> dict[str, list[int]]:
    """``count`` distinct random vectors with exactly ``k`` removed units of each group."""
    rng = random.Random(f"evopress-depth-{seed}")
    out: dict[str, list[int]] = {}
    seen: set[tuple] = set()
    for attempt in range(50 * count):
        genes = [0] * len(units)
        for g in sorted(set(groups)):
            free = [i for i, (gg, h) in enumerate(zip(groups, high)) if gg == g and h]
            for i in rng.sample(free, k):
                genes[i] = 1
        if tuple(genes) in seen:
            continue
        seen.add(tuple(genes))
        out[f"random{len(out)}"] = genes
        if len(out) == count:
            break
    return out


# ---------------------------------------------------------------------------------------------- the method


def _opt(config, name: str, default=None):
    return getattr(config, name, default)


def parse_depth_seeds(value) -> list[str]:
    """``--seed-from`` for a depth search: names from :data:`DEPTH_SEEDS` (one ``InputError`` else)."""
    if value is None:
        return []
    names = [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if str(v).strip()]
    bad = [n for n in names if n not in DEPTH_SEEDS]
    if bad:
        raise InputError(f"unknown --seed-from {bad[0]!r} for a depth search (--level sublayer|block); "
                         f"choose from: {', '.join(DEPTH_SEEDS)}")
    return list(dict.fromkeys(names))


def resolve_schedule(config, units: int, removed: int):
    """The schedule by name (``fast`` / ``paper`` for depth genes) with the CLI's overrides."""
    from .evolution import depth_schedule

    schedule = depth_schedule(_opt(config, "schedule", "fast") or "fast", units, removed)
    tokens = _opt(config, "tokens")
    if isinstance(tokens, str):
        tokens = [int(t) for t in tokens.split(",") if t.strip()]
    survivors = _opt(config, "survivors")
    if isinstance(survivors, str):
        survivors = [int(t) for t in survivors.split(",") if t.strip()]
    if tokens is not None and survivors is None and len(tokens) != len(schedule.stages):
        # --tokens alone with another number of stages: survivors halve down to 1, as the reference's
        survivors = [max(1, 2 ** (len(tokens) - 1 - i)) for i in range(len(tokens))]
    try:
        return schedule.with_overrides(_opt(config, "generations"), _opt(config, "offspring"), tokens, survivors)
    except ValueError as exc:
        raise InputError(f"--method evopress: {exc}") from None


def run_depth_search(job, config):
    """``--method evopress --level sublayer|block``: the search, the removal, the manifest record."""
    from ..depth.finish import finish_removal
    from ..depth.precision import float32_scoring
    from ..depth.removal import remove_sublayer, removed_kinds
    from ..depth.report import block_params as param_basis
    from ..engine.replay import BlockReplay
    from ..methods.base import MethodResult
    from .evolution import EvolutionState, evolve

    t0 = time.perf_counter()
    adapter = job.adapter
    level = _opt(config, "level", "sublayer")
    remove, remove_params = _opt(config, "remove"), _opt(config, "remove_params")
    if (remove is None) == (remove_params is None):
        raise InputError("--method evopress --level sublayer|block needs exactly one of --remove R or --remove-params P")
    seed = int(_opt(config, "seed", 0) or 0)
    seeds_named = parse_depth_seeds(_opt(config, "seed_from"))
    num_blocks = adapter.num_blocks
    removed_before = {i: kinds for i in range(num_blocks) if (kinds := removed_kinds(adapter, i))}
    units, groups, high = depth_units(adapter, level, _opt(config, "keep"))
    block_params = param_basis(adapter)
    model_params = sum(p.numel() for p in job.model.parameters())
    k = budget(num_blocks, units, groups, high, block_params, remove, remove_params, level)
    free_per_group = sum(1 for g, h in zip(groups, high) if g == 0 and h)
    schedule = resolve_schedule(config, free_per_group, k)
    top_k = _opt(config, "top_k")
    data = job.calibration_data()

    def report(phase, done, total, label):
        if job.progress is not None:
            job.progress(phase, done, total, label)

    low = [0] * len(units)
    state_path = _opt(config, "_state_path")
    with float32_scoring(adapter, enabled=_opt(config, "score_dtype", "float32") == "float32"):
        replay = BlockReplay(adapter, data.input_ids, data.attention_mask, device=job.device,
                             batch_size=job.batch_size).capture()
        fitness = DepthFitness(replay, units, schedule.max_tokens, top_k)
        if fitness.available < schedule.max_tokens:
            import warnings

            warnings.warn(f"evopress: the calibration set has {fitness.available} tokens, the schedule's last stage "
                          f"asks for {schedule.max_tokens}; stages are scored on at most {fitness.available}")
        seeds: dict[str, list[int]] = {}
        seed_records: dict[str, dict] = {}
        for name in seeds_named:
            if level == "block" and any(n in seeds for n in DEPTH_SEEDS):  # one search at the block level
                other = next(n for n in DEPTH_SEEDS if n in seeds)
                seeds[name], seed_records[name] = list(seeds[other]), {**seed_records[other], "same_as": other}
                continue
            genes, rec = greedy_seed(replay, adapter, units, groups, high, k, level, name,
                                     progress=lambda d, t, lab, n=name: report(f"seed {n}", d, t, lab))
            seeds[name], seed_records[name] = genes, rec
        if not seeds:
            seeds = random_seeds(units, groups, high, k, seed)
        state = None
        resume = _opt(config, "_resume_state")
        if resume is not None:
            state = EvolutionState.from_dict(resume) if isinstance(resume, dict) else resume

        parents: list[dict] = []

        def on_generation(s):
            if s.history and s.history[-1]["improved"]:
                parents.append({"generation": s.generation, "fitness": s.parent_fitness, "genes": list(s.parent)})
            report("evopress", s.generation, schedule.generations,
                   f"generation {s.generation}: KL {s.parent_fitness:.4g} ({s.parent_origin})")
            saver = _opt(config, "_on_generation")
            if saver is not None:
                saver(s)

        groups_present = [g for g in groups]
        final = evolve(seeds, fitness, schedule, groups_present, low, high, seed, state=state,
                       on_generation=on_generation)
        replay.release()
    search_s = time.perf_counter() - t0
    # install the winner with FinerCut's code
    chosen = [u for u, g in zip(units, final.parent) if g]
    for u in chosen:
        remove_sublayer(adapter, u.block, u.kind)
    done = finish_removal(job.model, adapter, level, {u.block for u in chosen})
    removed_params = sum(u.params for u in chosen)
    details = depth_details(
        level=level, units=units, genes=final.parent, k=k, num_blocks=num_blocks, block_params=block_params,
        model_params=model_params, removed_params=removed_params, done=done, state=final, schedule=schedule,
        seed_records=seed_records, fitness=fitness, removed_before=removed_before, remove=remove,
        remove_params=remove_params, top_k=top_k, seed=seed, calibration=data, parents=parents,
        seed_genes=seeds,
    )
    return MethodResult(
        method="evopress", config=config.model_dump(), details=details, structure=done.structure,
        form_reason=done.form_reason,
        timings={"search_s": round(search_s, 3), "evopress_s": round(time.perf_counter() - t0, 3)},
    )


def depth_details(*, level, units, genes, k, num_blocks, block_params, model_params, removed_params, done, state,
                  schedule, seed_records, fitness, removed_before, remove, remove_params, top_k, seed,
                  calibration, parents, seed_genes) -> dict:
    """The manifest's record: the genes, what went, the schedule, the fitness history, the seeds.

    ``per_layer`` has FinerCut's row form (one row per original block, ``attention`` / ``mlp`` set
    when removed — to ``1``, the search has no order —, ``new_index`` after renumbering), so
    ``inspect``'s table and ``inspect --plot`` read both methods alike."""
    new_of = {old: new for new, old in enumerate(done.kept_blocks)} if done.kept_blocks is not None else None
    rows = []
    for i in range(num_blocks):
        rows.append({"block": i, "attention": None, "mlp": None,
                     "new_index": i if new_of is None else new_of.get(i),
                     "removed_before": sorted(removed_before.get(i, []))})
    removed = []
    for u, g in zip(units, genes):
        if not g:
            continue
        removed.append({"block": u.block, "type": u.kind, "name": u.name, "params": u.params})
        for key in (("attention", "mlp") if u.kind == "block" else ("attention" if u.kind == "attn" else "mlp",)):
            rows[u.block][key] = 1
    fraction = removed_params / block_params if block_params else 0.0
    return {
        "search": "depth",
        "level": level,
        "units": [u.label() for u in units],
        "genes": [int(g) for g in genes],
        "removed_per_type": k,
        "removed": removed,
        "num_blocks": num_blocks,
        "attention_removed": sum(1 for r in rows if r["attention"] is not None),
        "mlp_removed": sum(1 for r in rows if r["mlp"] is not None),
        "blocks_deleted": 0 if done.kept_blocks is None else num_blocks - len(done.kept_blocks),
        "budget_rule": ("k = int(L·R) blocks" if level == "block" else "k = int(L·R) attention and k MLP sublayers "
                        "(the reference's equal split)") if remove is not None else
                       "k nearest --remove-params of the decoder blocks' parameters",
        "requested_remove": remove,
        "requested_param_fraction": remove_params,
        "removed_params": removed_params,
        "block_params": block_params,
        "param_fraction_blocks": fraction,
        "param_fraction_model": removed_params / model_params if model_params else 0.0,
        "per_layer": rows,
        "per_layer_config": done.per_layer_config,
        "schedule": {"name": schedule.name, "generations": schedule.generations, "offspring": schedule.offspring,
                     "stages": [{"tokens": s.tokens, "survivors": s.survivors,
                                 "tokens_scored": fitness.tokens_for(s.tokens)} for s in schedule.stages]},
        "fitness": "KL(dense ‖ candidate) per token, mean" + (f" (top-{top_k} form)" if top_k else ""),
        "top_k": top_k,
        "seed": seed,
        "final_fitness": state.parent_fitness,
        "seed_fitness": state.seed_fitness,
        "seed_winner": state.parent_origin,
        "seeds": seed_records,
        "history": state.history,
        # every improvement of the parent (generation, fitness, genes): how held-out quality tracks fitness
        "parents": [{"generation": 0, "fitness": state.seed_fitness.get(state.parent_origin), "origin": state.parent_origin,
                     "genes": seed_genes.get(state.parent_origin)}] + parents,
        "seed_genes": seed_genes,
        "generations_done": state.generation,
        "tokens_seen": state.tokens_seen,
        "calibration_tokens": fitness.available,
        "block_batch_runs": fitness.block_runs,
        "calibration_note": (f"{calibration.spec.nsamples} × {calibration.spec.seqlen} tokens from "
                             f"{calibration.spec.source!r} ({calibration.spec.format})") if calibration is not None else None,
    }
