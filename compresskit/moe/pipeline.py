"""CD-MoE end to end on a loaded model: statistics + expert search, layer search, condensation.

``search_orders`` makes one sequential calibration pass (per MoE block: routing statistics, the
MoE input/output cached for that block only, the greedy expert order, the block's condensed
candidate), then one ``BlockReplay`` capture and the greedy layer search. ``condense_model``
replaces the chosen blocks' MoE modules on the model object (inside ``onload``) and picks the
checkpoint form. The orders are plain JSON (``moe.orders.CdmoeOrders``), stored in the manifest, so
a smaller budget is cut from them without a new search (``--from-order``, validated by ``moe.orders``).

Under torchrun both passes run on this rank's share of the samples (``collect_expert_stats`` and
``BlockReplay`` apply ``engine.distributed.batch_share``); the routing statistics, the shared-gate
mean and every candidate's distance are reduced over ranks before use (``ExpertStats.all_reduce``,
``condense.shared_gate_mean``, ``search.batched_distance``), so all ranks find the same orders.
"""

from __future__ import annotations

import time

import torch

from ..engine.replay import BlockReplay
from ..errors import InputError
from ..models.placement import onload
from .condense import build_condensed, shared_gate_mean
from .orders import CdmoeOrders, check_orders, model_identity, read_orders  # noqa: F401 - read_orders, check_orders: methods.cdmoe
from .search import greedy_experts, greedy_layers
from .stats import collect_expert_stats
from .structure import KIND, declare_dense_layers, padded_dense_mlp, stock_form_problem, structure_entry


def moe_blocks(adapter) -> list[int]:
    return [i for i in range(adapter.num_blocks) if adapter.is_moe(i)]


def check_budget(adapter, experts: int, layers: int) -> list[int]:
    """The MoE blocks, after refusing a dense model or a budget larger than the model."""
    blocks = moe_blocks(adapter)
    if not blocks:
        raise InputError(f"{adapter.family} model has no MoE layers; cdmoe / reap need a Mixture-of-Experts model")
    if layers > len(blocks):
        raise InputError(f"--layers {layers} exceeds the model's {len(blocks)} MoE layers (blocks {blocks})")
    fewest = min(adapter.moe(i).num_experts for i in blocks)
    if experts > fewest:
        raise InputError(f"--experts {experts} exceeds the {fewest} routed experts per MoE layer")
    unshared = [i for i in blocks if adapter.moe(i).shared_experts is None]
    if experts == 0 and unshared:
        raise InputError(f"--experts 0 keeps only the shared experts, but the MoE layers of this {adapter.family} model "
                         f"have none (blocks {unshared}): a condensed layer would output zero; use --experts 1 or more")
    return blocks


def search_orders(job, experts: int, layers: int, shared_gate: str, distance: str,
                  expert_weight: str = "routed", expert_stop: str = "budget") -> CdmoeOrders:
    """Both greedy searches on the job's calibration data (the model is not modified).

    The expert search weights each candidate by the constant that will be folded
    (``expert_weight``); the orders' ``avg_w`` holds those constants."""

    adapter = job.adapter
    blocks = check_budget(adapter, experts, layers)
    calib = job.calibration_data()
    orders = CdmoeOrders(experts, layers, shared_gate, distance, source_model=model_identity(job.model),
                         expert_weight=expert_weight, expert_stop=expert_stop)
    last = adapter.num_blocks - 1
    candidates: dict[int, torch.nn.Module] = {}

    def on_layer(ctx, view, hook) -> None:
        key = str(ctx.index)
        avg_w = hook.stats.expert_weights(expert_weight).tolist()
        gate_mean = shared_gate_mean(view, hook.inputs, hook.masks)
        # the last block's output is compared after the final norm, as the reference's last hidden state
        post = adapter.head_modules()[:-1] if ctx.index == last else None
        order, dists = greedy_experts(view, hook.inputs, hook.outputs, ctx.outputs, hook.masks, avg_w, experts,
                                      shared_gate, gate_mean, distance, device=job.device, stop=expert_stop,
                                      post=post)
        orders.expert_order[key], orders.expert_distances[key] = order, dists
        orders.avg_w[key], orders.shared_gate_mean[key] = avg_w, gate_mean
        orders.expert_stats[key] = hook.stats.to_dict()
        candidates[ctx.index] = build_condensed(view, order, avg_w, shared_gate, gate_mean, device="cpu")
        hook.inputs.clear(), hook.outputs.clear()

    def progress(phase):
        return None if job.progress is None else (lambda d, t, label: job.progress(phase, d, t, label))

    t0 = time.perf_counter()
    collect_expert_stats(adapter, calib.input_ids, calib.attention_mask, device=job.device,
                         batch_size=job.batch_size, on_layer=on_layer, record_io=True,
                         progress=progress("cdmoe: expert search"))
    orders.timings["expert_search_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    replay = BlockReplay(adapter, calib.input_ids, calib.attention_mask, device=job.device,
                         batch_size=job.batch_size, progress=progress("cdmoe: replay capture")).capture()
    try:
        paths = {i: adapter.mlp_path(i) for i in blocks}
        orders.layer_order, orders.layer_distances = greedy_layers(
            replay, paths, candidates, layers, distance, progress=progress("cdmoe: layer search"))
    finally:
        replay.release()
    orders.timings["layer_search_s"] = time.perf_counter() - t0
    return orders


