"""EvoPress's depth search (search/depth.py): sublayer / block genes, exact budget, seeds, the
checkpoint forms FinerCut writes, determinism, resume, bad input and inspect --plot."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from tiny_models import _BASE, tiny_tokenizer

import compresskit
from compresskit.errors import InputError
from compresskit.models import get_adapter
from compresskit.search.depth import budget, depth_units

TEXT = ("The quick brown fox jumps over the lazy dog. " * 3 + "Four score and seven years ago our fathers brought "
        "forth on this continent a new nation, conceived in liberty. ") * 40
#: a search small enough for a test: 2 stages on 16 and 64 tokens (2 samples of 32)
SMALL = {"generations": 4, "offspring": 3, "tokens": "16,64", "survivors": "2,1"}


def llama(layers: int = 4, seed: int = 0, dead: dict[str, int] | None = None) -> transformers.PreTrainedModel:
    """A tiny Llama; ``dead``: {"attn": i} zeroes block i's o_proj, {"mlp": j} block j's down_proj
    (that sublayer then adds exactly nothing: removing it leaves the logits unchanged)."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**{**_BASE, "num_hidden_layers": layers, "initializer_range": 0.2})
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for kind, i in (dead or {}).items():
            layer = model.model.layers[i]
            (layer.self_attn.o_proj if kind == "attn" else layer.mlp.down_proj).weight.zero_()
    return model


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x, use_cache=False).logits


@pytest.fixture
def calib(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(TEXT)
    return f"file:{path}"


def evopress(model, calib, out=None, **options):
    return compresskit.prune(model, "evopress", tokenizer=tiny_tokenizer(), calib=calib, calib_format="prefix",
                             nsamples=2, seqlen=32, method_options={**SMALL, **options}, out=out, device="cpu")


def test_dead_sublayers_are_removed_and_reload_identically(calib, tmp_path):
    model = llama(dead={"attn": 2, "mlp": 1})
    x = torch.randint(1, 8000, (2, 20), generator=torch.Generator().manual_seed(3))
    dense = logits(model, x)
    params = sum(p.numel() for p in model.parameters())
    # k = int(4·0.25) = 1 of each type: 16 vectors, 4 random starts and 4 × 4 offspring
    out = evopress(model, calib, tmp_path / "evo", level="sublayer", remove=0.25, offspring=4)
    d = out.manifest.method_details
    assert sorted((r["type"], r["block"]) for r in d["removed"]) == [("attn", 2), ("mlp", 1)]
    assert d["final_fitness"] == pytest.approx(0.0, abs=1e-9)  # exactly the dense model's outputs
    assert d["attention_removed"] == d["mlp_removed"] == 1 and d["blocks_deleted"] == 0
    assert out.manifest.structure == [{"kind": "removed_sublayers", "attention": [2], "mlp": [1]}]
    assert not out.manifest.loadable_with_transformers
    torch.testing.assert_close(logits(out.model, x), dense, rtol=1e-5, atol=1e-5)
    loaded = compresskit.load(tmp_path / "evo")
    torch.testing.assert_close(logits(loaded, x), logits(out.model, x), rtol=0, atol=0)
    assert sum(p.numel() for p in loaded.parameters()) == params - sum(r["params"] for r in d["removed"])
    # the record: every generation, the first parent and its seed, the schedule as run
    assert len(d["history"]) == SMALL["generations"] == d["generations_done"]
    assert d["parents"][0]["generation"] == 0 and d["seed_winner"].startswith("random")
    assert [s["tokens_scored"] for s in d["schedule"]["stages"]] == [16, 64]


@pytest.mark.parametrize("layers,remove,level,per_type", [
    (8, 0.3, "sublayer", 2), (8, 0.5, "sublayer", 4), (8, 0.3, "block", 2), (10, 0.25, "block", 2),
])
def test_budget_is_exact(layers, remove, level, per_type):
    adapter = get_adapter(llama(layers))
    units, groups, high = depth_units(adapter, level)
    assert len(units) == (2 * layers if level == "sublayer" else layers)
    k = budget(layers, units, groups, high, 1, remove, None, level)
    assert k == per_type


def test_budget_from_params_and_refusals():
    adapter = get_adapter(llama(8))
    units, groups, high = depth_units(adapter, "sublayer")
    block = sum(p.numel() for p in adapter.block(0).parameters())
    assert budget(8, units, groups, high, 8 * block, None, 3 / 8, "sublayer") == 3  # 3 of each type = 3 blocks' params
    with pytest.raises(InputError, match="removes nothing"):
        budget(8, units, groups, high, 8 * block, 0.1, None, "sublayer")
    block_units, block_groups, block_high = depth_units(adapter, "block")
    with pytest.raises(InputError, match="every block"):
        budget(8, block_units, block_groups, block_high, 8 * block, None, 0.999, "block")
    keep_units, keep_groups, keep_high = depth_units(adapter, "sublayer", keep=r"layers\.[0-6]\.self_attn")
    assert sum(keep_high[:8]) == 1 and sum(keep_high[8:]) == 8  # only attn7 may go
    with pytest.raises(InputError, match="only 1 can be removed"):
        budget(8, keep_units, keep_groups, keep_high, 8 * block, 0.25, None, "sublayer")


def test_block_level_is_a_stock_checkpoint_with_identical_logits(calib, tmp_path):
    model = llama(dead={"attn": 2, "mlp": 2})  # block 2 is an identity: the block search must take it
    x = torch.randint(1, 8000, (2, 20), generator=torch.Generator().manual_seed(4))
    dense = logits(model, x)
    out = evopress(model, calib, tmp_path / "blk", level="block", remove=0.25)
    m = out.manifest
    assert [r["block"] for r in m.method_details["removed"]] == [2]
    assert m.loadable_with_transformers and not m.structure and "only whole blocks" in m.form_reason
    assert m.method_details["blocks_deleted"] == 1
    config = json.loads((tmp_path / "blk" / "config.json").read_text())
    assert config["num_hidden_layers"] == 3
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "blk").eval()
    ours = compresskit.load(tmp_path / "blk")
    torch.testing.assert_close(logits(plain, x), logits(ours, x), rtol=0, atol=0)
    torch.testing.assert_close(logits(plain, x), dense, rtol=1e-5, atol=1e-5)


