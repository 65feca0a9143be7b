"""Issue 21's fidelity points, each against an independent plain-torch computation.

* CD-MoE ``--expert-weight routed|unconditional``: the expert search weights each candidate by the
  constant it folds, both constants fold exactly (both layouts), the paper's mode (routed, budget)
  is the old formula unchanged, and ``--expert-stop objective`` keeps an expert only while it
  lowers the search's distance;
* CD-MoE's expert search compares the last block's states after the final norm (the reference's
  last ``output_hidden_states`` entry);
* REAP's gate is softmax(router logits) over all experts (the reference's), also on a sigmoid /
  ``e_score_correction_bias`` router (DeepSeek-V3).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from compresskit.models import get_adapter
from compresskit.models.adapters.moe import build_unfused
from compresskit.moe.pipeline import condense_model, search_orders
from compresskit.moe.search import greedy_experts
from compresskit.moe.stats import collect_expert_stats
from tiny_models import tiny_model

EPS = 1e-10


def _ids(seed=0, batch=4, length=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 8000, (batch, length), generator=g)


def _job(model, ids):
    calib = SimpleNamespace(input_ids=ids, attention_mask=None)
    return SimpleNamespace(model=model, adapter=get_adapter(model), device="cpu", batch_size=2, progress=None,
                           calibration_data=lambda: calib)


def _per_expert_layout(model):
    for layer in model.model.layers:
        if hasattr(layer.mlp, "experts") and hasattr(layer.mlp.experts, "gate_up_proj"):
            layer.mlp.experts = build_unfused(layer.mlp.experts)
    return model


def _fused_expert(experts, e, x):
    """f_e(x) from the fused 3-D weights, as the modeling code computes it."""
    gate, up = F.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
    return F.linear(experts.act_fn(gate) * up, experts.down_proj[e])


def _capture(model, ids):
    """Plain hooks on one full forward: per MoE block the MoE input a, its output y, the block output
    h (after the final norm for the last block) and the routing (top-k index and weights)."""
    rec, hooks = {}, []
    layers = model.model.layers
    for i, layer in enumerate(layers):
        if not hasattr(layer.mlp, "experts"):
            continue
        r = rec.setdefault(i, {})
        hooks.append(layer.mlp.register_forward_hook(
            lambda m, a, o, r=r: r.update(a=a[0], y=o[0] if isinstance(o, tuple) else o)))
        hooks.append(layer.mlp.experts.register_forward_pre_hook(lambda m, a, r=r: r.update(idx=a[1], w=a[2])))
        hooks.append(layer.register_forward_hook(
            lambda m, a, o, r=r: r.update(h=o[0] if isinstance(o, tuple) else o)))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    last = len(layers) - 1
    if last in rec:  # the reference's last hidden state is after the final norm; keep the pre-norm one too
        rec[last]["h_pre"] = rec[last]["h"]
        with torch.no_grad():
            rec[last]["h"] = model.model.norm(rec[last]["h"])
    return rec


def _weights(r, num_experts, kind):
    idx, w = r["idx"], r["w"].double()
    sums = torch.zeros(num_experts, dtype=torch.float64).index_add_(0, idx.reshape(-1), w.reshape(-1))
    counts = torch.bincount(idx.reshape(-1), minlength=num_experts).double()
    if kind == "routed":
        return torch.where(counts > 0, sums / counts.clamp_min(1), torch.zeros_like(sums))
    return sums / idx.shape[0]


def _norm(ref, new):
    return float(torch.linalg.vector_norm((ref - new).double()))


def _js(ref, new):
    p, q = F.softmax(ref.reshape(-1, ref.shape[-1]), -1), F.softmax(new.reshape(-1, new.shape[-1]), -1)
    m = 0.5 * (p + q)
    kl = lambda a: (a * ((a + EPS).log() - (m + EPS).log())).sum(-1)  # noqa: E731
    return float((0.5 * (kl(p) + kl(q))).double().mean())


def _shared(mlp, a):
    if hasattr(mlp, "shared_expert_gate"):
        return torch.sigmoid(mlp.shared_expert_gate(a)) * mlp.shared_expert(a)
    return mlp.shared_experts(a)


@torch.no_grad()
def _plain_greedy(model, i, r, weights, budget, stop, last, dist=_js):
    """The greedy expert order written out: h_E = h − y + S(a) + Σ w_e f_e(a), D = ``dist``."""
    mlp = model.model.layers[i].mlp
    post = model.model.norm if i == last else (lambda t: t)
    a, ref = r["a"], r["h"]  # h: after the final norm for the last block
    base = r.get("h_pre", r["h"]) - r["y"] + _shared(mlp, a)
    chosen, dists, current = [], [], dist(ref, post(base)) if stop == "objective" else float("inf")
    for _ in range(budget):
        scored = []
        for c in range(mlp.experts.num_experts):
            if c in chosen:
                continue
            new = base + float(weights[c]) * _fused_expert(mlp.experts, c, a)
            scored.append((dist(ref, post(new)), c))
        d, c = min(scored)
        if stop == "objective" and d >= current:
            break
        current = d
        chosen.append(c)
        dists.append(d)
        base = base + float(weights[c]) * _fused_expert(mlp.experts, c, a)
    return chosen, dists


@pytest.mark.parametrize("family", ["deepseek_v2", "qwen2_moe"])
@pytest.mark.parametrize("weight,stop", [("routed", "budget"), ("unconditional", "budget"),
                                         ("unconditional", "objective")])
def test_expert_search_equals_the_written_out_greedy(family, weight, stop):
    """Orders, distances and folded constants equal a plain-torch greedy over captured activations:
    the search weighs each candidate by the constant it folds, the paper's mode (routed, budget) is
    the old formula, and the last block is compared after the final norm. The Frobenius distance:
    on this random tiny model the hidden-dimension JS is ~1e-8, below the engine's fp32 noise."""
    torch.manual_seed(0)
    model = tiny_model(family).eval()
    ids = _ids()
    job = _job(model, ids)
    orders = search_orders(job, 3, 1, "exact", "norm", weight, stop)
    rec = _capture(model, ids)
    last = len(model.model.layers) - 1
    assert orders.expert_weight == weight and orders.expert_stop == stop
    for i, r in rec.items():
        w = _weights(r, model.model.layers[i].mlp.experts.num_experts, weight)
        assert orders.avg_w[str(i)] == pytest.approx(w.tolist(), rel=1e-5, abs=1e-7)
        chosen, dists = _plain_greedy(model, i, r, orders.avg_w[str(i)], 3, stop, last, _norm)
        assert orders.expert_order[str(i)] == chosen
        assert orders.expert_distances[str(i)] == pytest.approx(dists, rel=1e-4)


