"""EvoPress (Sieberling, Kuznedelev, Kurtic, Alistarh; ICML 2025) — methods.md §14.

Per-unit compression levels chosen by a measured search: an elitist (1+λ) evolution over level
vectors (``search/evolution.py``) whose fitness is the KL divergence between the dense model's and
the candidate's next-token distributions on calibration tokens (``search/fitness.py``): a fresh
random minibatch per selection stage and generation, as the reference; the result is the last
parent or a seed, whichever has the lower KL on every calibration token.

``--level matrix`` (default): every targeted linear gets a sparsity level from a database of that
matrix pruned at every level by ``--pruner`` (``search/database.py``, built by one sequential pass
of our engine, cached under ``~/.cache/compresskit/evopress/<key>/`` and reused by later searches;
``--rebuild-database`` rebuilds it, ``--delete-database`` removes it after the run). Level steps
change every matrix's zeros by the same count, so ``--sparsity`` (the parameter-weighted mean) is
met exactly. ``--seed-from uniform,owl,alphapruning`` puts those heuristics' allocations, turned
into level vectors with the exact budget, into the first population.

``--level sublayer|block``: which attention / MLP sublayers (or whole blocks) go, ``--remove`` of
them (``search/depth.py``).

The search state is saved every generation under ``<out>.search-state/``; ``--resume`` continues
it; Ctrl-C writes no checkpoint and keeps the database and the state.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Literal

from pydantic import Field, field_validator, model_validator

from ..errors import InputError
from .base import MethodResult, PruneJob, register
from .alphapruning import AlphaConfig
from .owl import OWLConfig
from .removal_target import RemovalTargetConfig

SPARSITY_SEEDS = ("uniform", "owl", "alphapruning")
DEPTH_SEEDS = ("finercut", "block-greedy")


def _int_list(value: str | None, flag: str) -> list[int] | None:
    if value is None:
        return None
    try:
        items = [int(v) for v in str(value).split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated integers, e.g. 2048,16384,65536; got {value!r}") from None
    if not items or any(v < 1 for v in items):
        raise ValueError(f"{flag} takes integers >= 1, got {value!r}")
    return items


class EvoPressConfig(RemovalTargetConfig):
    level: Literal["matrix", "sublayer", "block"] = Field(
        "matrix", json_schema_extra={"flag": "--level"},
        description="Units of the search: matrix (a sparsity level per linear, with --sparsity/--pruner), sublayer "
                    "(which attention/MLP sublayers go) or block (whole blocks), with --remove.",
    )
    seed_from: str | None = Field(
        None, json_schema_extra={"flag": "--seed-from"},
        description="evopress: heuristics whose allocations join the first population, comma-separated: "
                    "uniform, owl, alphapruning (--level matrix; default uniform, the reference's start) or "
                    "finercut, block-greedy (--level sublayer|block).",
    )
    owl_m: float | None = Field(
        None, gt=0, json_schema_extra={"flag": "--owl-m"},
        description="M of the owl seed (default: --method owl's, 5).",
    )
    owl_lambda: float | None = Field(
        None, ge=0, json_schema_extra={"flag": "--owl-lambda"},
        description="λ of the owl seed (default: --method owl's, 0.08).",
    )
    alpha_epsilon: float | None = Field(
        None, ge=0, lt=1, json_schema_extra={"flag": "--alpha-epsilon"},
        description="ε of the alphapruning seed (default: --method alphapruning's, 0.3; lowered to "
                    "the largest feasible one when some block would reach a ratio >= 1).",
    )
    schedule: Literal["auto", "fast", "paper"] = Field(
        "auto", json_schema_extra={"flag": "--schedule"},
        description="evopress: paper (the reference's scripts: 400 generations, 64 offspring, survivors 8-2-1 on "
                    "2048-16384-65536 tokens) or fast (30 generations, 8 offspring, 2-1 on 256-1024 tokens: SmolLM2-135M "
                    "on a 2-core CPU within the hour); auto: paper on CUDA, fast on CPU.",
    )
    generations: int | None = Field(None, ge=0, json_schema_extra={"flag": "--generations"},
                                    description="evopress: generations (overrides the schedule's).")
    offspring: int | None = Field(None, ge=1, json_schema_extra={"flag": "--offspring"},
                                  description="evopress: offspring per generation (overrides the schedule's).")
    tokens: str | None = Field(
        None, json_schema_extra={"flag": "--tokens"},
        description="evopress: calibration tokens per selection stage, comma-separated (e.g. 2048,16384,65536).",
    )
    survivors: str | None = Field(
        None, json_schema_extra={"flag": "--survivors"},
        description="evopress: survivors per selection stage, comma-separated, ending in 1 (e.g. 8,2,1).",
    )
    top_k: int | None = Field(
        None, ge=0, json_schema_extra={"flag": "--kl-top-k"},
        description="evopress: KL over the dense model's top-K logits (reference: K >= 512 works as well as the "
                    "full KL); 0 = full KL; default: full KL when the dense logits of all stages fit in 1 GiB, else 1024.",
    )
    seed: int = Field(0, json_schema_extra={"flag": "--search-seed"},
                      description="evopress: random seed of the mutations (the search is deterministic under it).")
    resume: bool = Field(
        False, json_schema_extra={"flag": "--resume"},
        description="evopress: continue the search saved under <out>.search-state/ (same settings; --generations may grow).",
    )
    levels: int = Field(8, ge=1, le=127, json_schema_extra={"flag": "--levels"},
                        description="evopress: sparsity levels on each side of --sparsity per matrix (reference 8).")
    level_step: int | None = Field(
        None, ge=1, json_schema_extra={"flag": "--level-step"},
        description="evopress: zeros added per level in every matrix (reference: int(0.5·min(S,1-S)/levels·hidden²)).",
    )
    database_dtype: Literal["auto", "model", "bfloat16"] = Field(
        "auto", json_schema_extra={"flag": "--database-dtype"},
        description="evopress, --pruner sparsegpt: dtype of the stored level weights. model: the model's; bfloat16: "
                    "half the disk of a float32 model (bfloat16 rounding of the updated weights, which the search then "
                    "scores and the output holds); auto: the model's when it is 16-bit, else bfloat16.",
    )
    database_inputs: Literal["uniform", "dense"] = Field(
        "uniform", json_schema_extra={"flag": "--database-inputs"},
        description="evopress, --level matrix: the activations the level database's statistics see. uniform: "
                    "those of the model whose earlier blocks are at --sparsity (sequential, as --method wanda / "
                    "sparsegpt prune, so the uniform seed is exactly their result); dense: the dense model's "
                    "(the reference's database).",
    )
    rebuild_database: bool = Field(
        False, json_schema_extra={"flag": "--rebuild-database"},
        description="evopress: delete and rebuild the level database (~/.cache/compresskit/evopress/<key>/).",
    )
    delete_database: bool = Field(
        False, json_schema_extra={"flag": "--delete-database"},
        description="evopress: delete the level database after the run (default: keep it for later searches).",
    )

    @field_validator("tokens", "survivors")
    @classmethod
    def _lists(cls, value, info):
        _int_list(value, "--" + info.field_name)
        return value

    @model_validator(mode="after")
    def _consistent(self):
        names = [v.strip() for v in (self.seed_from or "").split(",") if v.strip()]
        allowed = SPARSITY_SEEDS if self.level == "matrix" else DEPTH_SEEDS
        for name in names:
            if name not in allowed:
                raise ValueError(f"unknown --seed-from {name!r} for --level {self.level}; choose from: "
                                 f"{', '.join(allowed)}")
        for value, flag, seed in ((self.owl_m, "--owl-m", "owl"), (self.owl_lambda, "--owl-lambda", "owl"),
                                  (self.alpha_epsilon, "--alpha-epsilon", "alphapruning")):
            if value is not None and seed not in names:
                raise ValueError(f"{flag} sets the {seed} seed of --method evopress; add {seed} to --seed-from "
                                 f"(--level matrix)")
        if self.level == "matrix":
            for value, flag in ((self.remove, "--remove"), (self.remove_params, "--remove-params"), (self.keep, "--keep")):
                if value is not None:
                    raise ValueError(f"{flag} applies to --level sublayer|block; --level matrix takes --sparsity")
        elif self.remove is None and self.remove_params is None:
            raise ValueError(f"--level {self.level} needs --remove R (a fraction in (0, 1))")
        tokens, survivors = _int_list(self.tokens, "--tokens"), _int_list(self.survivors, "--survivors")
        if survivors is not None and survivors[-1] != 1:
            raise ValueError("--survivors must end with 1 (the last stage keeps one candidate)")
        if tokens is not None and survivors is not None and len(tokens) != len(survivors):
            raise ValueError(f"--tokens has {len(tokens)} stages, --survivors {len(survivors)}: give one entry per stage")
        return self

    # --- read by methods/base.check_prune_options
    @property
    def prune_kind(self) -> str:
        return "sparsity" if self.level == "matrix" else "structural"

    @property
    def kind_label(self) -> str:
        return f"evopress --level {self.level}"

    def check_target(self, sparsity: float | None, pattern) -> None:
        if self.level != "matrix":
            return
        if pattern.kind != "unstructured":
            raise InputError(f"--method evopress searches unstructured sparsity levels; an N:M --pattern ({pattern}) "
                             "fixes every matrix's sparsity at N/M (per-block N:M: --method owl)")
        if sparsity is None or not 0.0 < sparsity < 1.0:
            raise InputError(f"--method evopress needs --sparsity in (0, 1) (levels spread on both sides of it), got {sparsity}")

    def seeds(self) -> list[str]:
        names = [v.strip() for v in (self.seed_from or "").split(",") if v.strip()]
        return list(dict.fromkeys(names)) or (["uniform"] if self.level == "matrix" else [])


class _DepthView:
    """The config as ``search.depth.run_depth_search`` reads it: the resolved schedule and the
    search-state hooks (``_state_path``, ``_resume_state``, ``_on_generation``) of this method."""

    def __init__(self, config: EvoPressConfig, **extra):
        self._config = config
        self.__dict__.update(extra)

    def __getattr__(self, name):
        return getattr(self._config, name)

    def model_dump(self):
        return self._config.model_dump()


def _resolve_schedule_name(config: EvoPressConfig, job: PruneJob) -> str:
    if config.schedule != "auto":
        return config.schedule
    return "paper" if str(job.device).startswith("cuda") else "fast"


def _state_dir(job: PruneJob):
    out = getattr(job, "out", None)
    if out is None:
        return None
    from ..search.state import state_dir_for

    return state_dir_for(out)


def load_or_refuse(config: EvoPressConfig, directory, key: dict):
    """The state to resume from (``--resume``), None for a fresh start; a fresh start over an
    unfinished state is refused (it would be overwritten); a finished one is replaced."""
    from ..search.state import load_search_state, unfinished_search

    if directory is None:
        if config.resume:
            raise InputError("--resume needs --out (the search state lives beside the output)")
        return None
    if config.resume:
        state = load_search_state(directory, key)
        if state is None:
            raise InputError(f"--resume: no search state in {directory}; run without --resume to start one")
        return state
    if unfinished_search(directory):
        raise InputError(f"{directory} holds an unfinished search: pass --resume to continue it, "
                         "or delete that folder to start over")
    return None


def run_evopress(job: PruneJob, config: EvoPressConfig) -> MethodResult:
    if config.level != "matrix":
        return _run_depth(job, config)
    return run_sparsity_search(job, config)


def _run_depth(job: PruneJob, config: EvoPressConfig) -> MethodResult:
    try:
        from ..search.depth import run_depth_search
    except ImportError:
        raise InputError(f"--method evopress --level {config.level} is not available in this build") from None
    from ..engine import distributed
    from ..search.state import save_search_state

    directory = _state_dir(job)
    key = {"level": config.level, "remove": config.remove, "remove_params": config.remove_params,
           "keep": config.keep, "seeds": config.seeds(), "search_seed": config.seed,
           "schedule": _resolve_schedule_name(config, job), "offspring": config.offspring,
           "tokens": config.tokens, "survivors": config.survivors, "kl_top_k": config.top_k,
           "model": str(getattr(job.model.config, "_name_or_path", "")), "blocks": job.adapter.num_blocks}
    state = load_or_refuse(config, directory, key)

    def save(s, generations: int | None = None):
        # ``generations``: the resolved schedule's total, which marks a finished search (a fresh run may
        # then replace it); unknown, the state counts as unfinished and a fresh run asks for --resume
        if directory is not None and distributed.is_writer():
            save_search_state(directory, key, s, generations if generations is not None else 10**9)

    view = _DepthView(config, schedule=_resolve_schedule_name(config, job), seed_from=",".join(config.seeds()) or None,
                      _state_path=directory, _resume_state=state, _on_generation=save)
    return run_depth_search(job, view)


def _needs_calibration(job: PruneJob, config) -> bool:
    return True  # the fitness measures the model on calibration tokens, whatever the pruner


register(
    "evopress", EvoPressConfig,
    "EvoPress: per-matrix sparsity levels (or removed sublayers/blocks) chosen by evolutionary search on KL to the dense model",
    needs_calibration=_needs_calibration,
)(run_evopress)


@contextmanager
def block_scope(job: PruneJob, i: int):
    """Block ``i`` on the compute device with its targeted linears (fused experts per expert)."""
    from ..models.placement import onload
    from .sparsify import expert_scope, target_linears

    block = job.adapter.block(i)
    with onload(block, job.device), expert_scope(job, i):
        yield block, target_linears(job, i)


# ---------------------------------------------------------------------------------------- sparsity
#: OWL's defaults (its method's --owl-m, --owl-lambda), the seed's unless evopress is given its own
OWL_SEED_M, OWL_SEED_LAMBDA = OWLConfig.model_fields["owl_m"].default, OWLConfig.model_fields["owl_lambda"].default


def _owl_ratios(job: PruneJob, units, sparsity: float, m: float = OWL_SEED_M,
                lam: float = OWL_SEED_LAMBDA) -> list[float]:
    """OWL's block sparsities (outlier ratio at M, spread λ; its method's defaults 5 and 0.08) for
    every unit of the block."""
    from ..allocation.owl import allocate_owl, block_outlier_ratio
    from .sparsify import collect_block_statistics

    def reduce(i, linears, stats):
        names = [k for k in linears if k in stats]
        return block_outlier_ratio([linears[k].weight for k in names], [stats[k] for k in names], m) if names else None

    D = collect_block_statistics(job, reduce, needs="sq_norm")
    blocks = sorted({u.block for u in units})
    sizes = {b: sum(u.numel for u in units if u.block == b) for b in blocks}
    active = [b for b in blocks if D[b] is not None]
    alloc = dict(zip(active, allocate_owl([D[b] for b in active], sparsity, lam, [sizes[b] for b in active])))
    return [alloc.get(u.block, sparsity) for u in units]


#: AlphaPruning's default ε (its method's --alpha-epsilon); the seed lowers it only when it is infeasible
ALPHA_SEED_EPSILON = AlphaConfig.model_fields["alpha_epsilon"].default


def _alpha_ratios(job: PruneJob, units, sparsity: float,
                  epsilon: float = ALPHA_SEED_EPSILON) -> tuple[list[float], float]:
    """AlphaPruning's per-matrix sparsities (alpha_peak, block_wise, ε: its method's defaults unless
    ``--alpha-epsilon`` is given) and the ε used. At high sparsity ε = 0.3 can ask a block for a ratio ≥ 1 (SmolLM2-135M at 70 %:
    range 0.55..1.02), which ``--method alphapruning`` refuses; as a seed the allocation then uses
    the largest ε' ≤ ε whose ratios stay in [0, 1) (bisection, 1e-4), recorded in the manifest."""
    from ..allocation.alpha import esd_metric, feasible_alpha_allocation
    from ..analysis.spectra import model_singular_values, weights_fingerprint
    from .sparsify import onloaded_weights

    key = weights_fingerprint(onloaded_weights(job, "cpu"))
    sigma = model_singular_values(onloaded_weights(job), cache_key=key, device=job.device, progress=job.progress is None)
    alphas = [esd_metric(sigma[u.name].double() ** 2, "alpha_peak") for u in units]
    return feasible_alpha_allocation(alphas, [u.block for u in units], [u.numel for u in units], sparsity,
                                     epsilon)