def test_seeded_from_block_greedy_never_ends_worse(calib):
    model = llama(4, seed=1)
    out = evopress(model, calib, level="sublayer", remove=0.5, seed_from="block-greedy,finercut", generations=2)
    d = out.manifest.method_details
    assert set(d["seed_fitness"]) == {"block-greedy", "finercut"}
    # on every calibration token the result is no worse than either heuristic (evolution.final_selection)
    # (a seed equal to the last parent is compared once, as "search")
    assert d["final_fitness"] == min(d["pool_fitness"].values()) == d["pool_fitness"][d["final_choice"]]
    assert d["history"][0]["origin"] == d["seed_winner"]
    # both seeds spend exactly the budget: 2 attention and 2 MLP sublayers (k = int(4·0.5))
    for name, genes in d["seed_genes"].items():
        assert sum(genes[:4]) == 2 and sum(genes[4:]) == 2, name
    greedy = d["seed_genes"]["block-greedy"]
    assert greedy[:4] == greedy[4:]  # whole blocks: attention and MLP of the same two blocks
    assert len(d["seeds"]["block-greedy"]["order"]) == 2 and len(d["seeds"]["finercut"]["order"]) == 4
    assert d["attention_removed"] == d["mlp_removed"] == 2


def test_deterministic_under_a_seed_and_resume_matches(calib, tmp_path):
    def run(out, generations, resume=False):
        return compresskit.prune(
            llama(6), "evopress", tokenizer=tiny_tokenizer(), calib=calib, calib_format="prefix", nsamples=2, seqlen=32,
            method_options={**SMALL, "generations": generations, "level": "sublayer", "remove": 1 / 3, "resume": resume},
            out=out, force=resume, device="cpu").manifest.method_details

    def timeless(d):
        return [{k: v for k, v in h.items() if k != "seconds"} for h in d["history"]]

    a = run(tmp_path / "a", 4)
    # the search improves after generation 1 (else resuming there would prove nothing)
    assert any(h["improved"] for h in a["history"][1:])
    # a second run of 1 generation, then --resume to 4: the same seeds' fitness, history, final genes and
    # fitness as the uninterrupted run (deterministic under the search seed, and resumable)
    first = run(tmp_path / "c", 1)
    assert first["seed_fitness"] == a["seed_fitness"] and timeless(first) == timeless(a)[:1]
    c = run(tmp_path / "c", 4, resume=True)
    assert c["resumed_from_generation"] == 1
    assert c["genes"] == a["genes"] and c["final_fitness"] == a["final_fitness"] and timeless(c) == timeless(a)


