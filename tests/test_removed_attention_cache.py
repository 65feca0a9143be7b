"""KV cache after attention removal on a model that mixes sliding-window and full attention.

Gemma-3 reads the cache's length and mask sizes from the first slot of each layer type; a removed
attention's slot must answer them for its own type (depth/removal.py). The window (4) is shorter
than prompt + generated tokens (14), so a slot that answered with the wrong length or window
gives other masks, and other tokens or scores, than the cache-free run.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from tiny_models import _BASE, assert_cache_equals_no_cache

from compresskit.depth.removal import RemovedAttention, remove_sublayer
from compresskit.models import get_adapter

TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
PATTERNS = {
    "first-sliding": [0],
    "first-full": [1],
    "last-full": [3],
    "every-full": [1, 3],
    "every-sliding": [0, 2],
    "first-and-last": [0, 3],
    "all": [0, 1, 2, 3],
}


def gemma3(seed: int = 0) -> transformers.PreTrainedModel:
    cfg = transformers.Gemma3TextConfig(**{**_BASE, "num_hidden_layers": 4}, head_dim=16, sliding_window=4,
                                        layer_types=list(TYPES))
    torch.manual_seed(seed)
    return transformers.Gemma3ForCausalLM(cfg).eval()


def test_the_window_matters_here():
    # Without this, every test below could pass with a slot that ignores the window.
    model = gemma3()
    x = torch.randint(1, 8000, (1, 14), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        windowed = model(input_ids=x, use_cache=False).logits
        model.config.sliding_window = 64
        wide = model(input_ids=x, use_cache=False).logits
    assert not torch.allclose(windowed[:, -1], wide[:, -1], atol=1e-4)


@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_generate_with_cache_equals_without(pattern, attn_impl):
    model = gemma3()
    adapter = get_adapter(model)
    for i in PATTERNS[pattern]:
        remove_sublayer(adapter, i, "attn")
    assert [isinstance(adapter.attention(i), RemovedAttention) for i in range(4)] == [i in PATTERNS[pattern] for i in range(4)]
    assert_cache_equals_no_cache(model, attn_impl)


@pytest.mark.parametrize("pattern", ["first-sliding", "every-full", "all"])
def test_every_slot_counts_the_tokens(pattern):
    # A hand-written decode loop (eval --efficiency) asks the cache's length from slot 0 and
    # transformers from the first slot of each type: each must give the tokens seen so far.
    model = gemma3()
    adapter = get_adapter(model)
    for i in PATTERNS[pattern]:
        remove_sublayer(adapter, i, "attn")
    cache = transformers.DynamicCache(config=model.config)
    x = torch.randint(1, 8000, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model(input_ids=x, past_key_values=cache, use_cache=True)
        for step in range(3):
            nxt = out.logits[:, -1:].argmax(-1)
            out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
    for i in range(4):
        assert out.past_key_values.get_seq_length(i) == 9
    for i in PATTERNS[pattern]:  # what a removed slot holds: one head, one channel of zeros, nothing else
        keys = out.past_key_values.layers[i].keys
        assert keys.shape[1] == 1 and keys.shape[-1] == 1 and not keys.any()
