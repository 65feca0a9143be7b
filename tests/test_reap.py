"""REAP expert removal: lowest saliency removed with its router rows, stock checkpoint, top_k kept."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from compresskit import api
from compresskit.errors import InputError
from compresskit.models import get_adapter
from compresskit.models.adapters.moe import build_unfused
from compresskit.moe.reap import check_removal, kept_experts
from tiny_models import tiny_model, tiny_tokenizer

CALIB = dict(nsamples=4, seqlen=32, device="cpu")


def test_kept_experts_drops_the_lowest_saliency_per_group():
    s = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.2, 0.8, 0.05, 0.7])
    assert kept_experts(s, 3) == [0, 2, 3, 5, 7]  # 0.05, 0.1, 0.2 go
    # two groups of 4: drop the 2 lowest of each (1, 3 | 4, 6)
    assert kept_experts(s, 4, groups=2) == [0, 2, 5, 7]
    with pytest.raises(InputError, match="split evenly"):
        kept_experts(s, 3, groups=2)


def test_removal_leaving_fewer_than_top_k_is_refused():
    check_removal(8, 6, 2)
    with pytest.raises(InputError, match="leaves 1 < top_k = 2"):
        check_removal(8, 7, 2)


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v2", "mixtral", "qwen3_moe", "deepseek_v3"])
def test_reap_output_is_stock_keeps_top_k_and_removes_the_least_salient(family, tiny_model_dir, sotu_jsonl, tmp_path):
    out = tmp_path / "reap"
    outcome = api.prune(str(tiny_model_dir(family)), "reap", calib=f"file:{sotu_jsonl}", out=out,
                        method_options={"remove_experts": 0.5}, **CALIB)
    manifest = json.loads((out / "compresskit.json").read_text())
    assert manifest["loadable_with_transformers"] and manifest["structure"] == []
    details = manifest["method_details"]
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    original = tiny_model(family)
    assert plain.config.num_experts_per_tok == original.config.num_experts_per_tok == 2
    for key, layer in details["layers"].items():
        sal = layer["saliency"]
        assert len(layer["kept"]) == 2 and max(sal[e] for e in layer["removed"]) <= min(sal[e] for e in layer["kept"])
        view = get_adapter(plain).moe(int(key))
        ref = get_adapter(original).moe(int(key))
        assert view.num_experts == 2
        for new, old in zip(view.experts, [ref.experts[e] for e in layer["kept"]]):
            assert torch.equal(new.down, old.down)
        assert torch.equal(view.router.weight, ref.router.weight[layer["kept"]])
    ids = torch.randint(1, 8000, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, outcome.model(ids).logits, rtol=1e-6, atol=1e-6)
        cached = plain.generate(ids[:1, :5], max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = plain.generate(ids[:1, :5], max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)
    assert manifest["parameters"]["total_after"] < manifest["parameters"]["total_before"]


def test_both_layouts_remove_the_same_experts(sotu_jsonl):
    fused = tiny_model("deepseek_v2")
    per_expert = tiny_model("deepseek_v2")
    per_expert.model.layers[1].mlp.experts = build_unfused(per_expert.model.layers[1].mlp.experts)
    kept = []
    for model in (fused, per_expert):
        outcome = api.prune(model, "reap", tokenizer=tiny_tokenizer(), calib=f"file:{sotu_jsonl}",
                            method_options={"remove_experts": 0.25}, **CALIB)
        kept.append(outcome.manifest.method_details["layers"]["1"]["kept"])
        assert get_adapter(model).moe(1).num_experts == 3
    assert kept[0] == kept[1]


def test_group_limited_router_loses_the_same_number_per_group(sotu_jsonl):
    torch.manual_seed(0)
    cfg = transformers.DeepseekV3Config(vocab_size=8192, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=24,
                                        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16, head_dim=8,
                                        moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1,
                                        num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1)
    model = transformers.DeepseekV3ForCausalLM(cfg).eval()
    torch.nn.init.normal_(model.model.layers[1].mlp.gate.weight, std=0.5)
    bias = model.model.layers[1].mlp.gate.e_score_correction_bias
    bias.copy_(torch.arange(8, dtype=torch.float32) / 100)
    outcome = api.prune(model, "reap", tokenizer=tiny_tokenizer(), calib=f"file:{sotu_jsonl}",
                        method_options={"remove_experts": 0.5}, **CALIB)
    kept = outcome.manifest.method_details["layers"]["1"]["kept"]
    assert sum(e < 4 for e in kept) == 2 and sum(e >= 4 for e in kept) == 2
    assert torch.allclose(model.model.layers[1].mlp.gate.e_score_correction_bias,
                          torch.tensor(kept, dtype=torch.float32) / 100)
    assert model.config.n_routed_experts == 4


@pytest.mark.parametrize("family,fraction,needle", [
    ("deepseek_v2", "0.75", "leaves 1 < top_k = 2"),
    ("llama", "0.25", "has no MoE layers"),
    ("deepseek_v2", "1.5", "--remove-experts must be in (0, 1)"),
])
def test_bad_removals_are_one_line_exit_2(cli, tiny_model_dir, sotu_jsonl, tmp_path, family, fraction, needle):
    out = tmp_path / "never"
    res = cli("prune", "--model", tiny_model_dir(family), "--method", "reap", "--remove-experts", fraction,
              "--calib", f"file:{sotu_jsonl}", "--nsamples", "2", "--seqlen", "16", "--out", out, "--device", "cpu")
    assert res.exit_code == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], res.stderr
    assert not out.exists()