def _schedule(config: EvoPressConfig, name: str):
    from ..search.evolution import sparsity_schedule

    base = sparsity_schedule(name)
    tokens, survivors = _int_list(config.tokens, "--tokens"), _int_list(config.survivors, "--survivors")
    if tokens is not None and survivors is None and len(tokens) != len(base.stages):
        survivors = [1] if len(tokens) == 1 else [max(1, 2 ** (2 * (len(tokens) - 1 - i) - 1)) for i in range(len(tokens) - 1)] + [1]
    if survivors is not None and tokens is None and len(survivors) != len(base.stages):
        raise InputError(f"--survivors has {len(survivors)} stages, the {name} schedule {len(base.stages)}: give --tokens too")
    try:
        return base.with_overrides(config.generations, config.offspring, tokens, survivors)
    except ValueError as exc:
        raise InputError(f"--method evopress: {exc}") from None


def run_sparsity_search(job: PruneJob, config: EvoPressConfig) -> MethodResult:
    import time

    from ..analysis.spectra import weights_fingerprint
    from ..engine import distributed
    from ..search.database import FORMAT_VERSION, LevelDatabase
    from ..search.evolution import evolve, final_selection
    from ..search.fitness import KLFitness, draw_sequences
    from ..search.levels import LevelPlan, default_level_step
    from ..search.sparsity import LevelModel, build_database, list_units
    from ..search.state import save_search_state
    from .sparsify import expert_scope, collect_block_statistics, onloaded_weights, target_linears

    t0 = time.perf_counter()
    adapter, sparsity = job.adapter, float(job.sparsity)
    config.check_target(job.sparsity, job.pattern)
    schedule_name = _resolve_schedule_name(config, job)
    schedule = _schedule(config, schedule_name)

    @contextmanager
    def linears_of(i):
        with expert_scope(job, i):
            yield target_linears(job, i)

    units = list_units(adapter, linears_of)
    if not units:
        raise InputError("no decoder linear is left to prune after --include/--exclude")
    hidden = adapter.model.get_input_embeddings().weight.shape[-1]
    step = config.level_step or default_level_step(sparsity, config.levels, hidden)
    if step < 1:
        raise InputError(f"--sparsity {sparsity:g} with --levels {config.levels} gives a level step of 0 zeros "
                         f"(hidden size {hidden}); pass --level-step N")
    plan = LevelPlan.build([u.numel for u in units], sparsity, config.levels, step)
    if plan.movable() < 2:
        raise InputError(f"a level step of {step} zeros leaves {plan.movable()} matrix with more than one level "
                         f"(the smallest holds {min(plan.numels)} weights at sparsity {sparsity:g}): lower --level-step")

    data = job.calibration_data()
    nsamples, seqlen = data.input_ids.shape
    for stage in schedule.stages:  # before the database pass, which may take long
        draw_sequences(stage.tokens, nsamples, seqlen, config.seed, (0, 0))

    def report(phase, done, total, label=""):
        if job.progress is not None:
            job.progress(phase, done, total, label)

    # ---- the level database (reused by key)
    report("fingerprint", 0, 1, "model weights")
    fingerprint = weights_fingerprint(onloaded_weights(job, "cpu"))
    dtype = str(adapter.model.get_input_embeddings().weight.dtype).removeprefix("torch.")
    values_dtype = None
    if job.pruner == "sparsegpt" and config.database_dtype != "model":
        values_dtype = "bfloat16" if config.database_dtype == "bfloat16" or dtype == "float32" else None
    key = {"format": FORMAT_VERSION, "weights": fingerprint, "dtype": dtype, "pruner": job.pruner,
           "pruner_options": dict(sorted(job.pruner_options.items())), "sparsity": sparsity,
           "levels": config.levels, "level_step": step,
           "units": [[u.name, list(u.shape)] for u in units],
           "calibration": None if job.pruner == "magnitude" else {**job.calibration.to_dict(), "hash": data.hash}}
    if values_dtype is not None:  # (absent otherwise: the keys of databases stored in the model's dtype stay as they were)
        key["values_dtype"] = values_dtype
    if job.pruner != "magnitude" and config.database_inputs == "uniform":  # (absent: the dense-input key as before)
        key["inputs"] = "uniform"
    db = LevelDatabase(key)
    if config.rebuild_database and distributed.is_writer():
        db.delete()
    distributed.barrier()
    reused = db.complete
    t_db = time.perf_counter()
    fallback: list[str] = []
    if not reused:
        meta = build_database(db, plan, units, job.pruner, job.pruner_options, lambda i: block_scope(job, i),
                              lambda reduce, needs, propagate: collect_block_statistics(job, reduce, needs, propagate),
                              write=distributed.is_writer(), inputs=config.database_inputs, progress=report)
        fallback = list(meta.get("magnitude_fallback", []))
        distributed.barrier()
        if not db.complete:
            raise RuntimeError(f"the level database {db.path} was not completed")
    db_s = time.perf_counter() - t_db
    stored = {u["name"]: u["zeros"] for u in db.meta["units"]}

    # ---- fitness, seeds, state
    model = LevelModel(adapter, units, plan, db, lambda i: block_scope(job, i))
    fitness = KLFitness(adapter, model.installed, [u.block for u in units], data.input_ids, data.attention_mask,
                        [s.tokens for s in schedule.stages], device=job.device, batch_size=job.batch_size,
                        top_k=config.top_k, seed=config.seed, progress=report)
    seed_names = config.seeds()
    seed_vectors: dict[str, list[int]] = {}
    seed_settings: dict[str, dict] = {}
    for name in seed_names:
        if name == "uniform":
            seed_vectors[name] = [0] * len(units)
        elif name == "owl":
            m = OWL_SEED_M if config.owl_m is None else config.owl_m
            lam = OWL_SEED_LAMBDA if config.owl_lambda is None else config.owl_lambda
            seed_vectors[name] = plan.from_ratios(_owl_ratios(job, units, sparsity, m, lam))
            seed_settings[name] = {"owl_m": m, "owl_lambda": lam}
        else:
            asked = ALPHA_SEED_EPSILON if config.alpha_epsilon is None else config.alpha_epsilon
            ratios, alpha_epsilon = _alpha_ratios(job, units, sparsity, asked)
            seed_vectors[name] = plan.from_ratios(ratios)
            seed_settings[name] = {"alpha_epsilon": round(alpha_epsilon, 4),
                                   "alpha_epsilon_lowered": alpha_epsilon < asked}
    directory = _state_dir(job)
    state_key = {"database": db.digest, "seeds": seed_names, "seed_levels": {k: v for k, v in seed_vectors.items()},
                 "search_seed": config.seed, "offspring": schedule.offspring,
                 "stages": [[s.tokens, s.survivors] for s in schedule.stages], "kl_top_k": fitness.top_k,
                 "calibration": data.hash}
    state = load_or_refuse(config, directory, state_key)
    resumed_from = state.generation if state is not None else None

    def on_generation(s):
        if distributed.is_writer() and directory is not None:
            save_search_state(directory, state_key, s, schedule.generations)
        report("evopress", s.generation, schedule.generations,
               f"generation {s.generation}: KL {s.parent_fitness:.4g} ({s.parent_origin})")

    groups, low, high = [0] * len(units), list(plan.low), list(plan.high)
    if state is None:
        # seeds are scored first; the best is the first parent
        state0 = evolve(seed_vectors, fitness, schedule.with_overrides(generations=0), groups, low, high, config.seed)
        if distributed.is_writer() and directory is not None:
            save_search_state(directory, state_key, state0, schedule.generations)
        state = state0
    report("evopress", state.generation, schedule.generations, f"KL {state.parent_fitness:.4g} ({state.parent_origin})")
    final = evolve(seed_vectors, fitness, schedule, groups, low, high, config.seed, state=state,
                   on_generation=on_generation)
    # the last parent against the seeds on every calibration token (evolution.final_selection)
    report("evopress", schedule.generations, schedule.generations, "final comparison on all calibration tokens")
    levels, chosen, pool_fitness = final_selection(final, seed_vectors, fitness)
    search_s = time.perf_counter() - t0

    # ---- the winner into the model
    fitness.release()
    model.apply(levels, progress=report)
    if config.delete_database and distributed.is_writer():
        db.delete()
    distributed.barrier()

    zeros = [stored[u.name][lv - plan.low[k]] for k, (u, lv) in enumerate(zip(units, levels))]
    n = adapter.num_blocks
    block_ratios = []
    for b in range(n):
        num = sum(z for z, u in zip(zeros, units) if u.block == b)
        den = sum(u.numel for u in units if u.block == b)
        block_ratios.append(num / den if den else 0.0)
    details = {
        "level": "matrix",
        "levels_per_matrix": {u.name: lv for u, lv in zip(units, levels)},
        "sparsity_per_matrix": {u.name: z / u.numel for u, z in zip(units, zeros)},
        "level_range": {u.name: [lo, hi] for u, lo, hi in zip(units, plan.low, plan.high)},
        "levels": config.levels,
        "level_step": step,
        "target_zeros": sum(plan.base),
        "achieved_zeros": sum(zeros),
        "achieved_sparsity": sum(zeros) / sum(plan.numels),
        "schedule": {"name": schedule_name, "generations": schedule.generations, "offspring": schedule.offspring,
                     "stages": [{"tokens": s.tokens, "survivors": s.survivors, "tokens_scored": s.tokens}
                                for s in schedule.stages],
                     "draws": "a fresh random minibatch per stage and generation (the reference's selection)"},
        "kl": "full" if not fitness.top_k else f"top-{fitness.top_k}",
        "search_seed": config.seed,
        "seeds": seed_names,
        "seed_settings": seed_settings,
        "seed_fitness": final.seed_fitness,
        "seed_winner": final.parent_origin,
        # the result's KL on every calibration token, beside the seeds' (evolution.final_selection)
        "final_fitness": pool_fitness[chosen],
        "final_choice": chosen,
        "pool_fitness": pool_fitness,
        "pool_tokens": int(data.input_ids.numel()),
        "last_draw_fitness": final.parent_fitness,
        "fitness_history": final.history,
        "tokens_seen": final.tokens_seen,
        "resumed_from_generation": resumed_from,
        "database": {"key": db.digest, "path": str(db.path), "bytes": db.meta.get("bytes"), "reused": reused,
                     "build_s": db.meta.get("build_s"), "kind": db.kind, "deleted": bool(config.delete_database),
                     "values_dtype": values_dtype or (dtype if db.kind == "weights" else None),
                     "inputs": "dense" if job.pruner == "magnitude" else config.database_inputs},
        "magnitude_fallback": fallback,
        "block_runs": fitness.block_runs,
    }
    return MethodResult(
        method="evopress", config=config.model_dump(), block_ratios=block_ratios, details=details,
        timings={"database_s": round(db_s, 3), "fitness_s": round(fitness.seconds, 3), "search_s": round(search_s, 3)},
    )
