"""Replay-heavy searches on a lazily loaded model read each block from the checkpoint once (issue 17).

``BlockReplay`` holds the lazy store's read cache from ``capture`` to ``release``
(``models.placement.hold_reads``): every replay after the capture takes the converted block from
host memory instead of reading and converting it again (before: one checkpoint read and conversion
per block per replay; the FinerCut search of the DeepSeek fixture took 2.5x its in-memory time).
The outputs stay bit-identical to the in-memory model's, edits are still spilled, the cache keeps
to its budget and a pass without a holder (Wanda / SparseGPT's sequential pass) keeps nothing.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from compresskit.engine.replay import BlockReplay
from compresskit.errors import InputError
from compresskit.models import get_adapter
from compresskit.models.lazy import load_lazily
from compresskit.models.lazy_store import READ_CACHE_ENV, default_read_budget, lazy_ref
from compresskit.models.placement import hold_reads, onload
from tiny_models import tiny_model

LAYERS = 4


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama4")
    torch.manual_seed(0)
    model = tiny_model("llama")
    config = model.config
    config.num_hidden_layers = LAYERS
    torch.manual_seed(0)
    type(model)(config).save_pretrained(path)
    return path


def _recipes(model) -> set[int]:
    return {ref.source.recipe for t in model.state_dict(keep_vars=True).values() if (ref := lazy_ref(t)) is not None}


def _ids(n=4, length=12):
    return torch.randint(1, 8000, (n, length), generator=torch.Generator().manual_seed(1))


def _replays(model, starts=(0, 0, 2, 1, 0)):
    replay = BlockReplay(get_adapter(model), _ids(), device="cpu", batch_size=2).capture()
    outs = [replay.run_from(s) for s in starts]
    logits = replay.head(outs[-1])
    return replay, outs, logits


def test_each_block_is_read_once_over_many_replays_and_outputs_match_memory(llama_dir, monkeypatch):
    monkeypatch.delenv(READ_CACHE_ENV, raising=False)
    lazy = load_lazily(llama_dir)
    store = lazy._compresskit_lazy_store
    recipes = _recipes(lazy)
    assert store.recipe_reads == 0
    replay, outs, logits = _replays(lazy)
    # the capture reads every recipe once; five replays (4 + 4 + 2 + 3 + 4 block runs) read none
    assert store.recipe_reads == len(recipes), (store.recipe_reads, len(recipes))
    cache = store._read_cache
    assert cache is not None and cache.hits == 17 * len(recipes) // LAYERS and len(cache.values) == len(recipes)
    replay.release()
    assert store._read_cache is None  # the cache goes with its last holder
    assert all(lazy_ref(t) is not None for k, t in lazy.state_dict(keep_vars=True).items() if ".layers." in k)

    memory = AutoModelForCausalLM.from_pretrained(llama_dir)
    _, mouts, mlogits = _replays(memory)
    for a, b in zip(outs, mouts):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(torch.equal(x, y) for x, y in zip(logits, mlogits))


def test_without_a_holder_nothing_is_kept(llama_dir):
    """The sequential pass (Wanda, SparseGPT) holds no cache: host memory stays at one block."""
    lazy = load_lazily(llama_dir)
    store = lazy._compresskit_lazy_store
    block = get_adapter(lazy).block(0)
    per_block = len({lazy_ref(t).source.recipe for t in block.state_dict(keep_vars=True).values()})
    for _ in range(3):
        with onload(block, "cpu"):
            pass
    assert store.recipe_reads == 3 * per_block and store._read_cache is None


def test_the_cache_keeps_to_its_budget_first_come_first_kept(llama_dir):
    lazy = load_lazily(llama_dir)
    store = lazy._compresskit_lazy_store
    adapter = get_adapter(lazy)
    block_bytes = sum(t.numel() * t.element_size() for t in adapter.block(0).state_dict(keep_vars=True).values())
    per_block = len(_recipes(lazy)) // LAYERS
    with hold_reads(lazy, budget=2 * block_bytes) as hold:
        for _ in range(3):  # a cyclic scan of 4 blocks through room for 2: blocks 0 and 1 stay, 2 and 3 are read each time
            for i in range(LAYERS):
                with onload(adapter.block(i), "cpu"):
                    pass
        assert hold.cache.nbytes <= 2 * block_bytes
        assert store.recipe_reads == LAYERS * per_block + 2 * 2 * per_block
    assert store._read_cache is None


def test_an_edit_during_a_held_replay_is_spilled_not_served_from_the_cache(llama_dir, tmp_path):
    lazy = load_lazily(llama_dir, spill_root=tmp_path)
    adapter = get_adapter(lazy)
    with hold_reads(lazy):
        with onload(adapter.block(1), "cpu") as block:
            original = block.mlp.down_proj.weight.detach().clone()
            block.mlp.down_proj.weight.data.zero_()
        assert lazy._compresskit_lazy_store.spilled_tensors >= 1
        with onload(adapter.block(1), "cpu") as block:
            assert torch.count_nonzero(block.mlp.down_proj.weight) == 0
        with onload(adapter.block(2), "cpu") as block:  # other blocks still come from the source
            assert torch.count_nonzero(block.mlp.down_proj.weight) > 0
    assert torch.count_nonzero(original) > 0


def test_a_model_in_memory_gets_a_hold_that_does_nothing(llama_dir):
    memory = AutoModelForCausalLM.from_pretrained(llama_dir)
    with hold_reads(memory) as hold:
        assert hold.cache is None


def test_the_budget_comes_from_the_environment_or_half_the_available_memory(monkeypatch):
    monkeypatch.setenv(READ_CACHE_ENV, "0")
    assert default_read_budget() == 0
    monkeypatch.setenv(READ_CACHE_ENV, "512MB")
    assert default_read_budget() == 512 * 1000**2 or default_read_budget() == 512 * 1024**2
    monkeypatch.setenv(READ_CACHE_ENV, "lots")
    with pytest.raises(InputError, match=READ_CACHE_ENV):
        default_read_budget()
    monkeypatch.delenv(READ_CACHE_ENV)
    monkeypatch.setattr("compresskit.models.lazy_store.available_host_memory", lambda: 8 << 30)
    assert default_read_budget() == 4 << 30
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun's ranks on this host share the half
    assert default_read_budget() == 1 << 30


def test_a_hold_lets_the_heap_serve_temporaries_then_restores_the_pinned_threshold(llama_dir):
    """While held, allocations below 32 MiB come from the heap (the search's temporaries are not
    fresh zeroed mappings each time: 3x slower for 8 MiB softmax temporaries); the last hold's close
    puts the 1 MiB threshold of the sequential pass back."""
    from compresskit.models import lazy_store

    lazy = load_lazily(llama_dir)
    if lazy_store.mmap_threshold is None:
        pytest.skip("glibc's mallopt is not available here")
    assert lazy_store.mmap_threshold == lazy_store.MMAP_THRESHOLD
    with hold_reads(lazy):
        with hold_reads(lazy):
            assert lazy_store.mmap_threshold == lazy_store.HELD_MMAP_THRESHOLD
        assert lazy_store.mmap_threshold == lazy_store.HELD_MMAP_THRESHOLD  # one holder left
    assert lazy_store.mmap_threshold == lazy_store.MMAP_THRESHOLD
