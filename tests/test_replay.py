"""engine/replay.py: replaying from any block reproduces the model's own forward, and swaps apply."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compresskit.engine.replay import BlockReplay, swapped
from compresskit.models import get_adapter
from tiny_models import tiny_model

FAMILIES = ["llama", "gemma3", "qwen2_moe", "deepseek_v2", "opt", "gpt_neox"]


@pytest.mark.parametrize("family", FAMILIES)
def test_replay_from_every_block_equals_full_forward(family):
    torch.manual_seed(0)
    model = tiny_model(family).eval()
    ids = torch.randint(1, 8000, (3, 12))
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits.float()
    replay = BlockReplay(get_adapter(model), ids, batch_size=2).capture()
    assert replay.num_batches == 2
    for start in range(replay.adapter.num_blocks + 1):
        logits = torch.cat(replay.head(replay.run_from(start)))
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


class _Zero(nn.Module):
    def forward(self, x, *args, **kwargs):
        return torch.zeros_like(x)


def test_swaps_apply_inside_and_are_undone():
    torch.manual_seed(0)
    model = tiny_model("llama").eval()
    ids = torch.randint(1, 8000, (2, 10))
    adapter = get_adapter(model)
    replay = BlockReplay(adapter, ids).capture()
    mlp_path = adapter.mlp_path(1)
    original = adapter.mlp(1)
    swapped_out = replay.head(replay.run_from(1, {mlp_path: _Zero()}))[0]
    assert adapter.mlp(1) is original
    with swapped(model, {mlp_path: _Zero()}), torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits.float()
    torch.testing.assert_close(swapped_out, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(swapped_out, replay.head(replay.run_from(1))[0])
