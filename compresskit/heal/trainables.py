"""What healing trains, per checkpoint kind, decided from the manifest.

The kinds a checkpoint can be (over every stage of its manifest; ``heal`` / ``finetune`` stages
add none):

* ``sparse``   a sparsity method (Wanda, SparseGPT, OWL, AlphaPruning, ...: the registry's
               ``kind == "sparsity"``), stored dense with zeros. Trained: every weight matrix of
               the decoder blocks (routers excepted); the zeros at load are the masks, re-applied
               after every optimizer step (and the pruned entries' gradients zeroed before it), so
               every pruned entry stays exactly zero and each matrix keeps its sparsity to the entry.
* ``lowrank``  WeLore's low-rank factors: the U / V factors (``finetune``'s path).
* ``condensed`` CD-MoE: the modules the method declares (``method_details.trainable_modules``).
* ``reap``     REAP's expert pruning: the remaining experts and the routers of every MoE block.
* ``removed``  FinerCut / block removal: the neighbours of every removal (the block that lost a
               sublayer and the blocks before and after it; for a deleted block the kept blocks
               on either side), read off the stages' ``per_layer`` records and the structure.

``--train auto`` takes the union of the kinds' sets (everything when no kind is recognised);
``full`` trains every parameter; ``neighbours`` the neighbour blocks; ``lora`` adds peft LoRA
adapters instead (``heal/lora.py``). Whatever trains, the masks of a sparse checkpoint are kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..checkpoint import Manifest
from ..errors import InputError
from ..lowrank.layer import LowRankLinear
from ..methods import METHODS, available_methods
from ..models import get_adapter
from .loop import StepHooks
from .settings import TRAIN_MODES  # noqa: E402

#: stages that change weights but not the kind
_TRAINING_METHODS = ("heal", "finetune")


def lowrank_parameters(model) -> dict[str, torch.nn.Parameter]:
    """Name -> parameter of every U / V factor weight, in module order."""
    return {f"{name}.{part}.weight": getattr(module, part).weight
            for name, module in model.named_modules() if isinstance(module, LowRankLinear) for part in ("U", "V")}


def _records(manifest: Manifest) -> list[dict]:
    """Every stage's record, oldest first, this checkpoint's own last."""
    return [*manifest.stages, manifest.model_dump(exclude={"stages"})]


def declared_trainable_modules(manifest: Manifest) -> list[str]:
    """Module paths a structural stage declares trainable (``method_details.trainable_modules``:
    CD-MoE's condensed layers), over this checkpoint's stage and every earlier one."""
    records = [manifest.method_details, *(stage.get("method_details", {}) for stage in manifest.stages)]
    return list(dict.fromkeys(path for details in records for path in details.get("trainable_modules", []) or []))


def checkpoint_kinds(manifest: Manifest) -> list[str]:
    """The compression kinds of a checkpoint (see the module docstring), in a fixed order."""

    available_methods()  # loads the registry
    kinds: set[str] = set()
    for record in _records(manifest):
        method = record.get("method")
        if method in _TRAINING_METHODS:
            continue
        entry = METHODS.get(method)
        if entry is not None and entry.kind == "sparsity":
            kinds.add("sparse")
        if method == "reap":
            kinds.add("reap")
        details = record.get("method_details") or {}
        if any(_removes(row) for row in details.get("per_layer") or [] if isinstance(row, dict)):
            kinds.add("removed")
    structure = {entry.get("kind") for entry in manifest.structure}
    if "lowrank" in structure:
        kinds.add("lowrank")
    if "removed_sublayers" in structure:
        kinds.add("removed")
    if declared_trainable_modules(manifest):
        kinds.add("condensed")
    return [k for k in ("sparse", "lowrank", "condensed", "reap", "removed") if k in kinds]


def _removes(row: dict) -> bool:
    return row.get("attention") is not None or row.get("mlp") is not None


def neighbour_blocks(manifest: Manifest, num_blocks: int) -> list[int]:
    """Current indices of the blocks next to every removal, over all stages (renumbering followed)."""
    chosen: set[int] = set()
    for record in _records(manifest):
        rows = [r for r in ((record.get("method_details") or {}).get("per_layer") or []) if isinstance(r, dict)]
        if not rows or not all("block" in r and "new_index" in r for r in rows):
            continue
        new_of = {r["block"]: r["new_index"] for r in rows}
        chosen = {new_of[i] for i in chosen if new_of.get(i) is not None}  # earlier choices, renumbered
        for r in rows:
            if not _removes(r):
                continue
            if r["new_index"] is not None:
                chosen |= {r["new_index"] - 1, r["new_index"], r["new_index"] + 1}
            else:  # a deleted block: the kept blocks on either side of the gap
                before = [new_of[b] for b in new_of if b < r["block"] and new_of[b] is not None]
                after = [new_of[b] for b in new_of if b > r["block"] and new_of[b] is not None]
                chosen |= ({max(before)} if before else set()) | ({min(after)} if after else set())
    for entry in manifest.structure:
        if entry.get("kind") == "removed_sublayers":
            for i in [*entry.get("attention", []), *entry.get("mlp", [])]:
                chosen |= {i - 1, i, i + 1}
    return sorted(i for i in chosen if 0 <= i < num_blocks)


@dataclass
class TrainPlan:
    """The tensors to train and the masks to keep."""

    mode: str                       # what was asked: auto | full | neighbours | lora
    kinds: list[str]                # the checkpoint's compression kinds
    sets: list[str]                 # what trains: sparse, lowrank, condensed, reap, neighbours, full, lora
    params: dict[str, torch.nn.Parameter] = field(default_factory=dict)
    #: name -> bool tensor, True where the weight was zero at load (kept zero)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    blocks: list[int] | None = None  # the neighbour blocks, when they train

    def describe(self) -> str:
        return " + ".join(self.sets)

    def record(self) -> dict:
        return {"mode": self.mode, "kinds": self.kinds, "trained": self.sets, "neighbour_blocks": self.blocks,
                "tensors": len(self.params), "masked_tensors": len(self.masks),
                "masked_entries": int(sum(int(m.sum()) for m in self.masks.values()))}


def _router_ids(model, adapter) -> set[int]:
    ids = set()
    for i in range(adapter.num_blocks):
        moe = adapter.moe(i)
        if moe is not None:
            ids |= {id(p) for p in moe.router.parameters()}
    return ids


def _block_weights(model, adapter, blocks) -> dict[str, torch.nn.Parameter]:
    """Every weight matrix (ndim >= 2) of the given decoder blocks, routers excepted."""
    routers = _router_ids(model, adapter)
    out = {}
    for i in blocks:
        prefix = adapter.block_name(i)
        for n, p in adapter.block(i).named_parameters():
            if p.ndim >= 2 and id(p) not in routers:
                out[f"{prefix}.{n}"] = p
    return out


def _block_params(adapter, blocks) -> dict[str, torch.nn.Parameter]:
    return {f"{adapter.block_name(i)}.{n}": p for i in blocks for n, p in adapter.block(i).named_parameters()}


def _reap_params(model, adapter) -> dict[str, torch.nn.Parameter]:
    names = {id(m): n for n, m in model.named_modules()}
    out = {}
    for i in range(adapter.num_blocks):
        moe = adapter.moe(i)
        if moe is None:
            continue
        for module in (moe.experts_module, moe.router):
            prefix = names[id(module)]
            out.update({f"{prefix}.{n}": p for n, p in module.named_parameters()})
    return out


def plan_training(model, manifest: Manifest, mode: str) -> TrainPlan:
    """The trainable tensors of ``mode`` for this checkpoint (``lora``: only the kinds and masks;
    the adapters are added by ``heal/lora.py``)."""

    if mode not in TRAIN_MODES:
        raise InputError(f"unknown --train {mode!r}; choose one of {', '.join(TRAIN_MODES)}")
    adapter = get_adapter(model)
    kinds = checkpoint_kinds(manifest)
    plan = TrainPlan(mode=mode, kinds=kinds, sets=[])
    all_blocks = range(adapter.num_blocks)
    if mode == "full":
        plan.sets = ["full"]
        plan.params = dict(model.named_parameters())
    elif mode == "neighbours":
        blocks = neighbour_blocks(manifest, adapter.num_blocks)
        if not blocks:
            raise InputError("--train neighbours: this checkpoint removed no sublayer or block, so there are no "
                             "neighbours; use --train auto or --train full")
        plan.sets, plan.blocks = ["neighbours"], blocks
        plan.params = _block_params(adapter, blocks)
    elif mode == "auto":
        if "sparse" in kinds:
            plan.sets.append("sparse")
            plan.params.update(_block_weights(model, adapter, all_blocks))
        if "lowrank" in kinds:
            plan.sets.append("lowrank")
            plan.params.update(lowrank_parameters(model))
        if "condensed" in kinds:
            plan.sets.append("condensed")
            for path in declared_trainable_modules(manifest):
                plan.params.update({f"{path}.{n}": p for n, p in model.get_submodule(path).named_parameters()})
        if "reap" in kinds:
            plan.sets.append("reap")
            plan.params.update(_reap_params(model, adapter))
        if "removed" in kinds:
            blocks = neighbour_blocks(manifest, adapter.num_blocks)
            if blocks:
                plan.sets.append("neighbours")
                plan.blocks = blocks
                plan.params.update(_block_params(adapter, blocks))
        if not plan.params:
            plan.sets = ["full"]
            plan.params = dict(model.named_parameters())
    else:
        plan.sets = ["lora"]
    # one entry per tensor (tied weights once)
    seen, unique = set(), {}
    for name, p in plan.params.items():
        if id(p) not in seen:
            seen.add(id(p))
            unique[name] = p
    plan.params = unique
    if "sparse" in kinds:
        weights = _block_weights(model, adapter, all_blocks)
        targets = weights if mode == "lora" else {n: p for n, p in plan.params.items() if id(p) in {id(w) for w in weights.values()}}
        plan.masks = {n: (p.detach() == 0) for n, p in targets.items() if bool((p.detach() == 0).any())}
    return plan


def mask_hooks(params: dict[str, torch.nn.Parameter], masks: dict[str, torch.Tensor]):
    """``StepHooks`` that keep every masked entry exactly zero: its gradient zeroed before the step
    (so AdamW's moments stay zero there) and the weight re-zeroed after it."""

    if not masks:
        return StepHooks()
    pairs = [(params[n], m) for n, m in masks.items()]

    def to_device() -> None:
        for i, (p, m) in enumerate(pairs):
            if m.device != p.device:
                pairs[i] = (p, m.to(p.device))

    def after_backward() -> None:
        to_device()
        for p, m in pairs:
            if p.grad is not None:
                p.grad.masked_fill_(m, 0.0)

    def after_step() -> None:
        with torch.no_grad():
            for p, m in pairs:
                p.masked_fill_(m, 0.0)

    return StepHooks(after_backward=after_backward, after_step=after_step)


def apply_masks(model, masks_by_module_weight: dict[str, torch.Tensor]) -> None:
    """Zero the masked entries of ``<module path>.weight`` tensors (after a LoRA merge)."""
    with torch.no_grad():
        for name, m in masks_by_module_weight.items():
            p = model.get_parameter(name)
            p.masked_fill_(m.to(p.device), 0.0)
