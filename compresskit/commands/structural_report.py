"""What a structural method removed, for ``prune``'s summary and ``inspect`` (not a command module).

Sparsity methods are shown by their per-block sparsity table; for FinerCut, EvoPress's depth search,
CD-MoE and REAP that table is all zeros and says nothing, so these show which sublayers went
(FinerCut, EvoPress with the search's fitness and seeds), which layers
were condensed into which experts (CD-MoE) and which experts were removed (REAP), read only from
the manifest's ``method_details`` (no torch import: ``inspect`` stays fast).
"""

from __future__ import annotations

from typing import Callable

from rich.table import Table


def structural_report(manifest) -> list | None:
    """Lines and tables for ``manifest``'s method, or None when its method has no such report."""
    report = _REPORTS.get(manifest.method)
    details = manifest.method_details
    if report is None or not isinstance(details, dict) or not details:
        return None
    lines = report(details)
    if lines is None:  # e.g. EvoPress's sparsity search: the per-block sparsity table says it
        return None
    p = manifest.parameters
    footer = (f"parameters {p.get('total_before', 0):,} → {p.get('total_after', 0):,} · "
              + " · ".join(f"{k} {v:.1f}s" for k, v in manifest.timings.items()))
    return [*lines, footer]


def _finercut(d: dict) -> list:
    from ..depth.report import PARAM_BASIS, param_fraction

    line = (f"removed {d['removed']} of {d['num_candidates']} {d['level']} candidates ({d['attention_removed']} "
            f"attention, {d['mlp_removed']} MLP; {d['blocks_deleted']} blocks deleted): sublayer fraction "
            f"{d['sublayer_fraction']:.3f}, parameter fraction {param_fraction(d):.3f} of {PARAM_BASIS}; order: "
            + " ".join(f"{o['type']}{o['block']}" for o in d["order"]))
    table = Table(title="removed sublayers (block: index in the input)")
    for col in ("block", "attention", "MLP", "new index"):
        table.add_column(col, justify="right")

    def cell(row: dict, kind: str) -> str:
        if row.get(kind) is not None:
            return f"removed (step {row[kind]})"
        return "removed earlier" if kind in (row.get("removed_before") or []) else "kept"

    for row in d.get("per_layer", []):
        new = row.get("new_index")
        table.add_row(str(row["block"]), cell(row, "attention"), cell(row, "mlp"),
                      "deleted" if new is None else str(new))
    return [line, table]


def _evopress(d: dict) -> list | None:
    """EvoPress's depth search (``search/depth.py``): what went, the search's fitness and its seeds."""
    if d.get("search") != "depth":
        return None
    from ..depth.report import PARAM_BASIS, param_fraction

    seeds = ", ".join(f"{k} {v:.4g}" for k, v in sorted((d.get("seed_fitness") or {}).items(), key=lambda kv: kv[1]))
    line = (f"removed {len(d['removed'])} {d['level']} units ({d['attention_removed']} attention, {d['mlp_removed']} "
            f"MLP; {d['blocks_deleted']} blocks deleted), parameter fraction {param_fraction(d):.3f} of {PARAM_BASIS}; "
            f"search: {d.get('generations_done')} generations of schedule {d['schedule']['name']}, KL "
            f"{d.get('final_fitness', float('nan')):.4g} from seed {d.get('seed_winner')} (seeds: {seeds}), "
            f"{d.get('tokens_seen', 0):,} tokens scored")
    table = Table(title="removed sublayers (block: index in the input)")
    for col in ("block", "attention", "MLP", "new index"):
        table.add_column(col, justify="right")

    def cell(row: dict, kind: str) -> str:
        if row.get(kind) is not None:
            return "removed"
        return "removed earlier" if kind in (row.get("removed_before") or []) else "kept"

    for row in d.get("per_layer", []):
        new = row.get("new_index")
        table.add_row(str(row["block"]), cell(row, "attention"), cell(row, "mlp"), "deleted" if new is None else str(new))
    return [line, table]


def _cdmoe(d: dict) -> list:
    condensed = [int(b) for b in d.get("condensed_blocks", [])]
    moe = [int(b) for b in d.get("moe_blocks", [])]
    untouched = [b for b in moe if b not in condensed]
    line = (f"condensed {len(condensed)} of {len(moe)} MoE layers into dense MLPs ({d.get('form')} form): "
            f"blocks {sorted(condensed)}; kept as MoE: {untouched}; {d.get('params_removed', 0):,} parameters removed")
    table = Table(title="condensed layers (greedy order)")
    for col, justify in (("block", "right"), ("routed experts kept", "left"), ("weights avg_w", "left"),
                         ("intermediate", "right"), ("parameters removed", "right")):
        table.add_column(col, justify=justify)
    layers = d.get("layers", {})
    for b in condensed:
        r = layers.get(str(b), {})
        table.add_row(str(b), _ids(r.get("experts", [])) or "none (shared only)",
                      " ".join(f"{w:.3f}" for w in r.get("weights", [])), str(r.get("intermediate_size", "")),
                      f"{r.get('params_removed', 0):,}")
    return [line, table]


def _reap(d: dict) -> list:
    line = (f"removed {d.get('removed_per_layer')} of {d.get('experts_before')} routed experts in each of "
            f"{len(d.get('moe_blocks', []))} MoE layers ({d.get('experts_after')} kept, top_k {d.get('top_k')}); "
            f"{d.get('params_removed', 0):,} parameters removed")
    table = Table(title="removed experts (lowest REAP saliency)")
    for col, justify in (("block", "right"), ("experts removed", "left"), ("experts kept", "left")):
        table.add_column(col, justify=justify)
    for block, r in d.get("layers", {}).items():
        table.add_row(str(block), _ids(r.get("removed", [])), _ids(r.get("kept", [])))
    return [line, table]


def _ids(ids) -> str:
    return " ".join(str(i) for i in ids)


_REPORTS: dict[str, Callable[[dict], list | None]] = {"finercut": _finercut, "cdmoe": _cdmoe, "reap": _reap,
                                                      "evopress": _evopress}
