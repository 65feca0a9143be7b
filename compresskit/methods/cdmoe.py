"""CD-MoE — Condense, Don't Just Prune (Cao et al., arXiv 2412.00069; methods.md §7).

Condenses ``--layers`` MoE layers, each into one dense SwiGLU MLP holding its shared experts and
``--experts`` routed experts (chosen greedily per layer, constant weights avg_w folded into
``down_proj``); the router and the other experts are removed from the model. The layers are
chosen greedily by the divergence of the final hidden state. Defaults are the reference's:
E(2+6), 9 layers, JS over the hidden dimension (ε = 1e-10); its calibration is 100 C4 texts of
256 tokens (``--nsamples 100 --seqlen 256``). ``--experts 0`` is CD-MoE-S (shared experts only).

Qwen-MoE's token-gated shared expert is kept exactly by default (``--shared-gate exact``);
``--shared-gate constant`` folds the calibration mean of its sigmoid (an approximation, which
also lets Qwen checkpoints be stock). The greedy orders go into the manifest
(``method_details.orders``); ``--from-order CKPT_OR_JSON`` cuts a budget from them without a new
search or calibration.
"""

from __future__ import annotations

import time

from pydantic import Field, field_validator

from ..errors import InputError
from .base import MethodConfig, MethodResult, PruneJob, register


class CdmoeConfig(MethodConfig):
    experts: int = Field(6, ge=0, json_schema_extra={"flag": "--experts"},
                         description="Routed experts kept per condensed layer (E(S+k); 0 = CD-MoE-S, shared only).")
    layers: int = Field(9, ge=1, json_schema_extra={"flag": "--layers"},
                        description="MoE layers condensed (greedy layer order).")
    shared_gate: str = Field("exact", json_schema_extra={"flag": "--shared-gate"},
                             description="Qwen-MoE gated shared expert: exact (kept with its gate) | constant "
                                         "(calibration mean of the sigmoid folded in; approximate, stock form).")
    distance: str = Field("js", json_schema_extra={"flag": "--distance"},
                          description="Greedy-search distance over the hidden dimension: js | kl | angular | norm.")
    expert_weight: str = Field("routed", json_schema_extra={"flag": "--expert-weight"},
                               description="Constant on each kept routed expert: routed (the paper's avg_w, mean "
                                           "router weight over the tokens routed to it) | unconditional (its "
                                           "weight summed over all tokens / all tokens).")
    expert_stop: str = Field("budget", json_schema_extra={"flag": "--expert-stop"},
                             description="Greedy expert search: budget (add --experts experts, the paper's) | "
                                         "objective (stop before an expert that does not lower the distance).")
    from_order: str | None = Field(None, json_schema_extra={"flag": "--from-order"},
                                   description="Cut the budget from the orders of an earlier CD-MoE checkpoint "
                                               "or orders JSON (no new search, no calibration).")
    stock: bool = Field(True, json_schema_extra={"flag": "--stock"},
                        description="Write a stock transformers checkpoint where the config can hold it "
                                    "(--no-stock: always the compact compresskit form).")

    @field_validator("shared_gate", "expert_weight", "expert_stop", "distance")
    @classmethod
    def _one_of(cls, value: str, info) -> str:
        from ..analysis.names import DISTANCES
        from ..moe.choices import EXPERT_STOPS, EXPERT_WEIGHTS, SHARED_GATE_MODES

        choices = {"shared_gate": SHARED_GATE_MODES, "expert_weight": EXPERT_WEIGHTS, "expert_stop": EXPERT_STOPS,
                   "distance": DISTANCES}[info.field_name]
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {value!r}")
        return value


def run_cdmoe(job: PruneJob, config: CdmoeConfig) -> MethodResult:
    from ..moe.pipeline import check_budget, check_orders, condense_model, read_orders, search_orders

    blocks = check_budget(job.adapter, config.experts, config.layers)
    if config.shared_gate == "constant" and not any(job.adapter.moe(i).shared_expert_gate is not None for i in blocks):
        raise InputError(f"--shared-gate constant folds a gated shared expert (Qwen-MoE's); this {job.adapter.family} "
                         "model has none, so it would change nothing: drop --shared-gate")
    notes: list[str] = []
    if config.from_order is not None:
        orders = read_orders(config.from_order)
        notes = check_orders(orders, config.from_order, job.model, job.adapter, blocks, config.experts, config.layers,
                             config.shared_gate, config.expert_weight)
    else:
        orders = search_orders(job, config.experts, config.layers, config.shared_gate, config.distance,
                               config.expert_weight, config.expert_stop)
    t0 = time.perf_counter()
    structure, reason, report = condense_model(job, orders, config.experts, config.layers, config.shared_gate,
                                               stock=config.stock)
    condense_s = time.perf_counter() - t0
    chosen = orders.layer_order[:config.layers]
    details = {
        "moe_blocks": blocks,
        "condensed_blocks": chosen,
        "layers": report,
        "params_removed": sum(r["params_removed"] for r in report.values()),
        "bytes_removed": sum(r["bytes_removed"] for r in report.values()),
        "form": "structure" if structure else "stock",
        "expert_weight": orders.expert_weight,
        "expert_stop": orders.expert_stop,
        "orders": orders.to_dict(),
        "from_order": config.from_order,
        "notes": notes,
        # finetune trains exactly these modules (the condensed layers), everything else frozen
        "trainable_modules": [job.adapter.mlp_path(i) for i in chosen],
    }
    timings = {"condense_s": condense_s}
    if config.from_order is None:
        timings.update(orders.timings)
    return MethodResult(method="cdmoe", config=config.model_dump(), details=details, structure=structure,
                        form_reason=reason, timings=timings)


register(
    "cdmoe", CdmoeConfig,
    "CD-MoE: condense MoE layers into dense MLPs of shared + greedily chosen experts (--experts, --layers)",
    needs_calibration=lambda job, cfg: cfg.from_order is None,
    kind="structural",
    # the reference: 100 C4 texts truncated to 256 tokens (methods.md §7.1-7.2)
    calibration_defaults={"calib": "c4", "nsamples": 100, "seqlen": 256},
)(run_cdmoe)
