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

Fitness: the sparsity search's (``search/fitness.KLFitness``: mean per-token KL(p_dense ‖ p_candidate)
through ``analysis.distances.token_kl``, full or the reference's top-K form, on a fresh random
minibatch of calibration sequences per stage and generation, candidates spread over torchrun ranks;
the result is the last parent or a seed, whichever has the lower KL on every calibration token). A candidate is evaluated by swapping
the removal stubs of ``depth/removal.sublayer_swaps`` into each block as it runs
(:func:`depth_installer`), replaying cached block inputs from the first block where it differs
from the current parent; the model is never re-loaded and never changed until the winner is
installed with the code FinerCut uses
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

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..depth.candidates import Candidate, build_candidates
from ..depth.finish import finish_removal
from ..depth.greedy import OutputScorer, StopRule, greedy_search
from ..depth.precision import float32_scoring
from ..depth.removal import remove_sublayer, removed_kinds, sublayer_swaps
from ..depth.report import block_params as param_basis
from ..engine.replay import BlockReplay, swapped
from ..errors import InputError
from ..methods.base import MethodResult
from ..models.placement import onload
from .evolution import EvolutionState, depth_schedule, evolve, final_selection
from .fitness import KLFitness

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
    (0 for a unit whose module name matches the ``keep`` regex, else 1). Sublayers an earlier stage
    removed are no genes."""
    import re

    if level not in LEVELS:
        raise InputError(f"--method evopress --level must be one of {', '.join(LEVELS)} for a depth search, got {level!r}")
    kinds = ("attn", "mlp") if level == "sublayer" else ("block",)
    units: list[Unit] = []
    groups: list[int] = []
    for g, kind in enumerate(kinds):
        for c in sorted(build_candidates(adapter, kind), key=lambda c: c.block):
            units.append(Unit(c.block, kind, c.name, c.params))
            groups.append(g)
    high = [1] * len(units)
    if keep:
        try:
            pattern = re.compile(keep)
        except re.error as exc:
            raise InputError(f"invalid --keep regex {keep!r}: {exc}") from None
        high = [0 if pattern.search(u.name) else 1 for u in units]
        if all(high):  # a typo would protect nothing, silently
            raise InputError(f"--keep {keep!r} matches no unit at --level {level}; their names look like "
                             f"{units[0].name} ... {units[-1].name}")
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


def depth_installer(adapter, units: list[Unit], device):
    """``installed(i, genes)`` for ``search.fitness.KLFitness``: block ``i`` on ``device`` with the
    removal stubs of the genes set in it swapped in (``genes`` None: the dense block); the original
    modules are back on exit. Only module objects move: no weight is read for a removed sublayer."""
    from contextlib import contextmanager

    by_block: dict[int, list[int]] = {}
    for j, u in enumerate(units):
        by_block.setdefault(u.block, []).append(j)

    @contextmanager
    def installed(i: int, genes):
        swaps: dict = {}
        if genes is not None:
            for j in by_block.get(i, []):
                if genes[j]:
                    swaps.update(sublayer_swaps(adapter, i, units[j].kind))
        with swapped(adapter.model, swaps), onload(adapter.block(i), device) as block:
            yield block

    return installed


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
    resume = _opt(config, "_resume_state")
    state = (EvolutionState.from_dict(resume) if isinstance(resume, dict) else resume) if resume is not None else None
    saver = _opt(config, "_on_generation")
    parents: list[dict] = []
    seeds: dict[str, list[int]] = {}
    seed_records: dict[str, dict] = {}

    def on_generation(s):
        if s.history and s.history[-1]["improved"]:
            parents.append({"generation": s.generation, "fitness": s.parent_fitness, "genes": list(s.parent)})
        report("evopress", s.generation, schedule.generations,
               f"generation {s.generation}: KL {s.parent_fitness:.4g} (line of {s.parent_origin})")
        if saver is not None:
            saver(s, schedule.generations)

    with float32_scoring(adapter, enabled=_opt(config, "score_dtype", "float32") == "float32"):
        if state is None and seeds_named:
            # the greedy heuristics score on the calibration samples of the last stage (the search's own)
            ids, mask = seed_tokens(data, schedule.max_tokens)
            replay = BlockReplay(adapter, ids, mask, device=job.device, batch_size=job.batch_size).capture()
            for name in seeds_named:
                if level == "block" and any(n in seeds for n in DEPTH_SEEDS):  # one search at the block level
                    other = next(n for n in DEPTH_SEEDS if n in seeds)
                    seeds[name], seed_records[name] = list(seeds[other]), {**seed_records[other], "same_as": other}
                    continue
                genes, rec = greedy_seed(replay, adapter, units, groups, high, k, level, name,
                                         progress=lambda d, t, lab, n=name: report(f"seed {n}", d, t, lab))
                seeds[name], seed_records[name] = genes, rec
            replay.release()
            del replay
        if state is None and not seeds:
            seeds = random_seeds(units, groups, high, k, seed)
        fitness = KLFitness(adapter, depth_installer(adapter, units, job.device), [u.block for u in units],
                            data.input_ids, data.attention_mask, [st.tokens for st in schedule.stages],
                            device=job.device, batch_size=job.batch_size, top_k=top_k, seed=seed,
                            progress=lambda label, d, t, lab: report(label, d, t, lab))
        if state is None:  # the seeds scored, the first parent chosen, saved before generation 1
            state = evolve(seeds, fitness, schedule.with_overrides(generations=0), groups, low, high, seed)
            if saver is not None:
                saver(state, schedule.generations)
        resumed_from = state.generation if resume is not None else None
        parents.append({"generation": state.generation, "fitness": state.parent_fitness, "origin": state.parent_origin,
                        "genes": list(state.parent)})
        final = evolve(seeds or {"resumed": state.parent}, fitness, schedule, groups, low, high, seed, state=state,
                       on_generation=on_generation)
        # the last parent against the seeds on every calibration token (evolution.final_selection)
        report("evopress", schedule.generations, schedule.generations, "final comparison on all calibration tokens")
        genes, choice, pool_fitness = final_selection(final, seeds or {}, fitness)
        fitness.release()
    search_s = time.perf_counter() - t0
    # the winner, installed with FinerCut's code
    chosen = [u for u, g in zip(units, genes) if g]
    for u in chosen:
        remove_sublayer(adapter, u.block, u.kind)
    done = finish_removal(job.model, adapter, level, {u.block for u in chosen})
    details = depth_details(
        level=level, units=units, genes=genes, k=k, num_blocks=num_blocks, block_params=block_params,
        model_params=model_params, removed_params=sum(u.params for u in chosen), done=done, state=final,
        schedule=schedule, seed_records=seed_records, fitness=fitness, removed_before=removed_before, remove=remove,
        remove_params=remove_params, seed=seed, calibration=data, parents=parents, seed_genes=seeds,
        resumed_from=resumed_from, choice=choice, pool_fitness=pool_fitness,
    )
    return MethodResult(
        method="evopress", config=config.model_dump(), details=details, structure=done.structure,
        form_reason=done.form_reason,
        timings={"search_s": round(search_s, 3), "fitness_s": round(fitness.seconds, 3),
                 "evopress_s": round(time.perf_counter() - t0, 3)},
    )


def seed_tokens(data, tokens: int):
    """The calibration samples (whole) holding the first ``tokens`` tokens: what the greedy seeds score on."""
    nsamples, seqlen = data.input_ids.shape
    n = min(nsamples, max(1, -(-int(tokens) // seqlen)))
    mask = None if data.attention_mask is None else data.attention_mask[:n]
    return data.input_ids[:n], mask


def depth_details(*, level, units, genes, k, num_blocks, block_params, model_params, removed_params, done, state,
                  schedule, seed_records, fitness, removed_before, remove, remove_params, seed,
                  calibration, parents, seed_genes, resumed_from, choice, pool_fitness) -> dict:
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
                     "stages": [{"tokens": s.tokens, "survivors": s.survivors, "tokens_scored": s.tokens}
                                for s in schedule.stages],
                     "draws": "a fresh random minibatch per stage and generation (the reference's selection)"},
        "fitness": "mean per-token KL(dense ‖ candidate), last position of each sequence excluded (search/fitness.py)",
        "kl": "full" if not fitness.top_k else f"top-{fitness.top_k}",
        "seed": seed,
        # the result's KL on every calibration token, beside the seeds' (evolution.final_selection)
        "final_fitness": pool_fitness[choice],
        "final_choice": choice,
        "pool_fitness": pool_fitness,
        "pool_tokens": int(calibration.input_ids.numel()) if calibration is not None else None,
        "last_draw_fitness": state.parent_fitness,
        "seed_fitness": state.seed_fitness,
        "seed_winner": state.parent_origin,
        "seeds": seed_records,
        "history": state.history,
        # the first parent and every improvement (generation, fitness, genes): how held-out quality tracks
        # fitness (from the resumed generation on after --resume)
        "parents": parents,
        "seed_genes": seed_genes,
        "resumed_from_generation": resumed_from,
        "generations_done": state.generation,
        "tokens_seen": state.tokens_seen,
        "block_runs": fitness.block_runs,
        "calibration_note": (f"{calibration.spec.nsamples} × {calibration.spec.seqlen} tokens from "
                             f"{calibration.spec.source!r} ({calibration.spec.format})") if calibration is not None else None,
    }
