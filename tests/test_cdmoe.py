"""CD-MoE: exact folding in both layouts, greedy choices on constructed layers, checkpoint forms,
KV-cache generation, --from-order cuts, fine-tuning only the condensed layers, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from compresskit import api
from compresskit.checkpoint import load
from compresskit.models import get_adapter
from compresskit.models.adapters.moe import build_moe_view, build_unfused
from compresskit.moe.condense import build_condensed, shared_output
from compresskit.moe.stats import expert_act, expert_forward
from tiny_models import tiny_model, tiny_tokenizer

CALIB = dict(nsamples=4, seqlen=32, device="cpu")


def _per_expert_layout(model):
    """The same weights with one nn.Linear per expert (the layout of remote-code MoE models)."""
    for layer in get_adapter(model).blocks:
        if hasattr(layer.mlp, "experts") and hasattr(layer.mlp.experts, "gate_up_proj"):
            layer.mlp.experts = build_unfused(layer.mlp.experts)
    return model


def _prune(model, sotu, out=None, **options):
    return api.prune(model, "cdmoe", tokenizer=tiny_tokenizer(), calib=f"file:{sotu}", out=out,
                     method_options=options, **CALIB)


@pytest.mark.parametrize("family,layout,gate", [
    ("deepseek_v2", "fused", "exact"), ("deepseek_v2", "per-expert", "exact"),
    ("qwen2_moe", "fused", "exact"), ("qwen2_moe", "per-expert", "constant"), ("mixtral", "fused", "exact"),
])
def test_condensed_layer_is_the_weighted_sum_of_its_experts_plus_shared(family, layout, gate):
    model = tiny_model(family)
    if layout == "per-expert":
        _per_expert_layout(model)
    adapter = get_adapter(model)
    i = next(b for b in range(adapter.num_blocks) if adapter.is_moe(b))
    view = adapter.moe(i)
    chosen, avg_w = [2, 0, 3], [0.3, 0.7, 0.45, 1.25]
    cond = build_condensed(view, chosen, avg_w, gate, gate_mean=0.37)
    x = torch.randn(2, 5, model.config.hidden_size)
    with torch.no_grad():
        expected = sum(avg_w[e] * expert_forward(view.experts[e], expert_act(view), x) for e in chosen)
        expected = expected + shared_output(view, x, gate, 0.37)
        torch.testing.assert_close(cond(x), expected, rtol=1e-5, atol=1e-6)
    if family == "qwen2_moe" and gate == "exact":  # the gate is kept: the output follows sigmoid(g·x) per token
        assert hasattr(cond, "shared_expert_gate")
        with torch.no_grad():
            gated = torch.sigmoid(view.shared_expert_gate(x)) * view.shared_experts(x)
            torch.testing.assert_close(cond(x) - (expected - shared_output(view, x, gate, 0.37)), gated,
                                       rtol=1e-5, atol=1e-6)


def test_the_expert_that_carries_all_the_signal_is_chosen_first(sotu_jsonl):
    model = tiny_model("deepseek_v2")
    mlp = model.model.layers[1].mlp
    with torch.no_grad():
        keep = torch.zeros_like(mlp.experts.down_proj)
        keep[2] = mlp.experts.down_proj[2] * 50  # experts 0, 1, 3 output exactly 0
        mlp.experts.down_proj.copy_(keep)
    outcome = _prune(model, sotu_jsonl, experts=2, layers=1)
    orders = outcome.manifest.method_details["orders"]
    assert orders["expert_stats"]["1"]["count"][2] > 0
    assert orders["expert_order"]["1"][0] == 2
    d = orders["expert_distances"]["1"]
    assert d[1] == pytest.approx(d[0])  # adding a silent expert changes nothing


def test_both_layouts_make_identical_decisions(sotu_jsonl):
    a = _prune(tiny_model("qwen2_moe"), sotu_jsonl, experts=2, layers=2)
    b = _prune(_per_expert_layout(tiny_model("qwen2_moe")), sotu_jsonl, experts=2, layers=2)
    oa, ob = a.manifest.method_details["orders"], b.manifest.method_details["orders"]
    assert oa["expert_order"] == ob["expert_order"] and oa["layer_order"] == ob["layer_order"]
    for k in oa["avg_w"]:
        assert oa["avg_w"][k] == pytest.approx(ob["avg_w"][k], rel=1e-5)
    ids = torch.randint(1, 8000, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(a.model(ids).logits, b.model(ids).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family,options,stock", [
    ("deepseek_v2", {}, True), ("qwen3_moe", {}, True), ("qwen2_moe", {"shared_gate": "constant"}, True),
    ("qwen2_moe", {}, False), ("mixtral", {}, False), ("deepseek_v2", {"stock": False}, False),
])
def test_reload_gives_identical_logits_and_kv_cache_generation(family, options, stock, tiny_model_dir, sotu_jsonl,
                                                                 tmp_path):
    out = tmp_path / "cd"
    outcome = _prune(str(tiny_model_dir(family)), sotu_jsonl, out=out, experts=1, layers=1, **options)
    manifest = json.loads((out / "compresskit.json").read_text())
    assert manifest["loadable_with_transformers"] is stock
    assert manifest["form_reason"].startswith("stock" if stock else "compresskit structure")
    ids = torch.randint(1, 8000, (2, 12))
    model = load(out)
    with torch.no_grad():
        expected = outcome.model(ids).logits
        torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=0)
        if stock:
            plain = AutoModelForCausalLM.from_pretrained(out).eval()
            torch.testing.assert_close(plain(ids).logits, expected, rtol=1e-6, atol=1e-6)
            assert not any("experts" in n for n, _ in plain.model.layers[manifest["method_details"]["condensed_blocks"][0]].named_modules())
    prompt = ids[:1, :6]
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)
    # the router and unused experts are gone from the checkpoint
    from safetensors import safe_open

    block = manifest["method_details"]["condensed_blocks"][0]
    keys = [k for f in out.glob("*.safetensors") for k in safe_open(str(f), "pt").keys()]
    assert not any(k.startswith(f"model.layers.{block}.mlp.gate.") or f"layers.{block}.mlp.experts" in k for k in keys)


def test_from_order_cuts_a_smaller_budget_without_a_search(tiny_model_dir, sotu_jsonl, tmp_path):
    full = tmp_path / "full"
    _prune(str(tiny_model_dir("qwen2_moe")), sotu_jsonl, out=full, experts=3, layers=2, shared_gate="constant")
    orders = json.loads((full / "compresskit.json").read_text())["method_details"]["orders"]
    cut = api.prune(str(tiny_model_dir("qwen2_moe")), "cdmoe", out=tmp_path / "cut", device="cpu",
                    method_options={"experts": 2, "layers": 1, "from_order": str(full), "shared_gate": "constant"})
    details = cut.manifest.method_details
    first = orders["layer_order"][0]
    assert details["condensed_blocks"] == [first]
    assert details["layers"][str(first)]["experts"] == orders["expert_order"][str(first)][:2]
    assert cut.manifest.calibration is None and "expert_search_s" not in cut.manifest.timings
    assert "layer order searched with 3 experts per layer, used with 2" in details["notes"]
    # a JSON file of the orders works the same way
    path = tmp_path / "orders.json"
    path.write_text(json.dumps(orders))
    again = api.prune(str(tiny_model_dir("qwen2_moe")), "cdmoe", device="cpu",
                      method_options={"experts": 2, "layers": 1, "from_order": str(path), "shared_gate": "constant"})
    ids = torch.randint(1, 8000, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(again.model(ids).logits, cut.model(ids).logits, rtol=0, atol=0)


def test_finetune_trains_only_the_condensed_layers(cli, tiny_model_dir, sotu_jsonl, tmp_path):
    cd, ft = tmp_path / "cd", tmp_path / "ft"
    _prune(str(tiny_model_dir("qwen2_moe")), sotu_jsonl, out=cd, experts=1, layers=1)
    res = cli("finetune", cd, "--data", f"file:{sotu_jsonl}", "--steps", "2", "--warmup", "0", "--seqlen", "32",
              "--batch-size", "2", "--lr", "1e-2", "--out", ft, "--device", "cpu")
    assert res.exit_code == 0, res.stderr
    block = json.loads((cd / "compresskit.json").read_text())["method_details"]["condensed_blocks"][0]
    before, after = load(cd).state_dict(), load(ft).state_dict()
    prefix = f"model.layers.{block}.mlp."
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(prefix) for k in changed)
    assert f"{prefix}shared_expert_gate.weight" in changed or f"{prefix}gate_proj.weight" in changed


@pytest.mark.parametrize("family,args,needle", [
    ("llama", ["--experts", "1", "--layers", "1"], "has no MoE layers"),
    ("deepseek_v2", ["--experts", "9", "--layers", "1"], "--experts 9 exceeds the 4 routed experts"),
    ("deepseek_v2", ["--experts", "1", "--layers", "2"], "--layers 2 exceeds the model's 1 MoE layers"),
    ("deepseek_v2", ["--shared-gate", "sometimes"], "must be one of exact, constant"),
])
def test_bad_input_is_one_line_and_exit_2(cli, tiny_model_dir, sotu_jsonl, tmp_path, family, args, needle):
    out = tmp_path / "never"
    res = cli("prune", "--model", tiny_model_dir(family), "--method", "cdmoe", *args, "--calib", f"file:{sotu_jsonl}",
              "--nsamples", "2", "--seqlen", "16", "--out", out, "--device", "cpu", "--quiet")
    assert res.exit_code == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], res.stderr
    assert not out.exists()


def test_analyze_experts_reports_usage_and_plots(cli, tiny_model_dir, sotu_jsonl, tmp_path):
    plot = tmp_path / "routing.png"
    res = cli("analyze", "--model", tiny_model_dir("deepseek_v2"), "--metric", "experts", "--calib",
              f"file:{sotu_jsonl}", "--nsamples", "2", "--seqlen", "16", "--plot", plot, "--json", "--device", "cpu")
    assert res.exit_code == 0, res.stderr
    report = json.loads(res.stdout)
    stats = report["per_expert"]["1"]
    assert sum(stats["count"]) == 2 * 16 * 2 and len(stats["avg_w"]) == 4 and len(stats["saliency"]) == 4
    assert report["per_block"]["unused_experts"][0] is None
    assert plot.is_file() and plot.stat().st_size > 1000


def test_layer_search_with_refreshed_inputs_equals_replaying_every_trial_from_its_first_block():
    """greedy_layers refreshes the cached block inputs after each choice and replays a candidate from
    its own block; the orders and distances must equal the plain definition (every trial replayed
    from its first condensed block), bit for bit."""
    from compresskit.engine.replay import BlockReplay
    from compresskit.moe.search import batched_distance, greedy_layers

    config = tiny_model("qwen2_moe").config
    config.num_hidden_layers = 5
    config.layer_types = ["full_attention"] * 5
    config.mlp_only_layers = []
    torch.manual_seed(0)
    model = type(tiny_model("qwen2_moe"))(config).eval()
    adapter = get_adapter(model)
    blocks = [i for i in range(adapter.num_blocks) if adapter.is_moe(i)]
    assert len(blocks) == 5
    condensed = {}
    for i in blocks:
        view = adapter.moe(i)
        condensed[i] = build_condensed(view, [i % view.num_experts], [0.7] * view.num_experts, device="cpu")
    paths = {i: adapter.mlp_path(i) for i in blocks}
    ids = torch.randint(1, 8000, (4, 16))

    def plain(replay, budget):
        refs = replay.head(replay.block_inputs[-1], logits=False)
        masks = [replay.token_mask(b) for b in range(replay.num_batches)]
        chosen, dists = [], []
        for _ in range(budget):
            scored = []
            for cand in sorted(condensed):
                if cand in chosen:
                    continue
                trial = [*chosen, cand]
                hidden = replay.run_from(min(trial), {paths[i]: condensed[i] for i in trial})
                scored.append((batched_distance("js", refs, replay.head(hidden, logits=False), masks), cand))
            d, c = min(scored)
            chosen.append(c)
            dists.append(d)
        return chosen, dists

    expected = plain(BlockReplay(adapter, ids, batch_size=2).capture(), 4)
    got = greedy_layers(BlockReplay(adapter, ids, batch_size=2).capture(), paths, condensed, 4)
    assert got == expected
    assert len(set(got[0])) == 4
