"""CD-MoE's greedy orders: the record (``CdmoeOrders``), its one validator, and reading it back.

The orders are plain JSON in the manifest (``method_details.orders``) or a file of their own, and
``--from-order`` cuts a smaller budget from them without a new search. Whatever a file holds is
checked once, here, before anything is built from it:

* its shape (``CdmoeOrders`` is a pydantic dataclass: an object with the fields below, integers
  where expert and block numbers go, finite numbers where weights and distances go; a scalar,
  ``null``, a list or binary bytes are refused with the field that is wrong);
* its consistency (no expert or layer listed twice; every ordered block has its ``avg_w`` and
  every ordered expert a weight);
* its source (``source_model``: the name and a hash of the configuration of the model the search
  ran on; orders of another model are refused, since their expert numbers mean other experts);
* against the model and budget at hand (``check_orders``: blocks that are MoE blocks, expert
  numbers below the layer's expert count, enough experts and layers for the budget).

Every refusal is one ``InputError`` line starting with ``--from-order SOURCE:``.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, StrictInt, ValidationError, model_validator
from pydantic.dataclasses import dataclass

from ..errors import InputError

Finite = Annotated[float, Field(allow_inf_nan=False)]
Index = Annotated[StrictInt, Field(ge=0)]
#: config keys that do not change which model it is (where and how it was loaded, the library version)
_VOLATILE_CONFIG_KEYS = {"name_or_path", "transformers_version", "dtype", "torch_dtype", "use_cache", "architectures",
                         "output_attentions", "output_hidden_states", "return_dict"}


@dataclass(config=ConfigDict(extra="ignore"))
class CdmoeOrders:
    """Greedy orders and the constants needed to rebuild condensed layers (keys: block index as str)."""

    experts_searched: Index
    layers_searched: Index
    shared_gate: str
    distance: str
    expert_order: dict[str, list[Index]] = field(default_factory=dict)
    expert_distances: dict[str, list[Finite]] = field(default_factory=dict)
    layer_order: list[Index] = field(default_factory=list)
    layer_distances: list[Finite] = field(default_factory=list)
    avg_w: dict[str, list[Finite]] = field(default_factory=dict)
    shared_gate_mean: dict[str, Finite | None] = field(default_factory=dict)
    expert_stats: dict[str, dict] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    #: the model the search ran on: {"name": ..., "config_sha256": ...} (absent in orders of older versions)
    source_model: dict[str, str] | None = None
    #: which constant ``avg_w`` holds (``--expert-weight``) and how the expert search stopped
    #: (``--expert-stop``); orders of older versions are the paper's: routed, budget
    expert_weight: Literal["routed", "unconditional"] = "routed"
    expert_stop: Literal["budget", "objective"] = "budget"

    @model_validator(mode="after")
    def _consistent(self) -> "CdmoeOrders":
        for name in ("expert_order", "expert_distances", "avg_w", "shared_gate_mean", "expert_stats"):
            bad = next((k for k in getattr(self, name) if not k.isdigit()), None)
            if bad is not None:
                raise ValueError(f"{name} has key {bad!r}, not a block number")
        for key, order in self.expert_order.items():
            _no_repeats(order, f"expert_order[{key}]", "expert")
            weights = self.avg_w.get(key)
            if weights is None:
                raise ValueError(f"block {key} has an expert order but no avg_w")
            if order and max(order) >= len(weights):
                raise ValueError(f"expert_order[{key}] names expert {max(order)}, but avg_w[{key}] has "
                                 f"{len(weights)} experts")
        _no_repeats(self.layer_order, "layer_order", "block")
        missing = [i for i in self.layer_order if str(i) not in self.expert_order]
        if missing:
            raise ValueError(f"layer_order names block {missing[0]}, which has no expert_order")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def _no_repeats(values: list[int], where: str, what: str) -> None:
    seen: set[int] = set()
    for v in values:
        if v in seen:
            raise ValueError(f"{where} lists {what} {v} twice")
        seen.add(v)


def model_identity(model) -> dict[str, str]:
    """The ``source_model`` record: the model's name and a hash of its configuration (without the
    keys that only say where or how it was loaded), so orders searched on it are recognised."""
    config = model.config
    return {"name": str(getattr(config, "name_or_path", "") or ""), "config_sha256": config_hash(config)}


def config_hash(config) -> str:
    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if not str(k).startswith("_") and k not in _VOLATILE_CONFIG_KEYS}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        if isinstance(value, float) and not math.isfinite(value):
            return repr(value)
        return value

    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    text = json.dumps(clean(data), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def parse_orders(data: Any, source: str) -> CdmoeOrders:
    """The one validator: JSON data → ``CdmoeOrders``, or one ``InputError`` naming what is wrong."""
    if not isinstance(data, dict):
        kind = "null" if data is None else type(data).__name__
        raise InputError(f"--from-order {source}: not CD-MoE orders (a JSON {kind}, not an object)")
    try:
        return CdmoeOrders(**data)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        got = error.get("input")
        shown = "" if error["type"] in {"value_error", "missing"} or isinstance(got, (dict, list)) else f" (got {got!r})"
        raise InputError(f"--from-order {source}: not valid CD-MoE orders: "
                         f"{where + ': ' if where else ''}{message}{shown}") from None


def read_orders(source: str) -> CdmoeOrders:
    """Orders from a JSON file (``CdmoeOrders.to_dict``) or a CD-MoE checkpoint's manifest."""
    path = Path(source).expanduser()
    manifest = path / "compresskit.json" if path.is_dir() else path
    try:
        data = json.loads(manifest.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise InputError(f"--from-order {source}: no such file or checkpoint") from None
    except OSError as exc:
        raise InputError(f"--from-order {source}: cannot read it ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise InputError(f"--from-order {source}: not JSON (binary data)") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"--from-order {source}: not JSON ({exc.msg})") from None
    if isinstance(data, dict) and "method_details" in data:  # a checkpoint: this stage or an earlier CD-MoE stage
        records = [data, *reversed(data.get("stages") or [])]
        found = next((r["method_details"].get("orders") for r in records
                      if isinstance(r, dict) and r.get("method") == "cdmoe" and isinstance(r.get("method_details"), dict)
                      and r["method_details"].get("orders")), None)
        if found is None:
            raise InputError(f"--from-order {source}: the checkpoint holds no CD-MoE orders")
        data = found
    return parse_orders(data, source)


def check_orders(orders: CdmoeOrders, source: str, model, adapter, blocks: list[int], experts: int, layers: int,
                 shared_gate: str, expert_weight: str = "routed") -> list[str]:
    """Refuse orders that are not this model's or cannot give this budget; return notes on what was cut."""
    notes = []
    here = model_identity(model)
    if orders.source_model is None:
        notes.append("the orders do not record the model they were searched on (an older file); not checked")
    elif orders.source_model.get("config_sha256") != here["config_sha256"]:
        name = orders.source_model.get("name") or "another model"
        raise InputError(f"--from-order {source}: the orders were searched on {name}, whose configuration differs "
                         f"from this model's ({here['name'] or 'the model given'}); search again without --from-order")
    if expert_weight != orders.expert_weight:
        raise InputError(f"--from-order {source}: the orders hold --expert-weight {orders.expert_weight} constants "
                         f"and were searched with them, not {expert_weight}; use --expert-weight "
                         f"{orders.expert_weight} or search again without --from-order")
    if layers > len(orders.layer_order):
        raise InputError(f"--layers {layers}: the stored layer order has only {len(orders.layer_order)} layers")
    chosen = orders.layer_order[:layers]
    if any(i not in blocks for i in chosen):
        raise InputError(f"--from-order: layers {chosen} are not all MoE blocks of this model ({blocks})")
    for i in chosen:
        order = orders.expert_order[str(i)]
        # an order the objective stopped early is complete up to the budget it was searched for
        complete = orders.expert_stop == "objective" and experts <= orders.experts_searched
        if experts > len(order) and not complete:
            raise InputError(f"--experts {experts}: the stored order of block {i} has only {len(order)} experts")
        count = adapter.moe(i).num_experts
        if len(orders.avg_w[str(i)]) != count:
            raise InputError(f"--from-order {source}: avg_w of block {i} has {len(orders.avg_w[str(i)])} experts, "
                             f"the model's layer has {count}")
    if experts != orders.experts_searched:
        notes.append(f"layer order searched with {orders.experts_searched} experts per layer, used with {experts}")
    if shared_gate != orders.shared_gate:
        notes.append(f"searched with --shared-gate {orders.shared_gate}, applied with {shared_gate}")
    return notes
