"""Integrity of what is read (issue 17, part 3), one table: weights, shards, CD-MoE orders, spills.

Every row is a CLI call that must end with exit 2 and exactly one ``error: ...`` line, no traceback,
and leave every input and the row's folder byte for byte as they were (``hostile_harness``); the
"ok" rows (exit 0) prove the path a refusal guards still works. Classes:

* a tensor missing from the weight files (a block's, the embeddings', an untied head's; lazy and in
  memory; a plain checkpoint and one with a structure), and a FinerCut checkpoint without its
  manifest: one line naming the tensor, never a random initialisation;
* a shard index naming a missing shard or placing a tensor in the wrong shard (both loaders);
* a shard overwritten while a lazy prune runs;
* disk full while spilling a lazily loaded block, a spill folder that cannot be created;
* CD-MoE ``--experts 0`` without shared experts, and ``--from-order`` files that are malformed,
  inconsistent (NaN, repeated experts) or from another model;
* ``eval --efficiency`` on a FinerCut checkpoint whose first attention was removed (ok row).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from hostile_harness import CALIB_TEXT, Ctx, Row, run_row

CPU = ["--device", "cpu", "--quiet"]
CALIB = ["--calib", "file:{calib}", "--nsamples", "2", "--seqlen", "16"]


def _prune(model: str, *extra: str, method: str = "magnitude") -> list[str]:
    opts = ["--sparsity", "0.5"] if method == "magnitude" else []
    return ["prune", "--model", model, "--method", method, *opts, "--out", "{tmp}/o", *CPU, *extra]


def _drop_tensor(src: Path, dst: Path, key: str) -> Path:
    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    state = load_file(weights)
    del state[key]
    save_file(state, weights, metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="session")
def shared_inputs(tmp_path_factory, tiny_model_dir) -> Ctx:
    import compresskit

    root = tmp_path_factory.mktemp("hostile-integrity")
    model = tiny_model_dir("llama")
    calib = root / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": f"{i}: " + CALIB_TEXT * 8}) + "\n" for i in range(8)))
    extra: dict[str, Path] = {}
    extra["miss_block"] = _drop_tensor(model, root / "miss-block", "model.layers.1.self_attn.q_proj.weight")
    extra["miss_embed"] = _drop_tensor(model, root / "miss-embed", "model.embed_tokens.weight")
    extra["miss_head"] = _drop_tensor(model, root / "miss-head", "lm_head.weight")  # untied: a real tensor
    ckpt = root / "ckpt"
    compresskit.prune(str(model), "magnitude", sparsity=0.5, out=ckpt, device="cpu")
    extra["ckpt_miss"] = _drop_tensor(ckpt, root / "ckpt-miss", "model.layers.0.mlp.up_proj.weight")
    # FinerCut: block 0's attention removed (the slot a decode loop asks the cache length from)
    finercut = root / "finercut"
    compresskit.prune(str(model), "finercut", calib=f"file:{calib}", nsamples=2, seqlen=16, device="cpu", out=finercut,
                      method_options={"remove": 0.25, "keep": r"mlp|layers\.1\."})
    assert json.loads((finercut / "compresskit.json").read_text())["structure"][0]["attention"] == [0]
    extra["finercut"] = finercut
    no_manifest = root / "finercut-no-manifest"
    shutil.copytree(finercut, no_manifest)
    (no_manifest / "compresskit.json").unlink()
    extra["fc_nomanifest"] = no_manifest
    extra["fc_miss"] = _drop_tensor(finercut, root / "finercut-miss", "model.layers.1.self_attn.o_proj.weight")
    # sharded copy of the model, and its index broken two ways
    from tiny_models import tiny_model, tiny_tokenizer

    sharded = root / "sharded"
    tiny_model("llama").save_pretrained(sharded, max_shard_size="600KB")
    tiny_tokenizer().save_pretrained(sharded)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2
    extra["sharded"] = sharded
    gone = root / "index-missing-shard"
    shutil.copytree(sharded, gone)
    (gone / shards[-1]).unlink()
    extra["index_gone"] = gone
    wrong = root / "index-wrong-shard"
    shutil.copytree(sharded, wrong)
    moved = dict(index)
    key = next(k for k, v in index["weight_map"].items() if v == shards[0])
    moved["weight_map"] = {**index["weight_map"], key: shards[1]}
    (wrong / "model.safetensors.index.json").write_text(json.dumps(moved))
    extra["index_wrong"] = wrong
    # MoE: Qwen2-MoE has shared experts, Qwen3-MoE has none; CD-MoE orders of the Qwen2-MoE model
    extra["qwen2_moe"] = tiny_model_dir("qwen2_moe")
    extra["qwen3_moe"] = tiny_model_dir("qwen3_moe")
    extra["deepseek"] = tiny_model_dir("deepseek_v2")
    run = compresskit.prune(str(extra["qwen2_moe"]), "cdmoe", calib=f"file:{calib}", nsamples=2, seqlen=16,
                            device="cpu", method_options={"experts": 2, "layers": 2})
    orders = run.manifest.method_details["orders"]
    assert orders["source_model"]["config_sha256"]
    (root / "orders.json").write_text(json.dumps(orders))
    extra["orders"] = root / "orders.json"
    extra["orders_data"] = orders  # not a path: used by the setups below
    return Ctx(tmp=root, model=model, calib=calib, extra=extra)


@pytest.fixture
def ctx(shared_inputs, tmp_path) -> Ctx:
    extra = {k: v for k, v in shared_inputs.extra.items() if isinstance(v, Path)}
    return dataclasses.replace(shared_inputs, tmp=tmp_path, extra=extra)


@pytest.fixture
def orders_data(shared_inputs) -> dict:
    return json.loads(json.dumps(shared_inputs.extra["orders_data"]))


# ----------------------------------------------------------------------------- setups and patches
ORDERS: dict = {}  # filled per test from the orders_data fixture (the setups take only ctx)


def _orders_file(edit=None, raw: bytes | None = None):
    """Setup: {tmp}/orders.json holding the shared orders changed by ``edit(data)`` (or ``raw`` bytes)."""

    def setup(ctx: Ctx) -> Path:
        path = ctx.tmp / "orders.json"
        if raw is not None:
            path.write_bytes(raw)
            return path
        data = json.loads(json.dumps(ORDERS))
        result = edit(data) if edit is not None else data
        path.write_text(json.dumps(data if result is None else result))
        return path

    return setup


def _first_block(data: dict) -> str:
    return str(data["layer_order"][0])


def _set_first(field: str, value):
    def edit(data):
        data[field][_first_block(data)] = value

    return edit


def _repeat_expert(data):
    order = data["expert_order"][_first_block(data)]
    order[1] = order[0]


def _nan_weight(data):
    data["avg_w"][_first_block(data)][0] = math.nan


def _overwrite_shard_after_first_block(monkeypatch, ctx: Ctx) -> None:
    """Rewrite the input's weights in place (same bytes, new mtime) once the first block was read,
    as a download or copy into the model folder would while the prune runs."""
    from compresskit.models import lazy_store

    real = lazy_store.LazyStore.materialise
    calls = []

    def materialise(self, module, device):
        calls.append(1)
        if len(calls) == 2:
            weights = ctx.tmp / "model" / "model.safetensors"
            data = weights.read_bytes()
            with open(weights, "r+b") as fh:
                fh.write(data)
            st = weights.stat()
            import os

            os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
        return real(self, module, device)

    monkeypatch.setattr(lazy_store.LazyStore, "materialise", materialise)


def _copy_model(ctx: Ctx) -> Path:
    dst = ctx.tmp / "model"
    shutil.copytree(ctx.model, dst)
    return dst


def _disk_full_on_spill(monkeypatch, ctx: Ctx) -> None:
    import safetensors.torch

    real = safetensors.torch.save_file

    def save_file(tensors, filename, *args, **kwargs):
        if ".compresskit-spill-" in str(filename):
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


def _spill_folder_refused(monkeypatch, ctx: Ctx) -> None:
    import tempfile

    real = tempfile.mkdtemp

    def mkdtemp(*args, prefix=None, dir=None, **kwargs):
        if prefix and prefix.startswith(".compresskit-spill-"):
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))
        return real(*args, prefix=prefix, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)


LAZY, IN_MEMORY = ["--load", "lazy"], ["--load", "in-memory"]
MISSING = "is missing from its weight files; refusing to initialise it randomly"
CDMOE = ["--method", "cdmoe", "--out", "{tmp}/o", *CPU]
FROM = ["prune", "--model", "{qwen2_moe}", *CDMOE, "--experts", "1", "--layers", "1", "--from-order", "{tmp}/orders.json"]

ROWS = [
    # a tensor missing from the weight files: one line naming it, lazy or in memory, never random
    Row("block tensor missing, lazy", _prune("{miss_block}", *LAZY),
        needle=f"tensor model.layers.1.self_attn.q_proj.weight {MISSING}"),
    Row("block tensor missing, in memory", _prune("{miss_block}", *IN_MEMORY),
        needle=f"tensor model.layers.1.self_attn.q_proj.weight {MISSING}"),
    Row("embeddings missing, lazy", _prune("{miss_embed}", *LAZY), needle=f"tensor model.embed_tokens.weight {MISSING}"),
    Row("embeddings missing, in memory", _prune("{miss_embed}", *IN_MEMORY),
        needle=f"tensor model.embed_tokens.weight {MISSING}"),
    Row("untied head missing, lazy", _prune("{miss_head}", *LAZY), needle=f"tensor lm_head.weight {MISSING}"),
    Row("untied head missing, eval", ["eval", "{miss_head}", "--ppl-file", "{calib}", "--seqlen", "16", *CPU],
        needle=f"tensor lm_head.weight {MISSING}"),
    Row("checkpoint tensor missing, eval", ["eval", "{ckpt_miss}", "--ppl-file", "{calib}", "--seqlen", "16", *CPU],
        needle=f"tensor model.layers.0.mlp.up_proj.weight {MISSING}"),
    Row("checkpoint tensor missing, further stage lazy", _prune("{ckpt_miss}", *LAZY),
        needle=f"tensor model.layers.0.mlp.up_proj.weight {MISSING}"),
    Row("structured checkpoint tensor missing, eval",
        ["eval", "{fc_miss}", "--ppl-file", "{calib}", "--seqlen", "16", *CPU],
        needle=f"tensor model.layers.1.self_attn.o_proj.weight {MISSING}"),
    Row("structured checkpoint tensor missing, further stage lazy", _prune("{fc_miss}", *LAZY),
        needle=f"tensor model.layers.1.self_attn.o_proj.weight {MISSING}"),
    Row("finercut checkpoint without manifest, eval",
        ["eval", "{fc_nomanifest}", "--ppl-file", "{calib}", "--seqlen", "16", *CPU],
        needle="config.json records block 0's attention as removed (per_layer_config), but compresskit.json"),
    Row("finercut checkpoint without manifest, prune lazy", _prune("{fc_nomanifest}", *LAZY),
        needle="config.json records block 0's attention as removed"),
    Row("finercut checkpoint without manifest, prune in memory", _prune("{fc_nomanifest}", *IN_MEMORY),
        needle="config.json records block 0's attention as removed"),
    Row("sharded model ok, lazy", _prune("{sharded}", *LAZY), exit_code=0, changes=True),

    # a shard index that disagrees with the shards: the same line from both loaders
    Row("index names a missing shard, lazy", _prune("{index_gone}", *LAZY), needle="which is missing"),
    Row("index names a missing shard, in memory", _prune("{index_gone}", *IN_MEMORY), needle="which is missing"),
    Row("index places a tensor in the wrong shard, lazy", _prune("{index_wrong}", *LAZY),
        needle="which does not hold it"),
    Row("index places a tensor in the wrong shard, in memory", _prune("{index_wrong}", *IN_MEMORY),
        needle="which does not hold it"),

    # the input overwritten while a lazy prune reads it
    Row("shard overwritten during a lazy prune", _prune("{tmp}/model", *LAZY), setup=_copy_model,
        patch=_overwrite_shard_after_first_block, needle="changed while it was being read"),
    # spilling a lazily loaded block
    Row("disk full while spilling", _prune("{model}", *LAZY), patch=_disk_full_on_spill,
        needle="cannot spill a changed block of the lazily loaded model"),
    Row("spill folder cannot be created", _prune("{model}", *LAZY), patch=_spill_folder_refused,
        needle="cannot create a spill folder under"),

    # CD-MoE: a width-0 layer, and --from-order files
    Row("cdmoe --experts 0 without shared experts",
        ["prune", "--model", "{qwen3_moe}", *CDMOE, "--experts", "0", "--layers", "1", *CALIB],
        needle="--experts 0 keeps only the shared experts, but the MoE layers of this"),
    Row("from-order ok", FROM, setup=_orders_file(), exit_code=0, changes=True),
    Row("from-order scalar", FROM, setup=_orders_file(raw=b"3"), needle="not CD-MoE orders (a JSON int"),
    Row("from-order null", FROM, setup=_orders_file(raw=b"null"), needle="not CD-MoE orders (a JSON null"),
    Row("from-order list", FROM, setup=_orders_file(lambda d: [d]), needle="not CD-MoE orders (a JSON list"),
    Row("from-order binary", FROM, setup=_orders_file(raw=b"\x89PNG\r\n\x1a\n\xff\xfe\x00binary"),
        needle="not JSON (binary data)"),
    Row("from-order not json", FROM, setup=_orders_file(raw=b"{'layer_order': [1]"), needle="not JSON"),
    Row("from-order avg_w not a list", FROM, setup=_orders_file(_set_first("avg_w", "high")),
        needle="not valid CD-MoE orders: avg_w."),
    Row("from-order avg_w holds text", FROM, setup=_orders_file(_set_first("avg_w", ["a", "b", "c", "d"])),
        needle="not valid CD-MoE orders: avg_w."),
    Row("from-order avg_w NaN", FROM, setup=_orders_file(_nan_weight), needle="avg_w."),
    Row("from-order avg_w too short", FROM, setup=_orders_file(_set_first("avg_w", [0.5])), needle="names expert"),
    Row("from-order avg_w missing", FROM, setup=_orders_file(lambda d: d.pop("avg_w") and None),
        needle="has an expert order but no avg_w"),
    Row("from-order expert_order not a list", FROM, setup=_orders_file(_set_first("expert_order", 2)),
        needle="not valid CD-MoE orders: expert_order."),
    Row("from-order expert_order floats", FROM, setup=_orders_file(_set_first("expert_order", [1.0, 0.0])),
        needle="not valid CD-MoE orders: expert_order."),
    Row("from-order expert_order negative", FROM, setup=_orders_file(_set_first("expert_order", [-1, 0])),
        needle="not valid CD-MoE orders: expert_order."),
    Row("from-order repeated expert", FROM, setup=_orders_file(_repeat_expert), needle="twice"),
    Row("from-order repeated layer", FROM,
        setup=_orders_file(lambda d: d.update(layer_order=[d["layer_order"][0]] * 2)), needle="layer_order lists block"),
    Row("from-order layer without order", FROM,
        setup=_orders_file(lambda d: d.update(layer_order=[7, *d["layer_order"]])), needle="which has no expert_order"),
    Row("from-order of another model", ["prune", "--model", "{deepseek}", *CDMOE, "--experts", "1", "--layers", "1",
                                        "--from-order", "{tmp}/orders.json"],
        setup=_orders_file(lambda d: d.update(layer_order=[1, 0])), needle="whose configuration differs"),
    Row("from-order source record tampered", FROM,
        setup=_orders_file(lambda d: d["source_model"].update(config_sha256="0" * 64)), needle="configuration differs"),

    # FinerCut checkpoint whose first attention was removed: the decode loop counts tokens (ok row)
    Row("eval --efficiency, first attention removed", ["eval", "{finercut}", "--efficiency", *CPU], exit_code=0,
        changes=True),
]


def test_row_ids_are_unique():
    ids = [r.id for r in ROWS]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("row", ROWS, ids=str)
def test_row(row, ctx, orders_data, monkeypatch):
    ORDERS.clear()
    ORDERS.update(orders_data)
    run_row(row, ctx, monkeypatch)
    if row.exit_code:  # a run that stopped leaves no spill folder (a finished one removes it at exit)
        assert not list(ctx.tmp.glob(".compresskit-spill-*")), "a spill folder was left beside the output"
