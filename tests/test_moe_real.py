"""CD-MoE and REAP on the two real trained MoE fixtures of ``../shared/models`` (slow).

The tiny-model tests (test_cdmoe.py, test_reap.py) cover the maths and every form; these check the
same promises on real checkpoints as users get them from disk: the DeepSeek-V2 layout (two shared
experts folded as one MLP, remote-code-free transformers 5 class) and the Qwen2-MoE layout
(sigmoid-gated shared expert). Small calibration (4 × 64) keeps each test to seconds.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from compresskit import api
from compresskit.checkpoint import load
from compresskit.paths import shared_data_dir, shared_models_dir

pytestmark = pytest.mark.slow
CALIB = dict(nsamples=4, seqlen=64, device="cpu")


def _fixture(name: str):
    path = shared_models_dir() / name
    if not path.is_dir():
        pytest.skip(f"{path} not present")
    sotu = shared_data_dir() / "corpora" / "sotu.jsonl"
    if not sotu.is_file():
        pytest.skip(f"{sotu} not present")
    return path, f"file:{sotu}"


def _keys(out) -> list[str]:
    return [k for f in out.glob("*.safetensors") for k in safe_open(str(f), "pt").keys()]


def _bytes(out) -> int:
    return sum(f.stat().st_size for f in out.glob("*.safetensors"))


def test_cdmoe_on_the_real_qwen2_moe_is_stock_smaller_and_exact_on_reload(tmp_path):
    """Constant shared gate → Qwen2-MoE ``mlp_only_layers``: plain from_pretrained, no remote code,
    identical logits to the in-memory result and to compresskit.load; router and experts gone."""
    path, calib = _fixture("qwen2-moe-26m")
    out = tmp_path / "cd"
    outcome = api.prune(str(path), "cdmoe", calib=calib, out=out, method_options={
        "experts": 1, "layers": 2, "shared_gate": "constant"}, **CALIB)
    manifest = json.loads((out / "compresskit.json").read_text())
    assert manifest["loadable_with_transformers"] and manifest["form_reason"].startswith("stock")
    blocks = manifest["method_details"]["condensed_blocks"]
    assert len(blocks) == 2
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    dense_before = json.loads((path / "config.json").read_text())["mlp_only_layers"]
    assert sorted(plain.config.mlp_only_layers) == sorted(set(dense_before) | set(blocks))
    keys = _keys(out)
    for b in blocks:
        assert not any(k.startswith(f"model.layers.{b}.mlp.gate.") or f"layers.{b}.mlp.experts" in k for k in keys)
        assert not any(f"layers.{b}.mlp.shared_expert" in k for k in keys)
    assert _bytes(out) < sum(f.stat().st_size for f in path.glob("*.safetensors"))
    ids = torch.randint(1, 8000, (2, 24))
    with torch.no_grad():
        expected = outcome.model(ids).logits
        torch.testing.assert_close(load(out)(ids).logits, expected, rtol=0, atol=0)
        torch.testing.assert_close(plain(ids).logits, expected, rtol=1e-5, atol=1e-5)
        cached = plain.generate(ids[:1, :8], max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = plain.generate(ids[:1, :8], max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)


def test_cdmoe_on_the_real_deepseek_v2_keeps_the_exact_gate_free_fold_and_generation(tmp_path):
    """DeepSeek-V2: condensed layers that are not a prefix → compresskit form (the manifest says why);
    compresskit.load reproduces the logits bit for bit and KV-cache generation equals no-cache."""
    path, calib = _fixture("deepseek-v2-moe-25m")
    out = tmp_path / "cd"
    outcome = api.prune(str(path), "cdmoe", calib=calib, out=out, method_options={"experts": 2, "layers": 3}, **CALIB)
    manifest = json.loads((out / "compresskit.json").read_text())
    details = manifest["method_details"]
    blocks = details["condensed_blocks"]
    assert len(blocks) == 3
    first = json.loads((path / "config.json").read_text())["first_k_dense_replace"]
    prefix = sorted(blocks) == list(range(first, first + len(blocks)))  # stock only when they extend the dense prefix
    assert manifest["loadable_with_transformers"] is prefix
    assert manifest["form_reason"].startswith("stock" if prefix else "compresskit structure")
    for b in blocks:  # every chosen layer has its greedy order of 2 routed experts
        assert len(details["orders"]["expert_order"][str(b)]) >= 2
    assert manifest["parameters"]["total_after"] < manifest["parameters"]["total_before"]
    model = load(out)
    ids = torch.randint(1, 8000, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, outcome.model(ids).logits, rtol=0, atol=0)
        cached = model.generate(ids[:1, :8], max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = model.generate(ids[:1, :8], max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)


def test_reap_on_the_real_deepseek_v2_is_a_stock_checkpoint_with_top_k_kept(tmp_path):
    path, calib = _fixture("deepseek-v2-moe-25m")
    out = tmp_path / "reap"
    outcome = api.prune(str(path), "reap", calib=calib, out=out, method_options={"remove_experts": 0.25}, **CALIB)
    before = json.loads((path / "config.json").read_text())
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert plain.config.num_experts_per_tok == before["num_experts_per_tok"]
    assert plain.config.n_routed_experts == before["n_routed_experts"] - round(0.25 * before["n_routed_experts"])
    assert _bytes(out) < sum(f.stat().st_size for f in path.glob("*.safetensors"))
    ids = torch.randint(1, 8000, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, outcome.model(ids).logits, rtol=1e-5, atol=1e-5)