def test_paper_mode_is_the_default_and_reproduces_the_old_search_bit_for_bit():
    """Without the new options the search is the pre-issue-21 formula: avg_w = sum_w / count and the
    greedy sum h − y + S + Σ avg_w f_e, here on a block that is not the last (no final norm)."""
    torch.manual_seed(0)
    model = tiny_model("qwen2_moe").eval()
    adapter = get_adapter(model)
    ids = _ids(1)
    seen = {}

    def on_layer(ctx, view, hook):
        if ctx.index != 0:
            return
        s = hook.stats
        old_avg = torch.where(s.count > 0, s.sum_w / s.count.clamp_min(1), torch.zeros_like(s.sum_w)).tolist()
        assert s.expert_weights("routed").tolist() == old_avg
        args = (view, hook.inputs, hook.outputs, ctx.outputs, hook.masks, old_avg, 3, "exact", None, "js")
        seen["default"] = greedy_experts(*args)
        seen["paper"] = greedy_experts(*args, stop="budget", post=None)
        # the old loop, verbatim in effect: no stop, no post
        from compresskit.moe.search import batched_distance
        from compresskit.moe.condense import shared_output
        from compresskit.moe.stats import expert_act, expert_forward
        act = expert_act(view)
        xs = [x.float() for x in hook.inputs]
        refs = [h.float() for h in ctx.outputs]
        bases = [h - y.float() + shared_output(view, x, "exact", None) for h, y, x in zip(refs, hook.outputs, xs)]
        chosen, dists = [], []
        for _ in range(3):
            best = None
            for c in range(view.num_experts):
                if c in chosen:
                    continue
                news = [b + float(old_avg[c]) * expert_forward(view.experts[c], act, x) for b, x in zip(bases, xs)]
                d = batched_distance("js", refs, news, hook.masks)
                if best is None or d < best[0]:
                    best = (d, c)
            chosen.append(best[1])
            dists.append(best[0])
            bases = [b + float(old_avg[best[1]]) * expert_forward(view.experts[best[1]], act, x)
                     for b, x in zip(bases, xs)]
        seen["old"] = (chosen, dists)

    collect_expert_stats(adapter, ids, batch_size=2, on_layer=on_layer, record_io=True)
    assert seen["default"] == seen["paper"] == seen["old"]  # exact equality of floats


