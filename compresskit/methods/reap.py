"""REAP expert removal — the MoE baseline users pick today (methods.md §7.7).

One calibration pass measures every routed expert's saliency (mean over its routed tokens of
softmax(router logits) × ‖expert output‖₂, the reference's gate); each MoE layer then loses the
``round(fraction · E)`` experts with the lowest saliency, with their router rows. ``top_k`` is
kept, the config's expert-count key is rewritten, and the result is a stock checkpoint (plain
``from_pretrained``).
"""

from __future__ import annotations

import time

from pydantic import Field, field_validator

from ..errors import InputError
from .base import MethodConfig, MethodResult, PruneJob, register


class ReapConfig(MethodConfig):
    remove_experts: float | None = Field(
        None, validate_default=True, json_schema_extra={"flag": "--remove-experts"},
        description="Fraction of routed experts removed from every MoE layer, in (0, 1) (REAP; e.g. 0.25).")

    @field_validator("remove_experts")
    @classmethod
    def _fraction(cls, value: float | None) -> float:
        if value is None:
            raise ValueError("--method reap needs --remove-experts F with 0 < F < 1, e.g. 0.25")
        if not 0.0 < value < 1.0:
            raise ValueError(f"--remove-experts must be in (0, 1), got {value:g}")
        return value


def run_reap(job: PruneJob, config: ReapConfig) -> MethodResult:
    from ..models.placement import onload
    from ..moe.pipeline import moe_blocks
    from ..moe.reap import (check_removal, experts_to_remove, kept_experts, remove_experts, router_groups,
                            set_expert_count)
    from ..moe.stats import collect_expert_stats

    adapter, model = job.adapter, job.model
    blocks = moe_blocks(adapter)
    if not blocks:
        raise InputError(f"{adapter.family} model has no MoE layers; --method reap needs a Mixture-of-Experts model")
    views = {i: adapter.moe(i) for i in blocks}
    counts = {v.num_experts for v in views.values()}
    if len(counts) != 1:
        raise InputError(f"MoE layers hold different expert counts {sorted(counts)}; the config can hold only one")
    num_experts = counts.pop()
    top_k = min(v.top_k for v in views.values())
    text_config = model.config.get_text_config()
    groups = router_groups(text_config)
    remove = experts_to_remove(num_experts, config.remove_experts)
    check_removal(num_experts, remove, top_k, groups, getattr(text_config, "topk_group", None))
    del views

    t0 = time.perf_counter()
    calib = job.calibration_data()
    progress = None if job.progress is None else (lambda d, t, label: job.progress("reap: saliency", d, t, label))
    stats = collect_expert_stats(adapter, calib.input_ids, calib.attention_mask, device=job.device,
                                 batch_size=job.batch_size, progress=progress)
    stats_s = time.perf_counter() - t0
    per_layer, removed_params, removed_bytes = {}, 0, 0
    for i in blocks:
        keep = kept_experts(stats[i].saliency, remove, groups)
        with onload(adapter.block(i), job.device):
            view = adapter.moe(i)
            before = [(p.numel(), p.numel() * p.element_size()) for p in view.module.parameters()]
            remove_experts(view, keep)
            after = [(p.numel(), p.numel() * p.element_size()) for p in view.module.parameters()]
        removed_params += sum(n for n, _ in before) - sum(n for n, _ in after)
        removed_bytes += sum(b for _, b in before) - sum(b for _, b in after)
        per_layer[str(i)] = {"kept": keep, "removed": [e for e in range(num_experts) if e not in keep],
                             **stats[i].to_dict()}
    key = set_expert_count(model.config, num_experts - remove)
    details = {"moe_blocks": blocks, "experts_before": num_experts, "experts_after": num_experts - remove,
               "removed_per_layer": remove, "top_k": top_k, "router_groups": groups, "layers": per_layer,
               "params_removed": removed_params, "bytes_removed": removed_bytes}
    reason = (f"stock {text_config.model_type} checkpoint: experts removed with their router rows and "
              f"'{key}' rewritten to {num_experts - remove}; top_k stays {top_k}")
    return MethodResult(method="reap", config=config.model_dump(), details=details, structure=[],
                        form_reason=reason, timings={"saliency_s": stats_s})


register(
    "reap", ReapConfig,
    "REAP: remove the lowest-saliency routed experts of every MoE layer (--remove-experts F)",
    kind="structural",
)(run_reap)
