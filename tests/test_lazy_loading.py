"""Lazy loading (models/lazy.py, models/lazy_store.py) behind models.placement.onload.

Bit-identity against ``from_pretrained`` for every tiny family and both real MoE fixtures (whose
per-expert keys on disk become fused ``gate_up_proj`` tensors), and the release rules: unchanged
tensors go back to their original source, in-place edits (even through ``weight.data``) and
replaced submodules are spilled and come back exactly.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoConfig

from compresskit.models import get_adapter
from compresskit.models.lazy import LazyUnsupported, is_lazy, load_lazily
from compresskit.models.lazy_store import OriginalSource, SpillSource, lazy_ref
from compresskit.models.loading import auto_class
from compresskit.models.placement import onload
from compresskit.paths import shared_models_dir
from tiny_models import TINY_FAMILIES, tiny_model, tiny_tokenizer

MOE_FIXTURES = ["deepseek-v2-moe-25m", "qwen2-moe-26m"]


def _from_pretrained(path):
    return auto_class(AutoConfig.from_pretrained(path)).from_pretrained(path, dtype="auto")


def _assert_identical(path, ids):
    ref = _from_pretrained(path)
    lazy = load_lazily(path)
    assert is_lazy(lazy)
    adapter = get_adapter(lazy)
    expected = ref.state_dict()
    seen = set()
    for i in range(adapter.num_blocks):
        assert all(t.is_meta for t in adapter.block(i).parameters())
        with onload(adapter.block(i), "cpu") as block:
            for key, value in block.state_dict().items():
                full = f"{adapter.block_name(i)}.{key}"
                seen.add(full)
                assert value.dtype == expected[full].dtype, full
                assert torch.equal(value, expected[full]), full
        assert all(t.is_meta for t in adapter.block(i).parameters())
    for key, value in lazy.state_dict().items():
        if key not in seen:
            assert not value.is_meta, key
            assert value.dtype == expected[key].dtype and torch.equal(value, expected[key]), key
    assert seen | {k for k in lazy.state_dict() if k not in seen} == set(expected)
    with torch.no_grad():  # a plain forward materialises each block for its call
        assert torch.equal(ref(input_ids=ids).logits, lazy(input_ids=ids).logits)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_lazy_blocks_are_bit_identical_to_from_pretrained(family, tmp_path):
    tiny_model(family).save_pretrained(tmp_path)
    _assert_identical(tmp_path, torch.randint(0, 8000, (2, 12)))


@pytest.mark.slow
@pytest.mark.parametrize("name", MOE_FIXTURES)
def test_lazy_moe_fixtures_fuse_experts_exactly_like_from_pretrained(name):
    path = shared_models_dir() / name
    if not path.is_dir():
        pytest.skip(f"{path} not present")
    _assert_identical(path, torch.randint(0, 8000, (2, 16)))


@pytest.fixture
def llama_dir(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path)
    return tmp_path


def test_unchanged_block_returns_to_its_original_source(llama_dir):
    model = load_lazily(llama_dir)
    block = get_adapter(model).block(0)
    with onload(block, "cpu"):
        pass
    refs = [lazy_ref(p) for p in block.parameters()]
    assert all(r is not None and isinstance(r.source, OriginalSource) for r in refs)
    assert model._compresskit_lazy_store.spilled_tensors == 0


def test_edit_through_weight_data_is_spilled_and_kept(llama_dir):
    """Pruners write through ``weight.data`` (no version bump): the content check must catch it."""
    model = load_lazily(llama_dir)
    block = get_adapter(model).block(1)
    with onload(block, "cpu"):
        w = block.self_attn.q_proj.weight
        w.data[:, ::2] = 0
        expected = w.detach().clone()
    assert isinstance(lazy_ref(block.self_attn.q_proj.weight).source, SpillSource)
    assert isinstance(lazy_ref(block.self_attn.k_proj.weight).source, OriginalSource)
    for _ in range(2):  # materialise again: the edit is there, and survives a second release
        with onload(block, "cpu"):
            assert torch.equal(block.self_attn.q_proj.weight, expected)


def test_replaced_submodule_and_renumbered_blocks_keep_changes(llama_dir):
    model = load_lazily(llama_dir)
    adapter = get_adapter(model)
    second = adapter.block(1)
    with onload(second, "cpu"):
        before = second.mlp.down_proj.weight.detach().clone()
        new = nn.Linear(64, 64, bias=False)
        second.self_attn.o_proj = new
        replacement = new.weight.detach().clone()
    assert new.weight.is_meta and isinstance(lazy_ref(new.weight).source, SpillSource)
    del adapter.blocks[0]  # FinerCut-style removal: sources travel with the tensors, not the paths
    with onload(adapter.block(0), "cpu") as block:
        assert torch.equal(block.self_attn.o_proj.weight, replacement)
        assert torch.equal(block.mlp.down_proj.weight, before)


def test_exception_inside_onload_still_keeps_the_edit(llama_dir):
    model = load_lazily(llama_dir)
    block = get_adapter(model).block(0)
    with pytest.raises(RuntimeError), onload(block, "cpu"):
        block.mlp.up_proj.weight.data.zero_()
        raise RuntimeError("boom")
    with onload(block, "cpu"):
        assert not block.mlp.up_proj.weight.any()


def test_spill_files_are_deleted_when_no_longer_referenced(llama_dir):
    model = load_lazily(llama_dir)
    store = model._compresskit_lazy_store
    block = get_adapter(model).block(0)
    for value in (1.0, 2.0, 3.0):
        with onload(block, "cpu"):
            block.mlp.up_proj.weight.data.fill_(value)
    files = sorted(p.name for p in __import__("pathlib").Path(store.spill_dir).iterdir())
    assert len(files) == 1  # earlier spills of the same tensor were superseded and removed


def test_bin_weights_are_refused_with_a_reason(tmp_path):
    model = tiny_model("llama")
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(LazyUnsupported, match="not safetensors"):
        load_lazily(tmp_path)


def test_transformers_without_the_loading_api_falls_back_to_memory(tmp_path, monkeypatch):
    """The lazy path uses transformers-internal loading steps; without them, load in memory and say why."""
    import transformers.conversion_mapping as cm

    from compresskit.checkpoint.reader import open_model

    path = tmp_path / "m"
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    monkeypatch.delattr(cm, "get_model_conversion_mapping")  # from_pretrained holds its own reference
    model = open_model(str(path), lazy=True).model
    assert all(not t.is_meta for t in model.state_dict().values())
    assert model._compresskit_loading.startswith("in-memory:") and "get_model_conversion_mapping" in model._compresskit_loading