def condense_model(job, orders: CdmoeOrders, experts: int, layers: int, shared_gate: str,
                   stock: bool = True) -> tuple[list[dict], str, dict]:
    """Condense the first ``layers`` blocks of the layer order; returns (structure, form_reason, per-layer report)."""
    adapter, model = job.adapter, job.model
    dense_before = {i for i in range(adapter.num_blocks) if not adapter.is_moe(i)}
    chosen = orders.layer_order[:layers]
    built, report = {}, {}
    for i in chosen:
        key = str(i)
        with onload(adapter.block(i), job.device) as block:
            view = adapter.moe(i)
            old = _size(view.module)
            cond = build_condensed(view, orders.expert_order[key][:experts], orders.avg_w[key], shared_gate,
                                   orders.shared_gate_mean.get(key), reuse_shared=True)
            _replace(block, adapter.mlp_path(i), adapter.block_name(i), cond)
            built[i] = cond
            new = _size(cond)
        report[key] = {"experts": orders.expert_order[key][:experts],
                       "distances": orders.expert_distances.get(key, [])[:experts],
                       "weights": [orders.avg_w[key][e] for e in orders.expert_order[key][:experts]],
                       "intermediate_size": cond.intermediate_size,
                       "params_removed": old[0] - new[0], "bytes_removed": old[1] - new[1]}
    problem = stock_form_problem(model, built, adapter.num_blocks, dense_before) if built else "nothing condensed"
    if built and problem is None and stock:
        for i, cond in built.items():
            with onload(adapter.block(i), job.device) as block:
                dense = padded_dense_mlp(model, cond)
                _replace(block, adapter.mlp_path(i), adapter.block_name(i), dense)
                report[str(i)]["stock_padding_params"] = _size(dense)[0] - _size(cond)[0]
                report[str(i)]["params_removed"] -= report[str(i)]["stock_padding_params"]
                report[str(i)]["bytes_removed"] -= _size(dense)[1] - _size(cond)[1]
        key = declare_dense_layers(model, chosen, dense_before)
        reason = (f"stock {model.config.model_type} checkpoint: condensed layers {sorted(chosen)} are dense MLPs "
                  f"declared by config '{key}', zero-padded to intermediate_size (exact); loads with plain "
                  "AutoModelForCausalLM.from_pretrained")
        return [], reason, report
    if built and problem is None:
        problem = "--no-stock asked for the compact form"
    reason = (f"compresskit structure '{KIND}' (load with compresskit.load): {problem}"
              if built else problem)
    paths = {adapter.mlp_path(i): m for i, m in built.items()}
    return ([structure_entry(model, paths)] if built else []), reason, report


def _size(module) -> tuple[int, int]:
    params = list(module.parameters())
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


def _replace(block, full_path: str, block_name: str, module) -> None:
    local = full_path[len(block_name) + 1:]
    parent_path, _, name = local.rpartition(".")
    parent = block.get_submodule(parent_path) if parent_path else block
    setattr(parent, name, module)
