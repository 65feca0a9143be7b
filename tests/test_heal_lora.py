"""``heal --train lora``: peft adapters saved beside the checkpoint load with ``PeftModel`` and give
compresskit's logits; ``--merge`` keeps the checkpoint's kind (a sparse one keeps its masks)."""

from __future__ import annotations

import json
from types import SimpleNamespace
from pathlib import Path

import pytest
import torch

import compresskit
from compresskit.checkpoint import MANIFEST_NAME
from compresskit.heal.lora import load_healed
from compresskit.heal.workflow import HealSettings, heal


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def wanda_ckpt(tmp_path_factory, tiny_model_dir, sotu_jsonl) -> Path:
    out = tmp_path_factory.mktemp("lora") / "wanda50"
    compresskit.prune(str(tiny_model_dir("llama")), "wanda", sparsity=0.5, out=out, device="cpu",
                      calib=f"file:{sotu_jsonl}", nsamples=4, seqlen=32)
    return out


def _settings(sotu: Path, **kw) -> HealSettings:
    base = dict(data=(f"file:{sotu}",), steps=4, lr=5e-3, batch_size=2, seqlen=32, warmup=0, save_every=100,
                train="lora", lora_rank=4)
    return HealSettings(**{**base, **kw})


def _logits(model) -> torch.Tensor:
    ids = torch.randint(0, 8192, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_an_adapter_loads_with_peft_and_gives_compresskits_logits(wanda_ckpt, sotu_jsonl, tmp_path):
    from peft import PeftModel

    base_files = {p.name: p.read_bytes() for p in wanda_ckpt.glob("*.safetensors")}
    outcome = heal(wanda_ckpt, tmp_path / "adapter", _settings(sotu_jsonl, lora_targets="q_proj,v_proj,down_proj"),
                   device="cpu")
    out = outcome.out
    assert outcome.adapter and {"adapter_config.json", "adapter_model.safetensors", "heal.json"} <= {p.name for p in out.iterdir()}
    assert not (out / MANIFEST_NAME).exists()  # an adapter, not a checkpoint
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(wanda_ckpt.resolve()) and config["r"] == 4
    assert set(config["target_modules"]) == {"q_proj", "v_proj", "down_proj"}

    peft_model = PeftModel.from_pretrained(compresskit.load(config["base_model_name_or_path"]), str(out)).eval()
    healed = _logits(peft_model)
    assert torch.equal(healed, _logits(outcome.model))
    assert torch.equal(healed, _logits(load_healed(out)))
    assert not torch.equal(healed, _logits(compresskit.load(wanda_ckpt)))  # the adapter changed something
    # the base checkpoint is untouched: its masks are intact
    assert {p.name: p.read_bytes() for p in wanda_ckpt.glob("*.safetensors")} == base_files
    record = json.loads((out / "heal.json").read_text())
    assert record["method"] == "heal" and record["method_details"]["lora"]["rank"] == 4
    assert record["method_details"]["trainable_params"] == sum(p.numel() for n, p in peft_model.named_parameters()
                                                               if "lora_" in n)
    assert len(record["method_details"]["lora"]["adapted_modules"]) == 2 * 3  # 2 blocks × 3 targets

    # --force replaces an adapter directory heal wrote (and nothing else)
    again = heal(wanda_ckpt, out, _settings(sotu_jsonl, steps=1), device="cpu", force=True)
    assert again.record["method_details"]["steps"] == 1
    assert json.loads((out / "heal.json").read_text())["method_details"]["steps"] == 1
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")) == []  # no temporaries
    # an interrupted save leaves the earlier adapter directory as it was, and no temporary
    import compresskit.heal.lora as lora_module

    calls = []

    def fail(*args, **kwargs):  # heal.json is the last file written into the temporary directory
        calls.append(sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-")))
        raise KeyboardInterrupt

    before = {p.name: p.read_bytes() for p in out.iterdir()}
    original = lora_module.json
    lora_module.json = SimpleNamespace(dumps=fail, loads=json.loads)  # this module's json only
    try:
        with pytest.raises(KeyboardInterrupt):
            heal(wanda_ckpt, out, _settings(sotu_jsonl, steps=1), device="cpu", force=True)
    finally:
        lora_module.json = original
    assert len(calls) == 1 and len(calls[0]) == 1  # it failed inside the save, with the adapter written
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")) == []


def test_merging_into_a_sparse_checkpoint_keeps_every_mask(wanda_ckpt, sotu_jsonl, tmp_path):
    heldout = tmp_path / "heldout.txt"
    heldout.write_text("Call me Ishmael. Some years ago, never mind how long precisely, having little money. " * 8)
    outcome = heal(wanda_ckpt, tmp_path / "merged", _settings(sotu_jsonl, merge=True, eval_data=f"file:{heldout}",
                                                              eval_windows=1, eval_every=4), device="cpu")
    before, after = compresskit.load(wanda_ckpt).state_dict(), compresskit.load(outcome.out).state_dict()
    assert before.keys() == after.keys()  # a plain checkpoint again, no adapter tensors
    linears = [k for k in before if k.endswith("proj.weight")]
    for key in linears:
        assert torch.equal(after[key] == 0, before[key] == 0), key
        assert not torch.equal(after[key], before[key]), key
    details = outcome.record["method_details"]
    assert "masks re-applied" in details["lora"]["merge"] and details["sparsity_kept"]["unchanged_per_tensor"]
    assert outcome.record["structure"] == [] and outcome.record["loadable_with_transformers"] is True
    assert details["evals"][-1]["after"] == "merge with the masks re-applied"


def test_merging_into_a_block_removed_checkpoint_gives_the_adapters_logits(tiny_model_dir, sotu_jsonl, tmp_path):
    blk = tmp_path / "blk"
    compresskit.prune(str(tiny_model_dir("llama")), "finercut", out=blk, device="cpu", calib=f"file:{sotu_jsonl}",
                      nsamples=4, seqlen=32, method_options={"remove": 0.5, "level": "block"})
    adapter = heal(blk, tmp_path / "adapter", _settings(sotu_jsonl), device="cpu")
    merged = heal(blk, tmp_path / "merged", _settings(sotu_jsonl, merge=True), device="cpu")
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(merged.out).eval()  # stock stays stock
    torch.testing.assert_close(_logits(plain), _logits(load_healed(adapter.out)), rtol=0, atol=1e-5)