@pytest.mark.parametrize("extra,needle", [
    (("--level", "sublayer", "--remove", "0.5", "--pruner", "wanda"), "do not apply"),
    (("--level", "block", "--remove", "0.5", "--sparsity", "0.5"), "do not apply"),
    (("--level", "sublayer", "--remove", "0.5", "--seed-from", "owl"), "unknown --seed-from"),
    (("--level", "sublayer"), "--remove"),
    (("--level", "sublayer", "--remove", "0.2"), "removes nothing"),  # 2 blocks: int(2·0.2) = 0
    (("--level", "block", "--remove-params", "0.99"), "every block"),  # 2 blocks: both would go
])
def test_bad_depth_input_is_one_line_and_exit_2(cli, tiny_model_dir, tmp_path, extra, needle):
    calib = tmp_path / "c.txt"
    calib.write_text(TEXT)
    out = tmp_path / "out"
    res = cli("prune", "--model", tiny_model_dir("llama"), "--method", "evopress", "--calib", f"file:{calib}",
              "--nsamples", "2", "--seqlen", "32", "--device", "cpu", "--out", out, "--quiet", *extra)
    assert res.exit_code == 2, (res.stdout, res.stderr)
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], res.stderr
    assert not out.exists()


def test_inspect_plot_of_a_depth_search(cli, tiny_model_dir, tmp_path):
    calib = tmp_path / "c.txt"
    calib.write_text(TEXT)
    out = tmp_path / "evo"
    res = cli("prune", "--model", tiny_model_dir("llama"), "--method", "evopress", "--level", "sublayer",
              "--remove", "0.5", "--calib", f"file:{calib}", "--nsamples", "2", "--seqlen", "32", "--device", "cpu",
              "--generations", "2", "--offspring", "2", "--tokens", "16,64", "--survivors", "2,1",
              "--out", out, "--quiet")
    assert res.exit_code == 0, res.stderr
    res = cli("inspect", out)
    assert res.exit_code == 0 and "1 attention, 1 MLP" in res.stdout and "seed random" in res.stdout, res.stdout
    png = tmp_path / "levels.png"
    res = cli("inspect", out, "--plot", png)
    assert res.exit_code == 0, res.stderr
    first = png.read_bytes()
    assert first[:4] == b"\x89PNG"
    res = cli("inspect", out, "--plot", png)  # compresskit's own plot is replaced (analyze/inspect --plot's rule)
    assert res.exit_code == 0 and png.read_bytes()[:4] == b"\x89PNG"
    foreign = tmp_path / "photo.png"
    foreign.write_bytes(b"\x89PNG not ours")
    res = cli("inspect", out, "--plot", foreign)
    assert res.exit_code == 2 and "refusing to overwrite" in res.stderr
    assert len([line for line in res.stderr.strip().splitlines() if line.strip()]) == 1
    assert foreign.read_bytes() == b"\x89PNG not ours"


@pytest.mark.parametrize("family", ["deepseek_v2", "qwen3_moe", "gemma3"])
def test_other_families_save_and_reload_identically(family, calib, tmp_path):
    from tiny_models import tiny_model

    model = tiny_model(family)
    out = evopress(model, calib, tmp_path / family, level="sublayer", remove=0.5, generations=1, offspring=2)
    d = out.manifest.method_details
    assert d["attention_removed"] == d["mlp_removed"] == 1  # 2 blocks: 1 of each type
    x = torch.randint(1, 8000, (2, 12), generator=torch.Generator().manual_seed(5))
    loaded = compresskit.load(tmp_path / family)
    torch.testing.assert_close(logits(loaded, x), logits(out.model, x), rtol=0, atol=0)


def test_inspect_plot_of_a_sparsity_search(cli, tiny_model_dir, tmp_path):
    calib = tmp_path / "c.txt"
    calib.write_text(TEXT)
    out = tmp_path / "evo"
    res = cli("prune", "--model", tiny_model_dir("llama"), "--method", "evopress", "--pruner", "wanda",
              "--sparsity", "0.5", "--calib", f"file:{calib}", "--nsamples", "2", "--seqlen", "32", "--device", "cpu",
              "--generations", "2", "--offspring", "2", "--tokens", "16,64", "--survivors", "2,1",
              "--out", out, "--quiet")
    assert res.exit_code == 0, res.stderr
    png = tmp_path / "levels.png"
    res = cli("inspect", out, "--plot", png)
    assert res.exit_code == 0, res.stderr
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "per-block sparsity" in res.stdout  # a sparsity search keeps the sparsity table, no removal report
