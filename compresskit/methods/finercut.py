"""FinerCut — fine-grained interpretable layer pruning (Zhang et al., 2024, arXiv 2405.18218).

methods.md §8. Candidates are the 2L attention and MLP / MoE sublayers (``--level``: also whole
blocks, attention only, MLP only); a greedy loop removes, one at a time, the candidate whose
removal moves the model's next-token distributions least from the unpruned model's (JS
divergence in the reference's code form by default), re-scoring after every removal, until
``--remove`` of the candidates are gone (or the removal count whose parameters are nearest
``--remove-params`` of the blocks' parameters: ``depth/greedy.StopRule``).
The search runs in float32 as the reference does (``--score-dtype model`` to skip the cast).

Removed sublayers are physically gone (``depth/removal.py``); blocks left without both sublayers
are deleted and the rest renumbered, so a result made only of whole blocks is a stock
checkpoint (``depth/blocks.py``). Calibration defaults are the paper's: the *first* 10 × 256
tokens of the WikiText-2 train stream (empty lines dropped, the rest joined with " "), the
loader's ``prefix`` format; ``--calib-format window`` draws random windows instead.
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import Field, model_validator

from ..errors import InputError
from .base import MethodResult, PruneJob, register
from .removal_target import RemovalTargetConfig

#: The paper's calibration (methods.md §8.2): the first 10 × 256 tokens of WikiText-2 train.
CALIBRATION_DEFAULTS = {"source": "wikitext2", "format": "prefix", "nsamples": 10, "seqlen": 256}


class FinerCutConfig(RemovalTargetConfig):
    level: Literal["sublayer", "block", "attn", "mlp"] = Field(
        "sublayer", json_schema_extra={"flag": "--level"},
        description="Candidates: sublayer (attention + MLP/MoE, 2L), block (whole blocks), attn, mlp.",
    )
    distance: Literal["js", "angular", "kl", "norm"] = Field(
        "js", json_schema_extra={"flag": "--distance"},
        description="Distance between the unpruned and pruned vocabulary distributions.",
    )
    js_form: Literal["code", "textbook"] = Field(
        "code", json_schema_extra={"flag": "--js-form"},
        description="JS as the reference code computes it, ½[KL(m‖p)+KL(m‖q)]/vocab, or the textbook ½[KL(p‖m)+KL(q‖m)].",
    )
    exclude_front: float = Field(
        0.0, ge=0, lt=1, json_schema_extra={"flag": "--exclude-front"},
        description="Withhold the first int(2L·x/2)+1 blocks until int(N·x)+1 candidates are removed (reference -x; README: 0.4).",
    )
    one_shot: bool = Field(
        False, json_schema_extra={"flag": "--one-shot"},
        description="Ablation: score every candidate once on the unpruned model and remove in that order.",
    )
    prefix_cache: bool = Field(
        True, json_schema_extra={"flag": "--prefix-cache"},
        description="Replay each candidate from its own block using cached block inputs (--no-prefix-cache: from block 0).",
    )

    @model_validator(mode="after")
    def _one_target(self):
        if (self.remove is None) == (self.remove_params is None):
            raise ValueError("--method finercut needs exactly one of --remove R or --remove-params P, each in (0, 1)")
        return self


def _stop_rule(job: PruneJob, config: FinerCutConfig, candidates, num_level_candidates: int, block_params: int) -> StopRule:
    from ..depth.candidates import target_count
    from ..depth.greedy import StopRule

    if config.remove is not None:
        count = target_count(num_level_candidates, config.remove)
        if count < 1:
            raise InputError(f"--remove {config.remove:g} removes nothing: there are {num_level_candidates} candidates "
                             f"at --level {config.level} (the smallest useful value is {1 / num_level_candidates:.3g})")
        if count > len(candidates):
            raise InputError(f"--remove {config.remove:g} needs {count} removals but only {len(candidates)} candidates "
                             f"are left after --keep")
        return StopRule(count=count)
    params = int(round(config.remove_params * block_params))
    if sum(c.params for c in candidates) < params:
        raise InputError(f"--remove-params {config.remove_params:g} asks for more parameters than the candidates hold")
    return StopRule(params=max(params, 1))


def run_finercut(job: PruneJob, config: FinerCutConfig) -> MethodResult:
    from ..depth.candidates import build_candidates
    from ..depth.finish import finish_removal
    from ..depth.greedy import OutputScorer, greedy_search
    from ..depth.precision import float32_scoring
    from ..depth.removal import remove_sublayer, removed_kinds, sublayer_swaps
    from ..depth.report import block_params as param_basis, removal_details
    from ..engine.replay import BlockReplay

    adapter = job.adapter
    t0 = time.perf_counter()
    num_level_candidates = len(build_candidates(adapter, config.level))
    removed_before = {i: kinds for i in range(adapter.num_blocks) if (kinds := removed_kinds(adapter, i))}  # earlier stages
    candidates = build_candidates(adapter, config.level, config.keep)
    block_params = param_basis(adapter)  # the one basis of --remove-params, the manifest and inspect
    model_params = sum(p.numel() for p in job.model.parameters())
    stop = _stop_rule(job, config, candidates, num_level_candidates, block_params)
    data = job.calibration_data()
    kind_of = (lambda c: "block") if config.level == "block" else (lambda c: c.kind)

    def progress(done, total, label):
        if job.progress is not None:
            job.progress("finercut", done, total, label)

    score_dtype = "float32" if config.score_dtype == "float32" else str(next(job.model.parameters()).dtype)
    with float32_scoring(adapter, enabled=config.score_dtype == "float32"):
        replay = BlockReplay(adapter, data.input_ids, data.attention_mask, device=job.device,
                             batch_size=job.batch_size).capture()
        scorer = OutputScorer(replay, config.distance, config.js_form)
        search = greedy_search(
            scorer, candidates, stop,
            swaps_for=lambda c: sublayer_swaps(adapter, c.block, kind_of(c)),
            apply=lambda c: remove_sublayer(adapter, c.block, kind_of(c)),
            exclude_front=config.exclude_front, one_shot=config.one_shot,
            prefix_cache=config.prefix_cache, progress=progress,
        )
        replay.release()
    num_blocks = adapter.num_blocks
    done = finish_removal(job.model, adapter, config.level, {s.candidate.block for s in search.steps})
    details = removal_details(
        config=config.model_dump(), search=search, num_blocks=num_blocks, num_candidates=num_level_candidates,
        block_params=block_params, model_params=model_params, kept_blocks=done.kept_blocks,
        per_layer_config=done.per_layer_config,
        score_dtype=score_dtype, calibration=data, target_params=stop.params, removed_before=removed_before,
    )
    return MethodResult(
        method="finercut", config=config.model_dump(), details=details, structure=done.structure,
        form_reason=done.form_reason,
        timings={"search_s": search.seconds, "finercut_s": time.perf_counter() - t0},
    )


register(
    "finercut", FinerCutConfig,
    "FinerCut: greedy removal of attention / MLP sublayers or whole blocks (--remove, --level, --distance)",
    kind="structural",
    # the reference: the first 10 x 256 tokens of WikiText-2 train, no sampling (methods.md §8.2)
    calibration_defaults={"calib": "wikitext2", "format": "prefix", "nsamples": 10, "seqlen": 256},
)(run_finercut)
