"""Parameter / nonzero counts from the config by hand, disk bytes, peak memory, throughput."""

from __future__ import annotations

import pytest
import torch
import transformers

from compresskit.errors import EvaluationError
from compresskit.evaluation import efficiency
from compresskit.evaluation.efficiency import (
    count_nonzeros,
    count_parameters,
    disk_bytes,
    measure_throughput,
    peak_memory,
)
from tiny_models import tiny_model

# tiny llama: vocab 8192, hidden 64, MLP 128, 2 layers, 4 heads × 16 dims, 2 KV heads, untied head
EMBED = 8192 * 64
ATTN = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64  # q, k, v (2 KV heads × 16), o
MLP = 3 * 64 * 128  # gate, up, down
NORMS = 2 * 64
DECODER_LINEAR = 2 * (ATTN + MLP)


class BlocksAdapter:
    """The duck-typed adapter surface efficiency needs: num_blocks + prunable_linears(i)."""

    def __init__(self, model):
        self.blocks = model.model.layers
        self.num_blocks = len(self.blocks)

    def prunable_linears(self, i):
        block = self.blocks[i]
        a, m = block.self_attn, block.mlp
        return {"q": a.q_proj, "k": a.k_proj, "v": a.v_proj, "o": a.o_proj,
                "gate": m.gate_proj, "up": m.up_proj, "down": m.down_proj}


def test_parameter_counts_by_hand():
    model = tiny_model("llama")
    counts = count_parameters(model, BlocksAdapter(model))
    assert counts["params_total"] == 2 * EMBED + 2 * (ATTN + MLP + NORMS) + 64  # + final norm
    assert counts["params_total"] == 1_122_624
    assert counts["params_decoder_linear"] == DECODER_LINEAR == 73_728
    assert count_parameters(model)["params_decoder_linear"] is None


def test_tied_embeddings_counted_once():
    cfg = transformers.LlamaConfig(vocab_size=8192, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert count_parameters(model)["params_total"] == EMBED + 2 * (ATTN + MLP + NORMS) + 64


def test_nonzeros_after_zeroing_known_entries():
    model = tiny_model("llama")
    adapter = BlocksAdapter(model)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[:10] = 0  # 10 rows × 64
        model.model.layers[1].mlp.down_proj.weight[:, :3] = 0  # 64 rows × 3
        model.model.embed_tokens.weight[0] = 0  # outside the decoder linears
    nz = count_nonzeros(model, adapter)
    assert nz["nonzeros_decoder_linear"] == DECODER_LINEAR - 640 - 192
    assert nz["nonzeros_total"] == 1_122_624 - 640 - 192 - 64


def test_disk_bytes(tmp_path):
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"x" * 100)
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"x" * 50)
    (tmp_path / "config.json").write_bytes(b"x" * 7)
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_bytes(b"x" * 20)
    (tmp_path / "link.safetensors").symlink_to(tmp_path / "model-00002-of-00002.safetensors")
    (tmp_path / "dangling.json").symlink_to(tmp_path / "gone.json")
    assert disk_bytes(tmp_path) == 100 + 50 + 7 + 20 + 50
    assert disk_bytes(tmp_path, weights_only=True) == 200
    assert disk_bytes(tmp_path / "config.json") == 7
    with pytest.raises(EvaluationError, match="not found"):
        disk_bytes(tmp_path / "missing")


def test_peak_memory_cpu_is_maxrss_growth(monkeypatch):
    readings = iter([1000, 1500])  # KiB on Linux
    monkeypatch.setattr(efficiency.sys, "platform", "linux")
    monkeypatch.setattr(efficiency.resource, "getrusage", lambda who: type("R", (), {"ru_maxrss": next(readings)}))
    with peak_memory("cpu") as peak:
        pass
    assert (peak.bytes, peak.kind) == (500 * 1024, "cpu_maxrss_delta")


@pytest.mark.filterwarnings("error::FutureWarning")  # the decode loop uses the forward's own cache keyword
def test_throughput_positive_and_restores_use_cache():
    model = tiny_model("llama")
    assert model.config.use_cache is False
    out = measure_throughput(model, prompt_len=8, new_tokens=3, batch_size=2, device="cpu")
    assert out["prefill_tokens_per_s"] > 0 and out["decode_tokens_per_s"] > 0
    assert out["device"] == "cpu" and "cpu" in out["note"]
    assert model.config.use_cache is False and not model.training
    with pytest.raises(EvaluationError):
        measure_throughput(model, new_tokens=0)
