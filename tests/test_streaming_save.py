"""Streaming save (checkpoint/writer.py): save_pretrained's layout and keys, identical logits, atomic.

* keys / shapes / dtypes equal ``save_pretrained``'s (dense Llama; MoE with the per-expert
  "original format"; a tied-embedding model; WeLore factors with the model's own keys);
* sharded output: ``model-0000k-of-0000n.safetensors`` + an index that ``from_pretrained`` reads;
* a streamed save of a dense / pruned / low-rank result loads with identical logits through
  ``from_pretrained`` and ``compresskit.load``;
* a save killed (SIGKILL) after its first shard leaves no output, and the next save removes the
  stale temporary directory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import compresskit
from compresskit.checkpoint import Manifest, save_checkpoint
from compresskit.checkpoint.writer import write_model
from compresskit.models.lazy import load_lazily
from tiny_models import tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def _layout(directory: Path) -> dict[str, tuple]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as handle:
            for key in handle.keys():
                s = handle.get_slice(key)
                out[key] = (tuple(s.get_shape()), s.get_dtype())
    return out


@pytest.mark.parametrize("family,tied", [("llama", False), ("qwen2_moe", False), ("llama", True)])
def test_streamed_keys_shapes_dtypes_equal_save_pretrained(family, tied, tmp_path):
    model = tiny_model(family)
    if tied:
        model.config.tie_word_embeddings = True
        model.tie_weights()
    model.save_pretrained(tmp_path / "hf")
    write_model(model, tmp_path / "streamed")
    assert _layout(tmp_path / "streamed") == _layout(tmp_path / "hf")
    for lazy_model in (load_lazily(tmp_path / "hf"),):  # also from a lazily loaded model
        write_model(lazy_model, tmp_path / "from-lazy")
        assert _layout(tmp_path / "from-lazy") == _layout(tmp_path / "hf")
    assert json.loads((tmp_path / "streamed" / "config.json").read_text()) == \
        json.loads((tmp_path / "hf" / "config.json").read_text())


def test_sharded_streamed_save_loads_with_identical_logits(tmp_path):
    model = tiny_model("qwen2_moe").eval()
    write_model(model, tmp_path / "out", max_shard_size="200KB")
    shards = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert not list((tmp_path / "out").glob(".part-*"))
    ids = torch.randint(0, 8000, (2, 10))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("method,options", [
    ("magnitude", dict(sparsity=0.5)),
    ("welore", dict(method_options={"rank_reduction": 0.5, "min_ratio": 0.0})),
    ("welore", dict(method_options={"rank_reduction": 0.5, "min_ratio": 0.0, "merge": True})),
], ids=["pruned", "lowrank", "lowrank-merged"])
def test_streamed_result_loads_identically_with_from_pretrained_and_compresskit_load(method, options, llama_dir,
                                                                                      tmp_path):
    outcome = compresskit.prune(str(llama_dir), method, device="cpu", out=tmp_path / "out", **options)
    ids = torch.randint(0, 8000, (2, 10))
    with torch.no_grad():
        expected = outcome.model(input_ids=ids).logits  # the lazy model runs block by block
        assert torch.equal(compresskit.load(tmp_path / "out")(input_ids=ids).logits, expected)
        if not outcome.manifest.structure:
            plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
            assert torch.equal(plain(input_ids=ids).logits, expected)


def test_dense_streamed_save_matches_the_input(llama_dir, tmp_path):
    model = load_lazily(llama_dir)
    manifest = Manifest(base_model=str(llama_dir), method="none")
    save_checkpoint(model, tiny_tokenizer(), tmp_path / "out", manifest)
    ids = torch.randint(0, 8000, (2, 10))
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(llama_dir)(input_ids=ids).logits
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "out")(input_ids=ids).logits, a)
        assert torch.equal(compresskit.load(tmp_path / "out")(input_ids=ids).logits, a)


KILLED_SAVE = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from compresskit.checkpoint import Manifest, save_checkpoint
    from compresskit.checkpoint import shards
    from tiny_models import tiny_model
    flush = shards.ShardWriter.flush
    def slow_flush(self):
        flush(self)
        if len(self.files) == 1:
            print("FIRST-SHARD", flush=True)
            time.sleep(60)
    shards.ShardWriter.flush = slow_flush
    save_checkpoint(tiny_model("llama"), None, sys.argv[1], Manifest(base_model="x", method="none"),
                    max_shard_size="100KB")
""")


def test_killed_save_leaves_no_output_and_the_next_save_cleans_up(tmp_path):
    out = tmp_path / "ckpt"
    code = KILLED_SAVE.format(tests=str(ROOT / "tests"))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 120
        line = ""
        while time.time() < deadline and "FIRST-SHARD" not in line:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
        assert "FIRST-SHARD" in line, "the save never wrote its first shard"
        temporaries = [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt.tmp-")]
        assert temporaries and any(temporaries[0].glob(".part-*.safetensors"))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists()
    save_checkpoint(tiny_model("llama"), None, out, Manifest(base_model="x", method="none"))
    assert (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # the stale temporary is gone
