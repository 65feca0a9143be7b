"""CUDA path: the same code on the GPU gives the CPU's result (skipped where no GPU is present)."""

from __future__ import annotations

import pytest
import torch

import compresskit

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("method,kwargs", [("wanda", {"sparsity": 0.5}), ("sparsegpt", {"pattern": "2:4"}),
                                           ("owl", {"sparsity": 0.6})])
def test_cuda_prune_matches_cpu(tiny_model_dir, sotu_jsonl, method, kwargs):
    common = dict(calib=f"file:{sotu_jsonl}", nsamples=8, seqlen=32, batch_size=4, **kwargs)
    cpu = compresskit.prune(str(tiny_model_dir("llama")), method, device="cpu", **common).model
    gpu = compresskit.prune(str(tiny_model_dir("llama")), method, device="cuda", **common).model
    assert next(gpu.parameters()).device.type == "cpu"  # blocks go back to where they were loaded
    for (name, a), (_, b) in zip(cpu.state_dict().items(), gpu.state_dict().items()):
        # same masks up to a handful of near-tied scores; weights equal where both kept them
        agree = ((a == 0) == (b == 0)).float().mean().item()
        assert agree > 0.995, name


# --------------------------------------------------------------------------- EvoPress and heal on the device
# COMPRESSKIT_TEST_DEVICE=cpu runs these on the CPU (how they were checked on a machine without a GPU).
import os  # noqa: E402

DEVICE = os.environ.get("COMPRESSKIT_TEST_DEVICE", "cuda")


def test_evopress_sparsity_search_on_the_device_keeps_the_budget_and_beats_uniform(tiny_model_dir, sotu_jsonl, tmp_path):
    """One block on the device at a time: the level database and the fitness run there, the model
    comes back to the CPU, the budget is exact and the result is no worse than the uniform seed."""
    out = compresskit.prune(str(tiny_model_dir("llama")), "evopress", sparsity=0.5, pruner="sparsegpt",
                            calib=f"file:{sotu_jsonl}", nsamples=8, seqlen=32, batch_size=4, device=DEVICE,
                            load="in-memory", out=tmp_path / "evo", method_options={"generations": 4, "offspring": 4, "tokens": "32,128",
                                                                   "survivors": "2,1", "delete_database": True})
    d = out.manifest.method_details
    assert next(out.model.parameters()).device.type == "cpu"
    assert d["achieved_zeros"] == d["target_zeros"] == out.manifest.sparsity["decoder_linear_zeros"]
    assert d["final_fitness"] <= d["pool_fitness"]["uniform"]
    reloaded = compresskit.load(tmp_path / "evo").state_dict()
    for name, tensor in out.model.state_dict().items():
        assert torch.equal(reloaded[name], tensor), name


def test_evopress_depth_search_on_the_device_removes_a_dead_sublayer(tiny_model_dir, tmp_path):
    import transformers
    from tiny_models import _BASE, tiny_tokenizer

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**_BASE, "num_hidden_layers": 4,
                                                                     "initializer_range": 0.2})).eval()
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    text = tmp_path / "calib.txt"
    text.write_text("Four score and seven years ago our fathers brought forth on this continent a new nation. " * 60)
    out = compresskit.prune(model, "evopress", tokenizer=tiny_tokenizer(), calib=f"file:{text}", calib_format="prefix",
                            nsamples=2, seqlen=32, device=DEVICE,
                            method_options={"level": "sublayer", "remove": 0.25, "generations": 4, "offspring": 4,
                                            "tokens": "16,64", "survivors": "2,1"})
    d = out.manifest.method_details
    assert sorted((r["type"], r["block"]) for r in d["removed"]) == [("attn", 2), ("mlp", 1)]
    assert d["final_fitness"] == pytest.approx(0.0, abs=1e-6)


def test_heal_on_the_device_keeps_the_masks_and_lowers_the_loss(tiny_model_dir, sotu_jsonl, tmp_path):
    from compresskit.heal.workflow import HealSettings, heal

    ckpt = tmp_path / "wanda"
    compresskit.prune(str(tiny_model_dir("llama")), "wanda", sparsity=0.5, out=ckpt, device="cpu",
                      calib=f"file:{sotu_jsonl}", nsamples=4, seqlen=32)
    settings = HealSettings(data=(f"file:{sotu_jsonl}",), steps=8, lr=1e-3, batch_size=2, seqlen=32, warmup=1,
                            save_every=100, eval_every=100)
    outcome = heal(ckpt, tmp_path / "healed", settings, device=DEVICE, teacher_device="cpu")
    details = outcome.record["method_details"]
    assert details["sparsity_kept"]["unchanged_per_tensor"] is True
    assert details["teacher"]["device"] == "cpu"
    assert outcome.losses[-1] < outcome.losses[0]
    before, after = compresskit.load(ckpt).state_dict(), compresskit.load(tmp_path / "healed").state_dict()
    for name, tensor in before.items():
        if name.endswith("proj.weight") and ".layers." in name:
            assert torch.equal(after[name] == 0, tensor == 0), name
