"""The manifest record of a FinerCut run: what went, in which order, at what distance.

``details["order"]`` lists every removal (step, block in the *original* numbering, type,
module, distance at that step, parameters); ``details["per_layer"]`` has one row per original
block with the step at which its attention / MLP went, the sublayers an earlier stage had removed
(``removed_before``) and its index after renumbering (None when the block was deleted).
``inspect --plot`` draws from these (``depth/plot.py``), ``inspect`` and the prune summary print
them (``commands/structural_report.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # inspect reads this module: no torch at import
    from .greedy import SearchResult

#: What every FinerCut parameter fraction is a share of: ``--remove-params``, the manifest's
#: ``param_fraction_blocks``, ``inspect`` and ``inspect --plot`` (:func:`block_params`).
PARAM_BASIS = "the decoder blocks' parameters"


def block_params(adapter) -> int:
    """The parameters of the decoder blocks as they are now (shapes only): FinerCut's one basis."""
    return sum(p.numel() for p in adapter.blocks.parameters())


def param_fraction(details: dict) -> float:
    """The removed share of :data:`PARAM_BASIS` recorded in a FinerCut manifest's details."""
    return float(details.get("param_fraction_blocks", 0.0))


def removal_details(*, config: dict, search: SearchResult, num_blocks: int, num_candidates: int, block_params: int,
                    model_params: int, kept_blocks: list[int] | None, per_layer_config: dict, score_dtype: str,
                    calibration=None, target_params: int | None = None,
                    removed_before: dict[int, list[str]] | None = None) -> dict:
    """``removed_before``: block → sublayers (``attention`` / ``mlp``) an earlier stage had removed."""
    order = []
    before = removed_before or {}
    rows = [{"block": i, "attention": None, "mlp": None, "new_index": i, "removed_before": sorted(before.get(i, []))}
            for i in range(num_blocks)]
    sublayers = 0
    for s in search.steps:
        c = s.candidate
        kinds = ("attention", "mlp") if c.kind == "block" else ("attention" if c.kind == "attn" else "mlp",)
        for k in kinds:
            rows[c.block][k] = s.step
        sublayers += len(kinds)
        order.append({"step": s.step, "block": c.block, "type": c.kind, "name": c.name, "distance": s.distance,
                      "params": c.params, "scored": s.scored, "seconds": round(s.seconds, 3)})
    if kept_blocks is not None:
        new_of = {old: new for new, old in enumerate(kept_blocks)}
        for row in rows:
            row["new_index"] = new_of.get(row["block"])
    removed_params = search.steps[-1].removed_params if search.steps else 0
    fraction = removed_params / block_params if block_params else 0.0
    calib_note = None
    if calibration is not None:
        spec = calibration.spec
        how = ("the first nsamples·seqlen tokens of its non-empty documents joined with ' ' (format 'prefix', "
               "the reference's construction)" if spec.format == "prefix"
               else f"the loader's {spec.format!r} format (seed {spec.seed})")
        calib_note = ("reference: the first nsamples·seqlen tokens of the WikiText-2 train stream, no sampling; "
                      f"here: {spec.nsamples} × {spec.seqlen} tokens from {spec.source!r}, {how}")
    return {
        "level": config["level"],
        "distance": config["distance"],
        "js_form": config["js_form"] if config["distance"] == "js" else None,
        "one_shot": config["one_shot"],
        "prefix_cache": config["prefix_cache"],
        "score_dtype": score_dtype,
        "num_blocks": num_blocks,
        "num_candidates": num_candidates,
        "removed": len(search.steps),
        "attention_removed": sum(1 for r in rows if r["attention"] is not None),
        "mlp_removed": sum(1 for r in rows if r["mlp"] is not None),
        "blocks_deleted": 0 if kept_blocks is None else num_blocks - len(kept_blocks),
        "candidate_fraction": len(search.steps) / num_candidates,
        "sublayer_fraction": sublayers / (2 * num_blocks),
        "removed_params": removed_params,
        "block_params": block_params,
        "param_fraction_blocks": fraction,  # the one basis (PARAM_BASIS), also of --remove-params
        "param_fraction_model": removed_params / model_params if model_params else 0.0,
        # --remove-params: the request, what was achieved, and the greedy choice not taken (greedy.StopRule)
        "requested_param_fraction": config.get("remove_params"),
        "requested_params": target_params,
        "achieved_param_fraction": fraction,
        "stop_rule": ("remove_params: the removal count whose parameters are nearest the request (a tie removes; "
                      "at least one removal)" if target_params is not None else "remove: int(N·R) removals"),
        "declined_next": search.declined,
        "order": order,
        "per_layer": rows,
        "per_layer_config": per_layer_config,
        "withheld_front_blocks": search.withheld_blocks,
        "put_back_after": search.put_back_after,
        "put_back_at_step": search.put_back_at_step,
        "final_distance": search.final_distance,
        "search": {"seconds": round(search.seconds, 3), "block_runs": search.block_runs,
                   "full_forward_equivalents": round(search.block_runs / max(num_blocks, 1), 2)},
        "calibration_note": calib_note,
    }
