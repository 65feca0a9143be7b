"""CD-MoE end to end on a loaded model: statistics + expert search, layer search, condensation.

``search_orders`` makes one sequential calibration pass (per MoE block: routing statistics, the
MoE input/output cached for that block only, the greedy expert order, the block's condensed
candidate), then one ``BlockReplay`` capture and the greedy layer search. ``condense_model``
replaces the chosen blocks' MoE modules on the model object (inside ``onload``) and picks the
checkpoint form. The orders are plain JSON (``CdmoeOrders.to_dict``), stored in the manifest, so
a smaller budget is cut from them without a new search (``--from-order``).

Under torchrun both passes run on this rank's share of the samples (``collect_expert_stats`` and
``BlockReplay`` apply ``engine.distributed.batch_share``); the routing statistics, the shared-gate
mean and every candidate's distance are reduced over ranks before use (``ExpertStats.all_reduce``,
``condense.shared_gate_mean``, ``search.batched_distance``), so all ranks find the same orders.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import InputError
from ..models.placement import onload
from .condense import build_condensed, shared_gate_mean
from .search import greedy_experts, greedy_layers
from .stats import collect_expert_stats
from .structure import KIND, declare_dense_layers, padded_dense_mlp, stock_form_problem, structure_entry


@dataclass
class CdmoeOrders:
    """Greedy orders and the constants needed to rebuild condensed layers (keys: block index as str)."""

    experts_searched: int
    layers_searched: int
    shared_gate: str
    distance: str
    expert_order: dict[str, list[int]] = field(default_factory=dict)
    expert_distances: dict[str, list[float]] = field(default_factory=dict)
    layer_order: list[int] = field(default_factory=list)
    layer_distances: list[float] = field(default_factory=list)
    avg_w: dict[str, list[float]] = field(default_factory=dict)
    shared_gate_mean: dict[str, float | None] = field(default_factory=dict)
    expert_stats: dict[str, dict] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "CdmoeOrders":
        try:
            return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
        except TypeError as exc:
            raise InputError(f"--from-order: not CD-MoE orders ({exc})") from None


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
    return blocks


def search_orders(job, experts: int, layers: int, shared_gate: str, distance: str) -> CdmoeOrders:
    """Both greedy searches on the job's calibration data (the model is not modified)."""
    from ..engine.replay import BlockReplay

    adapter = job.adapter
    blocks = check_budget(adapter, experts, layers)
    calib = job.calibration_data()
    orders = CdmoeOrders(experts, layers, shared_gate, distance)
    candidates: dict[int, torch.nn.Module] = {}

    def on_layer(ctx, view, hook) -> None:
        key = str(ctx.index)
        avg_w = hook.stats.avg_w.tolist()
        gate_mean = shared_gate_mean(view, hook.inputs, hook.masks)
        order, dists = greedy_experts(view, hook.inputs, hook.outputs, ctx.outputs, hook.masks, avg_w, experts,
                                      shared_gate, gate_mean, distance, device=job.device)
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


def read_orders(source: str) -> CdmoeOrders:
    """Orders from a JSON file (``CdmoeOrders.to_dict``) or a CD-MoE checkpoint's manifest."""
    path = Path(source).expanduser()
    manifest = path / "compresskit.json" if path.is_dir() else path
    try:
        data = json.loads(manifest.read_text())
    except FileNotFoundError:
        raise InputError(f"--from-order {source}: no such file or checkpoint") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"--from-order {source}: not JSON ({exc.msg})") from None
    if "method_details" in data:  # a checkpoint: this stage or an earlier CD-MoE stage
        records = [data, *reversed(data.get("stages", []))]
        found = next((r["method_details"].get("orders") for r in records
                      if r.get("method") == "cdmoe" and r.get("method_details", {}).get("orders")), None)
        if found is None:
            raise InputError(f"--from-order {source}: the checkpoint holds no CD-MoE orders")
        data = found
    return CdmoeOrders.from_dict(data)


def check_orders(orders: CdmoeOrders, blocks: list[int], experts: int, layers: int, shared_gate: str) -> list[str]:
    """Refuse orders that cannot give this budget; return notes on what was cut."""
    if layers > len(orders.layer_order):
        raise InputError(f"--layers {layers}: the stored layer order has only {len(orders.layer_order)} layers")
    chosen = orders.layer_order[:layers]
    if any(i not in blocks for i in chosen):
        raise InputError(f"--from-order: layers {chosen} are not all MoE blocks of this model ({blocks})")
    for i in chosen:
        if experts > len(orders.expert_order.get(str(i), [])):
            raise InputError(f"--experts {experts}: the stored order of block {i} has only "
                             f"{len(orders.expert_order.get(str(i), []))} experts")
    notes = []
    if experts != orders.experts_searched:
        notes.append(f"layer order searched with {orders.experts_searched} experts per layer, used with {experts}")
    if shared_gate != orders.shared_gate:
        notes.append(f"searched with --shared-gate {orders.shared_gate}, applied with {shared_gate}")
    return notes


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
