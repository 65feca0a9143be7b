"""FinerCut: the removal modules, the greedy search, block removal and the checkpoint forms."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers
from safetensors import safe_open
from tiny_models import _BASE, TINY_FAMILIES, assert_cache_equals_no_cache, tiny_model, tiny_tokenizer

import compresskit
from compresskit.depth.blocks import check_config_rebuilds, delete_blocks
from compresskit.depth.candidates import build_candidates, excluded_front_blocks, put_back_after, target_count
from compresskit.depth.greedy import OutputScorer, StopRule, greedy_search
from compresskit.depth.removal import remove_sublayer, sublayer_swaps
from compresskit.depth.scoring import logits_distance
from compresskit.engine.replay import BlockReplay
from compresskit.models import get_adapter

TEXT = ("The quick brown fox jumps over the lazy dog. " * 3 + "Four score and seven years ago our fathers brought "
        "forth on this continent a new nation, conceived in liberty. ") * 40


def llama(layers: int = 4, seed: int = 0, init: float = 0.2) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**{**_BASE, "num_hidden_layers": layers, "initializer_range": init})
    return transformers.LlamaForCausalLM(cfg).eval()


def ids(n: int = 2, t: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 8000, (n, t), generator=g)


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x, use_cache=False).logits


def search(model, level="sublayer", count=1, one_shot=False, exclude_front=0.0, prefix_cache=True, keep=None):
    adapter = get_adapter(model)
    candidates = build_candidates(adapter, level, keep)
    replay = BlockReplay(adapter, ids(), None).capture()
    scorer = OutputScorer(replay, "js", "code")
    kind = (lambda c: "block") if level == "block" else (lambda c: c.kind)
    return greedy_search(scorer, candidates, StopRule(count=count), lambda c: sublayer_swaps(adapter, c.block, kind(c)),
                         lambda c: remove_sublayer(adapter, c.block, kind(c)), exclude_front=exclude_front,
                         one_shot=one_shot, prefix_cache=prefix_cache)


@pytest.mark.parametrize("kind,block", [("attn", 2), ("mlp", 1)])
def test_dead_sublayer_is_removed_first(kind, block):
    model = llama()
    with torch.no_grad():
        layer = model.model.layers[block]
        (layer.self_attn.o_proj if kind == "attn" else layer.mlp.down_proj).weight.zero_()
    result = search(model, count=2)
    first = result.steps[0]
    assert (first.candidate.kind, first.candidate.block) == (kind, block)
    assert first.distance == 0.0 and result.steps[1].distance > 0.0


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("kind", ["attn", "mlp"])
def test_removing_a_sublayer_equals_zeroing_its_output(family, kind):
    model = tiny_model(family)
    adapter = get_adapter(model)
    x = ids(1, 12)
    if kind == "attn":
        target, zero = adapter.attention(1), (lambda m, a, out: (out[0] * 0, *out[1:]))
    elif adapter.has_mlp_module(1):
        target, zero = adapter.mlp(1), (lambda m, a, out: out * 0)
    else:  # OPT: fc2 output is the MLP branch
        target, zero = adapter.block(1).fc2, (lambda m, a, out: out * 0)
    handle = target.register_forward_hook(zero)
    expected = logits(model, x)
    handle.remove()
    full = logits(model, x)
    remove_sublayer(adapter, 1, kind)
    removed = logits(model, x)
    assert not torch.allclose(full, expected, atol=1e-6)  # the sublayer mattered
    torch.testing.assert_close(removed, expected, rtol=1e-5, atol=1e-5)
    assert sublayer_swaps(adapter, 1, kind) == {}  # already gone: nothing left to remove


@pytest.mark.parametrize("family,block", [("llama", 0), ("llama", 1), ("gemma3", 0), ("qwen3_moe", 0), ("deepseek_v2", 1)])
def test_generate_with_cache_equals_without_after_attention_removal(family, block):
    # A padded batch and eager attention make the mask depend on the cache's length: a removed
    # attention that left its cache slot as an empty full-attention layer gives wrong masks here.
    model = tiny_model(family)
    remove_sublayer(get_adapter(model), block, "attn")
    assert_cache_equals_no_cache(model, "eager")


def test_sublayer_removal_saves_and_loads_identically(tmp_path):
    model = llama()
    (tmp_path / "c.txt").write_text(TEXT)
    out = compresskit.prune(model, "finercut", tokenizer=tiny_tokenizer(), calib=f"file:{tmp_path / 'c.txt'}",
                            nsamples=2, seqlen=32, method_options={"remove": 0.25}, out=tmp_path / "fc", device="cpu")
    m = out.manifest
    assert m.method_details["removed"] == 2 and len(m.method_details["order"]) == 2
    assert m.structure and m.structure[0]["kind"] == "removed_sublayers" and not m.loadable_with_transformers
    x = ids(2, 20, seed=5)
    loaded = compresskit.load(tmp_path / "fc")
    torch.testing.assert_close(logits(loaded, x), logits(out.model, x), rtol=0, atol=0)
    config = json.loads((tmp_path / "fc" / "config.json").read_text())
    skipped = {int(k): v["skip"] for k, v in config["per_layer_config"].items()}
    entry = m.structure[0]
    assert skipped == {i: sorted(k for k, lst in (("attention", entry["attention"]), ("mlp", entry["mlp"])) if i in lst)
                       for i in set(entry["attention"]) | set(entry["mlp"])}
    keys = set()
    for f in (tmp_path / "fc").glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            keys |= set(h.keys())
    for i in entry["attention"]:
        assert not any(k.startswith(f"model.layers.{i}.self_attn.") or k.startswith(f"model.layers.{i}.input_layernorm")
                       for k in keys)
    for i in entry["mlp"]:
        assert not any(k.startswith(f"model.layers.{i}.mlp.") for k in keys)


@pytest.mark.parametrize("family", ["llama", "qwen3_moe", "deepseek_v2", "qwen2", "gpt_neox", "opt", "phi3", "mixtral"])
def test_block_removal_renumbers_and_loads_in_plain_transformers(family, tmp_path):
    model = tiny_model(family)
    cfg = model.config.get_text_config()
    builder = type(model)
    cfg.num_hidden_layers = 4
    if family == "qwen3_moe":
        cfg.mlp_only_layers = [0, 2]
    if hasattr(cfg, "layer_types") and cfg.layer_types is not None:
        cfg.layer_types = [cfg.layer_types[0]] * 4
    torch.manual_seed(1)
    model = builder(cfg).eval()
    adapter = get_adapter(model)
    dense_before = [not adapter.is_moe(i) for i in range(4)]
    x = ids(1, 10)
    keep = delete_blocks(adapter, {1})
    assert keep == [0, 2, 3] and model.config.num_hidden_layers == 3 and adapter.num_blocks == 3
    assert [not adapter.is_moe(j) for j in range(3)] == [dense_before[i] for i in keep]
    for j in range(3):
        assert adapter.attention(j).layer_idx == j
    check_config_rebuilds(model, adapter)
    expected = logits(model, x)
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(reloaded, x), expected, rtol=0, atol=0)


def test_gemma3_layer_types_stay_consistent_after_block_removal(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(**{**_BASE, "num_hidden_layers": 8}, head_dim=16, sliding_window=4)
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    before = list(cfg.layer_types)
    assert before[5] == "full_attention" and before.count("full_attention") == 1
    adapter = get_adapter(model)
    delete_blocks(adapter, {1, 3})
    after = model.config.layer_types
    assert after == [before[i] for i in (0, 2, 4, 5, 6, 7)] and after[3] == "full_attention"
    for j, kind in enumerate(after):
        assert (adapter.attention(j).sliding_window is not None) == (kind == "sliding_attention")
    check_config_rebuilds(model, adapter)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["layer_types"] == after
    x = ids(1, 12)  # longer than the sliding window
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(reloaded, x), logits(model, x), rtol=0, atol=0)


def test_block_level_prune_is_a_stock_checkpoint(tmp_path):
    model = llama()
    (tmp_path / "c.txt").write_text(TEXT)
    out = compresskit.prune(model, "finercut", tokenizer=tiny_tokenizer(), calib=f"file:{tmp_path / 'c.txt'}",
                            nsamples=2, seqlen=32, method_options={"remove": 0.5, "level": "block"},
                            out=tmp_path / "blk", device="cpu")
    d = out.manifest.method_details
    assert out.manifest.loadable_with_transformers and not out.manifest.structure
    assert d["blocks_deleted"] == 2 and d["sublayer_fraction"] == 0.5
    assert json.loads((tmp_path / "blk" / "config.json").read_text())["num_hidden_layers"] == 2
    x = ids(1, 10)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "blk").eval()
    torch.testing.assert_close(logits(reloaded, x), logits(out.model, x), rtol=0, atol=0)


def test_exclude_front_golden_counts():
    # Llama-3-8B: L = 32, x = 0.4 -> blocks 0..12 withheld, put back after 26 removals (methods.md §8.1)
    assert excluded_front_blocks(32, 0.4) == 13
    assert put_back_after(64, 0.4) == 26
    # x = 0: the reference still withholds block 0 from the first step (int(0) + 1 = 1 each)
    assert excluded_front_blocks(32, 0.0) == 1 and put_back_after(64, 0.0) == 1
    assert target_count(64, 0.25) == 16 and target_count(60, 0.3) == 18


def test_exclude_front_withholds_then_puts_back():
    model = llama(layers=4)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.zero_()  # the best candidate sits in the withheld front
    # L = 4, x = 0.3: int(8·0.3/2)+1 = 2 blocks withheld until int(8·0.3)+1 = 3 removals
    result = search(model, count=4, exclude_front=0.3)
    blocks = [s.candidate.block for s in result.steps]
    assert result.withheld_blocks == 2 and result.put_back_after == 3
    assert all(b >= 2 for b in blocks[:3]) and (blocks[3], result.steps[3].candidate.kind) == (0, "mlp")
    assert result.put_back_at_step == 4


def test_exclude_front_zero_still_withholds_block_0_from_the_first_step():
    """The reference at x = 0: int(2L·0/2)+1 = 1 block withheld until int(N·0)+1 = 1 removal, so a
    dead block-0 sublayer goes second, not first (issue 21, methods.md §8.1)."""
    model = llama(layers=3)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.zero_()
    result = search(model, count=2, exclude_front=0.0)
    assert result.withheld_blocks == 1 and result.put_back_after == 1 and result.put_back_at_step == 2
    assert result.steps[0].candidate.block > 0
    assert (result.steps[1].candidate.block, result.steps[1].candidate.kind) == (0, "mlp")


def test_prefix_cache_gives_the_same_order_as_full_replay():
    a = search(llama(layers=3), count=2)
    b = search(llama(layers=3), count=2, prefix_cache=False)
    assert [s.candidate.name for s in a.steps] == [s.candidate.name for s in b.steps]
    for s, t in zip(a.steps, b.steps):
        assert math.isclose(s.distance, t.distance, rel_tol=1e-4, abs_tol=1e-12)
    assert a.block_runs < b.block_runs


def test_one_shot_removes_in_initial_score_order():
    result = search(llama(), count=3, one_shot=True)
    d = [s.distance for s in result.steps]
    assert d == sorted(d)
    greedy = search(llama(), count=1)
    assert result.steps[0].candidate.name == greedy.steps[0].candidate.name


def test_js_code_form_and_textbook_form():
    torch.manual_seed(0)
    ref, new = torch.randn(3, 5, 11), torch.randn(3, 5, 11)
    p, q = ref.double().softmax(-1), new.double().softmax(-1)
    m = (p + q) / 2
    kl = lambda a, b: (a * (a / b).log()).sum(-1)  # noqa: E731
    code = (0.5 * (kl(m, p) + kl(m, q))).mean() / 11  # reference: ½[KL(m‖p)+KL(m‖q)], mean over batch·seq·vocab
    textbook = (0.5 * (kl(p, m) + kl(q, m))).mean()
    got_code = logits_distance("js", [ref[:2], ref[2:]], [new[:2], new[2:]], [None, None], js_form="code")
    got_text = logits_distance("js", [ref], [new], [None], js_form="textbook")
    assert math.isclose(got_code, float(code), rel_tol=1e-9)
    assert math.isclose(got_text, float(textbook), rel_tol=1e-9)
    assert not math.isclose(got_code * 11, got_text, rel_tol=1e-3)  # the two forms differ
    norm = logits_distance("norm", [ref[:1], ref[1:]], [new[:1], new[1:]], [None, None])
    assert math.isclose(norm, float((ref.double() - new.double()).norm()), rel_tol=1e-9)


def test_keep_protects_matching_candidates():
    model = llama()
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.zero_()
    result = search(model, count=1, keep=r"layers\.2\.self_attn")
    assert result.steps[0].candidate.name != "model.layers.2.self_attn"