@pytest.mark.parametrize("family", ["deepseek_v2", "qwen2_moe"])
@pytest.mark.parametrize("layout", ["fused", "per-expert"])
def test_unconditional_constants_fold_exactly(family, layout):
    """The condensed layer computes Σ (sum_w / tokens)·f_e(x) + S(x) for every token (fp32)."""
    torch.manual_seed(0)
    model = tiny_model(family).eval()
    ref_model = tiny_model(family).eval()  # same seed: the same weights, fused, for f_e
    if layout == "per-expert":
        _per_expert_layout(model)
    ids = _ids(2)
    rec = _capture(ref_model, ids)
    job = _job(model, ids)
    orders = search_orders(job, 2, 1, "exact", "js", "unconditional", "budget")
    i = orders.layer_order[0]
    _, _, report = condense_model(job, orders, 2, 1, "exact", stock=False)
    mlp = ref_model.model.layers[i].mlp
    w = _weights(rec[i], mlp.experts.num_experts, "unconditional")
    kept = orders.expert_order[str(i)][:2]
    assert report[str(i)]["weights"] == pytest.approx([float(w[e]) for e in kept], rel=1e-6)
    x = torch.randn(3, 7, model.config.hidden_size)
    with torch.no_grad():
        expected = _shared(mlp, x) + sum(float(w[e]) * _fused_expert(mlp.experts, e, x) for e in kept)
        torch.testing.assert_close(model.model.layers[i].mlp(x), expected, rtol=1e-5, atol=1e-6)


def test_objective_stop_keeps_an_expert_only_while_it_lowers_the_distance():
    """A constructed DeepSeek layer: experts 0 and 2 carry the routed signal, 1 and 3 output zero.
    With unconditional constants each signal expert lowers the search's distance and the objective
    stop keeps exactly those two; the paper's budget adds a silent expert anyway."""
    torch.manual_seed(0)
    model = tiny_model("deepseek_v2").eval()
    mlp = model.model.layers[1].mlp
    with torch.no_grad():
        keep = torch.zeros_like(mlp.experts.down_proj)
        keep[[0, 2]] = mlp.experts.down_proj[[0, 2]] * 50
        mlp.experts.down_proj.copy_(keep)
    ids = _ids(3)
    budget = search_orders(_job(model, ids), 3, 1, "exact", "js", "unconditional", "budget")
    stopped = search_orders(_job(model, ids), 3, 1, "exact", "js", "unconditional", "objective")
    assert len(budget.expert_order["1"]) == 3 and sorted(budget.expert_order["1"][:2]) == [0, 2]
    assert stopped.expert_order["1"] == budget.expert_order["1"][:2]
    r = rec = _capture(model, ids)[1]
    with torch.no_grad():
        d0 = _js(r["h"], model.model.norm(r["h_pre"] - r["y"] + _shared(mlp, r["a"])))  # shared experts only
    d1, d2 = stopped.expert_distances["1"]
    assert d2 < d1 < d0
    w = _weights(rec, mlp.experts.num_experts, "unconditional")
    order, dists = _plain_greedy(model, 1, rec, w.tolist(), 3, "objective", 1)
    assert order == stopped.expert_order["1"] and dists == pytest.approx([d1, d2], rel=1e-4)


