"""FinerCut with every attention sublayer removed: a cache with no attending layer still counts
tokens (depth/removal.py), so generation with KV cache equals generation without; the checkpoint
saves, loads with identical logits and says its form."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from tiny_models import _BASE, assert_cache_equals_no_cache, tiny_model, tiny_tokenizer

import compresskit
from compresskit.depth.removal import RemovedAttention, remove_sublayer
from compresskit.models import get_adapter

TEXT = ("The quick brown fox jumps over the lazy dog. Four score and seven years ago our fathers brought forth on "
        "this continent a new nation, conceived in liberty. ") * 40
LAYERS = 4


@pytest.fixture(scope="module")
def no_attention(tmp_path_factory):
    """A tiny Llama pruned by ``--level attn --remove-params`` = the attention sublayers' share of
    the blocks' parameters: the nearest removal count is all of them."""
    tmp = tmp_path_factory.mktemp("noattn")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**_BASE, "num_hidden_layers": LAYERS})).eval()
    layers = model.model.layers
    block_params = sum(p.numel() for p in layers.parameters())
    attn_params = sum(sum(p.numel() for p in layer.self_attn.parameters()) + layer.input_layernorm.weight.numel()
                      for layer in layers)
    (tmp / "c.txt").write_text(TEXT)
    out = compresskit.prune(model, "finercut", tokenizer=tiny_tokenizer(), calib=f"file:{tmp / 'c.txt'}", nsamples=2,
                            seqlen=32, method_options={"level": "attn", "remove_params": attn_params / block_params},
                            out=tmp / "ck", device="cpu")
    return out, tmp / "ck"


def test_every_attention_is_removed_and_the_form_is_recorded(no_attention, cli):
    out, path = no_attention
    m = out.manifest
    d = m.method_details
    assert d["removed"] == LAYERS and d["attention_removed"] == LAYERS and d["mlp_removed"] == 0
    assert d["achieved_param_fraction"] == pytest.approx(d["requested_param_fraction"]) and d["declined_next"] is None
    assert all(isinstance(layer.self_attn, RemovedAttention) for layer in out.model.model.layers)
    assert m.structure == [{"kind": "removed_sublayers", "attention": list(range(LAYERS)), "mlp": []}]
    assert not m.loadable_with_transformers and "compresskit.load" in m.form_reason
    assert compresskit.inspect(path).structure == m.structure
    config = json.loads((path / "config.json").read_text())
    assert config["num_hidden_layers"] == LAYERS  # no block lost both sublayers: none deleted
    assert config["per_layer_config"] == {str(i): {"skip": ["attention"]} for i in range(LAYERS)}
    res = cli("inspect", path)
    assert res.exit_code == 0, res.stderr
    text = " ".join(res.stdout.split())
    assert "form: compresskit form" in text and f"removed {LAYERS} of {LAYERS} attn candidates ({LAYERS} attention, 0 MLP" in text


@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
def test_generate_with_cache_equals_without(no_attention, attn_impl):
    assert_cache_equals_no_cache(no_attention[0].model, attn_impl)


def test_save_and_load_give_identical_logits_and_generation(no_attention):
    out, path = no_attention
    loaded = compresskit.load(path)
    assert all(isinstance(layer.self_attn, RemovedAttention) for layer in loaded.model.layers)
    x = torch.randint(1, 8000, (2, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x, use_cache=False).logits,
                                   out.model(input_ids=x, use_cache=False).logits, rtol=0, atol=0)
    assert_cache_equals_no_cache(loaded, "eager")


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen3_moe", "deepseek_v2"])
def test_all_attention_removed_other_families(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    for i in range(adapter.num_blocks):
        remove_sublayer(adapter, i, "attn")
    assert_cache_equals_no_cache(model, "eager")
