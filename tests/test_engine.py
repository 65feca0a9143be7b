"""The sequential engine: replaying recorded block calls reproduces the model exactly."""

from __future__ import annotations

import pytest
import torch

from compresskit.engine import SequentialRunner, capture_block_inputs
from compresskit.models import get_adapter
from tiny_models import tiny_model

FAMILIES = ["llama", "gemma2", "gemma3", "qwen3", "opt", "gpt_neox", "phi3", "mixtral", "deepseek_v3", "llava"]


def _ids(n=6, L=24, seed=0):
    return torch.randint(1, 8192, (n, L), generator=torch.Generator().manual_seed(seed))


def _last_hidden_before_norm(model, ids, attention_mask=None):
    """The last decoder block's output in a plain full-model forward (hooked, not recomputed)."""
    adapter = get_adapter(model)
    seen = {}
    handle = adapter.blocks[-1].register_forward_hook(
        lambda m, i, o: seen.__setitem__("h", (o[0] if isinstance(o, tuple) else o).detach())
    )
    with torch.no_grad():
        model(input_ids=ids, attention_mask=attention_mask)
    handle.remove()
    return seen["h"]


@pytest.mark.parametrize("family", FAMILIES)
def test_replay_reproduces_full_forward(family):
    model = tiny_model(family).eval()
    adapter = get_adapter(model)
    ids = _ids()
    expected = _last_hidden_before_norm(model, ids)
    runner = SequentialRunner(adapter, ids, device="cpu", batch_size=4)  # 6 samples: batches of 4 and 2
    runner.run(lambda ctx: True)
    got = torch.cat(runner._inputs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_per_block_kwargs_are_recorded_per_block():
    """Gemma 2 alternates sliding-window and full attention: blocks get different masks."""
    model = tiny_model("gemma2").eval()
    adapter = get_adapter(model)
    ids = _ids(2, 40)  # longer than the sliding window (16)
    cap = capture_block_inputs(model, adapter.blocks, ids, torch.ones_like(ids), torch.device("cpu"), 2, torch.device("cpu"))
    m0, m1 = cap.calls[0][0].kwargs["attention_mask"], cap.calls[0][1].kwargs["attention_mask"]
    assert not torch.equal(m0, m1)
    assert list(adapter.blocks) == [b for b in model.model.layers]  # recorders removed again


def test_padded_batches_match_per_row_forward():
    model = tiny_model("llama").eval()
    adapter = get_adapter(model)
    ids = _ids(4, 16)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding in one row
    mask[3, :9] = 0
    expected = _last_hidden_before_norm(model, ids, mask)
    runner = SequentialRunner(adapter, ids, mask, device="cpu", batch_size=2)
    runner.run(lambda ctx: True)
    got = torch.cat(runner._inputs)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)


def test_modified_block_outputs_feed_the_next_block():
    model = tiny_model("llama").eval()
    adapter = get_adapter(model)
    ids = _ids(4, 16)
    seen_inputs = []

    def visit(ctx):
        seen_inputs.append(torch.cat(ctx.runner._inputs).clone())
        if ctx.index == 0:
            for lin in adapter.prunable_linears(0).values():
                lin.weight.data.zero_()  # block 0 becomes the identity (residual only)
            return True
        return False

    runner = SequentialRunner(adapter, ids, device="cpu", batch_size=4)
    runner.run(visit)
    # block 1 saw block 0's *modified* output: the embeddings passed through unchanged
    torch.testing.assert_close(seen_inputs[1], seen_inputs[0], rtol=0, atol=0)


def test_unchanged_block_reuses_its_statistics_forward():
    model = tiny_model("llama").eval()
    adapter = get_adapter(model)
    calls = {"n": 0}
    handle = adapter.blocks[0].register_forward_pre_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    runner = SequentialRunner(adapter, _ids(4, 16), device="cpu", batch_size=2)

    def measure_only(ctx):
        ctx.forward()
        return False

    runner.run(measure_only)
    handle.remove()
    assert calls["n"] == 2  # two batches, one forward each: no second pass for an unchanged block


def test_offloaded_activations_give_the_same_result():
    model = tiny_model("qwen2").eval()
    adapter = get_adapter(model)
    ids = _ids(4, 16)
    a = SequentialRunner(adapter, ids, device="cpu", batch_size=2)
    a.run(lambda ctx: True)
    b = SequentialRunner(adapter, ids, device="cpu", batch_size=2, offload_activations=True)
    b.run(lambda ctx: True)
    torch.testing.assert_close(torch.cat(a._inputs), torch.cat(b._inputs), rtol=0, atol=0)