def test_reap_gate_on_a_sigmoid_bias_corrected_router_is_the_references_softmax():
    """DeepSeek-V3 (sigmoid scores, e_score_correction_bias, top-k normalised, scaled by 2.5): the
    saliency uses softmax(router logits) over all experts, averaged over the tokens the model routes
    to the expert — computed here from captured router logits and expert outputs."""
    torch.manual_seed(0)
    model = tiny_model("deepseek_v3").eval()
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.e_score_correction_bias.copy_(torch.tensor([0.3, -0.2, 0.1, 0.0]))
    ids = _ids(4)
    got = collect_expert_stats(get_adapter(model), ids, batch_size=2)
    logits, routing, hooks = {}, {}, []
    for i, layer in enumerate(model.model.layers):
        if hasattr(layer.mlp, "gate"):
            hooks.append(layer.mlp.gate.register_forward_hook(lambda m, a, o, i=i: logits.update({i: o[0]})))
            hooks.append(layer.mlp.experts.register_forward_pre_hook(
                lambda m, a, i=i: routing.update({i: (a[0], a[1])})))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    assert logits
    for i, lg in logits.items():
        x, idx = routing[i]
        experts = model.model.layers[i].mlp.experts
        p = torch.softmax(lg.double(), dim=-1)
        expected = torch.zeros(experts.num_experts, dtype=torch.float64)
        for e in range(experts.num_experts):
            tok = (idx == e).any(-1)
            if tok.any():
                norms = torch.linalg.vector_norm(_fused_expert(experts, e, x[tok]).double(), dim=-1)
                expected[e] = (p[tok, e] * norms).mean()
        torch.testing.assert_close(got[i].saliency, expected, rtol=1e-5, atol=1e-8)
        assert torch.argsort(got[i].saliency).tolist() == torch.argsort(expected).tolist()


def _orders_file(tmp, weight):
    """Orders of the tiny DeepSeek-V2 (one MoE block, 4 experts) as a file, searched with ``weight``."""
    import json

    path = tmp / f"orders-{weight}.json"
    path.write_text(json.dumps({"experts_searched": 1, "layers_searched": 1, "shared_gate": "exact", "distance": "js",
                                "expert_order": {"1": [0]}, "avg_w": {"1": [0.5, 0.5, 0.5, 0.5]},
                                "layer_order": [1], "expert_weight": weight}))
    return path


@pytest.mark.parametrize("args,needle", [
    (["--expert-weight", "sometimes"], "must be one of routed, unconditional"),
    (["--expert-stop", "never"], "must be one of budget, objective"),
    (lambda tmp: ["--from-order", _orders_file(tmp, "unconditional")],
     "the orders hold --expert-weight unconditional constants"),
    (lambda tmp: ["--from-order", _orders_file(tmp, "sometimes")], "not valid CD-MoE orders: expert_weight"),
], ids=["bad-weight", "bad-stop", "from-order-other-weight", "from-order-bad-weight"])
def test_bad_new_options_are_one_error_line_and_write_nothing(tiny_model_dir, sotu_jsonl, tmp_path, args, needle):
    from hostile_harness import run_checked

    extra = args(tmp_path) if callable(args) else args
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "never"
    run_checked(["prune", "--model", tiny_model_dir("deepseek_v2"), "--method", "cdmoe", "--experts", "1", "--layers",
                 "1", *extra, "--calib", f"file:{sotu_jsonl}", "--nsamples", "2", "--seqlen", "16", "--out", out,
                 "--device", "cpu", "--quiet"], needle=needle)
    assert not out.exists()
