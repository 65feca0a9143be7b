"""Expert statistics (count, avg_w, REAP saliency) against a hand computation on constructed routers."""

from __future__ import annotations

import pytest
import torch
import transformers

from compresskit.models import get_adapter
from compresskit.models.adapters.moe import build_unfused
from compresskit.moe.stats import ExpertStatsHook, collect_expert_stats, expert_act


def _qwen3_moe(num_experts=5, layers=3, top_k=2, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.Qwen3MoeConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      moe_intermediate_size=16, num_experts=num_experts, num_experts_per_tok=top_k,
                                      mlp_only_layers=[], norm_topk_prob=False)
    model = transformers.Qwen3MoeForCausalLM(cfg).eval()
    for layer in model.model.layers:  # the zero-initialised router would tie every score
        torch.nn.init.normal_(layer.mlp.gate.weight, std=0.5)
    return model


@torch.no_grad()
def _by_hand(mlp, x, keep):
    """count, sum_w, saliency sums per expert from the router's own output."""
    _, weights, index = mlp.gate(x)
    views = get_adapter_view(mlp)
    n = views.num_experts
    count, sum_w, sal = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    act = expert_act(views)
    for t in range(x.shape[0]):
        if not keep[t]:
            continue
        for slot in range(index.shape[1]):
            e, w = int(index[t, slot]), float(weights[t, slot])
            v = views.experts[e]
            out = v.down @ (act(v.gate @ x[t]) * (v.up @ x[t]))
            count[e] += 1
            sum_w[e] += w
            sal[e] += w * float(out.double().norm())
    return count, sum_w, sal


def get_adapter_view(mlp):
    from compresskit.models.adapters.moe import build_moe_view

    return build_moe_view(mlp, "mlp", None)


@pytest.mark.parametrize("unfused", [False, True], ids=["fused", "per-expert"])
def test_hook_statistics_match_a_hand_computation_and_skip_padding(unfused):
    model = _qwen3_moe()
    mlp = model.model.layers[1].mlp
    if unfused:
        mlp.experts = build_unfused(mlp.experts)
    view = get_adapter_view(mlp)
    torch.manual_seed(1)
    x = torch.randn(2, 7, 32)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5:] = False  # two padding tokens
    hook = ExpertStatsHook(view)
    with torch.no_grad(), hook:
        hook.new_batch(mask)
        mlp(x)
    count, sum_w, sal = _by_hand(mlp, x.reshape(-1, 32), mask.reshape(-1))
    s = hook.stats
    assert s.tokens == 12
    assert torch.equal(s.count, count) and int(s.count.sum()) == 12 * 2
    torch.testing.assert_close(s.sum_w, sum_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.avg_w, torch.where(count > 0, sum_w / count.clamp_min(1), 0.0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.saliency, torch.where(count > 0, sal / count.clamp_min(1), 0.0), rtol=1e-4, atol=1e-6)


def test_a_forced_router_gives_known_counts_and_weights():
    """Router rows chosen so every token picks experts 3 and 1 with softmax weights we can write down."""
    model = _qwen3_moe(num_experts=4, layers=1)
    mlp = model.model.layers[0].mlp
    with torch.no_grad():
        mlp.gate.weight.zero_()
        mlp.gate.weight[3, 0] = 2.0  # logits (0, 1, 0, 2) for x = e0 + ...
        mlp.gate.weight[1, 0] = 1.0
    x = torch.zeros(1, 5, 32)
    x[..., 0] = 1.0
    hook = ExpertStatsHook(get_adapter_view(mlp), saliency=False)
    with torch.no_grad(), hook:
        mlp(x)
    probs = torch.softmax(torch.tensor([0.0, 1.0, 0.0, 2.0], dtype=torch.float64), -1)
    assert hook.stats.count.tolist() == [0, 5, 0, 5]
    torch.testing.assert_close(hook.stats.avg_w, torch.tensor([0, probs[1], 0, probs[3]], dtype=torch.float64),
                               rtol=1e-6, atol=1e-7)


def test_one_pass_covers_every_moe_layer_with_its_own_statistics():
    model = _qwen3_moe(num_experts=5, layers=3)
    ids = torch.randint(1, 256, (3, 9))
    stats = collect_expert_stats(get_adapter(model), ids, batch_size=2)
    assert sorted(stats) == [0, 1, 2]
    for s in stats.values():
        assert s.num_experts == 5 and s.tokens == 27 and int(s.count.sum()) == 27 * 2
    # layers see different hidden states, so their counts differ (no shared / global counter)
    assert len({tuple(s.count.tolist()) for s in stats.values()}) > 1
