"""EvoPress's sparsity search (--method evopress --level matrix): levels, database, fitness, search, resume."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from compresskit import api
from compresskit.analysis.distances import token_kl
from compresskit.pruning import Pattern, matrix_mask, wanda_prune_
from compresskit.search.database import level_codes, pack_bits, row_counts, top_up, unpack_bits, weight_at
from compresskit.search.evolution import level_switch
from compresskit.search.levels import LevelPlan, default_level_step, round_to_budget

RUN = dict(nsamples=8, seqlen=32, batch_size=4, device="cpu")
FAST = {"generations": 4, "offspring": 4, "tokens": "32,128", "survivors": "2,1"}


@pytest.fixture
def calib(sotu_jsonl) -> str:
    return f"file:{sotu_jsonl}"


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matmuls: one thread (beside the other xdist worker two threads spin: 23 ms per 64-wide linear)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------ pure parts
def test_level_switch_keeps_the_exact_zero_count_across_shapes():
    shapes = [(64, 64), (32, 64), (128, 64), (64, 128), (8, 16)]  # q, k, gate, down, a tiny expert
    numels = [r * c for r, c in shapes]
    plan = LevelPlan.build(numels, 0.6, 8, default_level_step(0.6, 8, 64))
    assert plan.step == int(0.5 * 0.4 / 8 * 64 * 64)
    assert plan.low[-1] == plan.high[-1] == 0  # 128 weights cannot move by 102 zeros: frozen at level 0
    budget = sum(int(n * 0.6) for n in numels)
    rng = random.Random(0)
    levels = [0] * len(numels)
    for _ in range(500):
        levels = level_switch(levels, [0] * len(numels), plan.low, plan.high, rng)
        assert plan.total_zeros(levels) == budget
        assert all(0 <= plan.zeros(i, lv) <= n for i, (lv, n) in enumerate(zip(levels, numels)))


def test_level_codes_give_exact_counts_and_are_wandas_masks():
    torch.manual_seed(0)
    w = torch.randn(24, 40)
    stat = torch.rand(40) + 0.1
    scores = (w.abs() * stat.sqrt())
    zeros = [0, 100, 240, 333, 480, 959]  # 240 and 480: multiples of the 24 rows
    code = level_codes(scores, zeros, per_row=True)
    for j, z in enumerate(zeros):
        pruned = code <= j
        assert int(pruned.sum()) == z
        assert torch.equal(pruned.sum(1), row_counts(z, 24))
        if z % 24 == 0 and z:
            ref = w.clone()
            mask = wanda_prune_(ref, stat, z / w.numel(), Pattern.unstructured())
            assert torch.equal(pruned, mask)
            assert torch.equal(weight_at(w, code, j), ref)
    # magnitude: the whole matrix is the group, exactly matrix_mask's k smallest
    code = level_codes(w.abs(), zeros, per_row=False)
    for j, z in enumerate(zeros):
        if z:
            assert torch.equal(code <= j, matrix_mask(w.abs(), z / w.numel()))


def test_top_up_reaches_the_count_with_the_smallest_survivors():
    w = torch.tensor([[5.0, -0.1, 3.0, 0.2], [1.0, 2.0, -0.05, 4.0]])
    pruned = torch.zeros_like(w, dtype=torch.bool)
    pruned[0, 0] = True
    w[0, 0] = 0
    assert top_up(w, pruned, 3) == 3
    assert pruned.tolist() == [[True, True, False, False], [False, False, True, False]]
    assert (w[pruned] == 0).all()


def test_sparse_level_storage_round_trips():
    import numpy as np

    for n in (1, 7, 8, 9, 1001):
        flags = torch.rand(n, generator=torch.Generator().manual_seed(n)) > 0.5
        packed = pack_bits(flags)
        assert np.array_equal(packed.numpy(), np.packbits(flags.numpy()))
        assert torch.equal(unpack_bits(packed, n), flags)


def test_round_to_budget_and_seed_conversion():
    assert round_to_budget([0.6, -0.4, 0.2, -0.4], [-2] * 4, [2] * 4, 0) == [1, 0, 0, -1]
    assert sum(round_to_budget([3.7, 3.7, -1.2], [-2] * 3, [2] * 3, 0)) == 0
    plan = LevelPlan.build([4096, 2048, 8192], 0.5, 8, 128)
    # a heuristic giving the first matrix more, the last less, parameter-weighted mean 0.5
    levels = plan.from_ratios([0.55, 0.5, 0.475])
    assert sum(levels) == 0 and levels[0] > 0 > levels[2]
    assert abs(plan.zeros(0, levels[0]) / 4096 - 0.55) <= 128 / 4096


# --------------------------------------------------------------------------------------------- models
def _model_dir(tmp_path_factory, layers: int = 2, fragile: int | None = None) -> Path:
    """A tiny llama; ``fragile``: that block's down_proj scaled by 8 (its output dominates the residual)."""
    from tiny_models import tiny_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8192, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
                         bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    if fragile is not None:
        with torch.no_grad():
            model.model.layers[fragile].mlp.down_proj.weight.mul_(8.0)
    path = tmp_path_factory.mktemp(f"evo-llama{layers}-{fragile}")
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return _model_dir(tmp_path_factory)


def _prune(src, out, calib, pruner="wanda", options=None, **kw):
    return api.prune(str(src), "evopress", sparsity=0.5, pruner=pruner, calib=calib, out=out,
                     method_options={**FAST, **(options or {})}, **{**RUN, **kw})


def _weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def test_fragile_layer_ends_with_the_lowest_sparsity(tmp_path_factory, tmp_path, calib):
    src = _model_dir(tmp_path_factory, layers=4, fragile=2)
    outcome = api.prune(str(src), "evopress", sparsity=0.5, pruner="magnitude", calib=calib, include="down_proj",
                        method_options={"generations": 12, "offspring": 6, "tokens": "32,128", "survivors": "2,1"},
                        out=tmp_path / "out", **RUN)
    d = outcome.manifest.method_details
    levels = d["levels_per_matrix"]
    fragile = "model.layers.2.mlp.down_proj"
    assert levels[fragile] == min(levels.values()) < 0
    assert d["sparsity_per_matrix"][fragile] == min(d["sparsity_per_matrix"].values()) < 0.5
    assert d["final_fitness"] < d["seed_fitness"]["uniform"]
    assert d["achieved_zeros"] == d["target_zeros"] == outcome.manifest.sparsity["decoder_linear_zeros"]


def test_uniform_seed_fitness_is_the_kl_of_magnitude_pruning_and_the_search_beats_it(tiny_dir, tmp_path, calib):
    """The seed ``uniform`` under magnitude is exactly ``--method magnitude``: its fitness must equal
    an independent whole-model KL — on the first draw's random sequences (the reference's minibatch:
    distinct random samples, the last cut to the exact count) and on every calibration token — and
    the search's final fitness (on every calibration token) may not be worse."""
    from compresskit.calibration import CalibrationSpec, load_calibration
    from compresskit.models import load_model
    from compresskit.search.fitness import draw_sequences

    outcome = _prune(tiny_dir, tmp_path / "evo", calib, pruner="magnitude", options={"tokens": "32,80"})
    d = outcome.manifest.method_details
    assert d["final_fitness"] <= d["pool_fitness"]["uniform"]
    assert d["final_fitness"] == d["pool_fitness"][d["final_choice"]] and d["pool_tokens"] == 8 * 32
    assert d["seed_winner"] == "uniform"

    dense, tok = load_model(str(tiny_dir))
    pruned, _ = load_model(str(tiny_dir))
    for name, module in pruned.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            w = module.weight.data
            w.masked_fill_(matrix_mask(w.abs(), int(w.numel() * 0.5) / w.numel()), 0)
    data = load_calibration(CalibrationSpec(source=calib, nsamples=8, seqlen=32, seed=0), tok)

    def kl(rows: list[tuple[int, int]]) -> float:
        per_token = []
        with torch.no_grad():
            for i, length in rows:
                ids = data.input_ids[i : i + 1, :length]
                per_token.append(token_kl(dense(ids).logits[:, :-1].float(), pruned(ids).logits[:, :-1].float()).reshape(-1))
        return float(torch.cat(per_token).mean())

    first = draw_sequences(80, 8, 32, 0, (0, 1))  # the seeds' draw: generation 0, the last stage
    assert sorted(length for _, length in first) == [16, 32, 32] and len({i for i, _ in first}) == 3
    assert first != draw_sequences(80, 8, 32, 0, (1, 1))  # every generation draws afresh
    assert d["seed_fitness"]["uniform"] == pytest.approx(kl(first), rel=1e-4)
    assert d["pool_fitness"]["uniform"] == pytest.approx(kl([(i, 32) for i in range(8)]), rel=1e-4)


def test_deterministic_and_database_reuse_is_bit_identical(tiny_dir, tmp_path, calib, monkeypatch):
    # a cache of its own: another test (or xdist worker) searching the same tiny model would build this key first
    monkeypatch.setenv("COMPRESSKIT_CACHE_DIR", str(tmp_path / "cache"))
    first = _prune(tiny_dir, tmp_path / "a", calib)
    second = _prune(tiny_dir, tmp_path / "b", calib, load="in-memory")
    a, b = first.manifest.method_details, second.manifest.method_details
    assert not a["database"]["reused"] and b["database"]["reused"]
    assert a["database"]["key"] == b["database"]["key"]
    assert a["levels_per_matrix"] == b["levels_per_matrix"]
    assert [h["best_fitness"] for h in a["fitness_history"]] == [h["best_fitness"] for h in b["fitness_history"]]
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # a rebuilt database gives the same bits again; another search seed searches differently
    third = _prune(tiny_dir, tmp_path / "c", calib, options={"rebuild_database": True, "seed": 1})
    c = third.manifest.method_details
    assert not c["database"]["reused"] and c["database"]["key"] == a["database"]["key"]
    assert c["pool_fitness"]["uniform"] == a["pool_fitness"]["uniform"]  # the seed's KL on all tokens: same bits


def test_resume_after_interrupt_equals_uninterrupted(tiny_dir, tmp_path, calib):
    options = {"generations": 6}
    full = _prune(tiny_dir, tmp_path / "full", calib, options=options).manifest.method_details

    def interrupt(phase, done, total, label=""):
        if phase == "evopress" and done == 3:
            raise KeyboardInterrupt

    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        _prune(tiny_dir, out, calib, options=options, progress=interrupt)
    assert not out.exists()  # Ctrl-C writes no checkpoint
    state = json.loads((tmp_path / "cut.search-state" / "state.json").read_text())
    assert state["state"]["generation"] == 3
    # a fresh run would overwrite an unfinished search: refused
    from compresskit.errors import InputError

    with pytest.raises(InputError, match="--resume"):
        _prune(tiny_dir, out, calib, options=options)
    with pytest.raises(InputError, match="search_seed"):
        _prune(tiny_dir, out, calib, options={**options, "resume": True, "seed": 5})
    resumed = _prune(tiny_dir, out, calib, options={**options, "resume": True}).manifest.method_details
    assert resumed["resumed_from_generation"] == 3
    assert resumed["levels_per_matrix"] == full["levels_per_matrix"]
    assert resumed["final_fitness"] == full["final_fitness"]
    assert [h["best_fitness"] for h in resumed["fitness_history"]] == [h["best_fitness"] for h in full["fitness_history"]]
    assert resumed["tokens_seen"] == full["tokens_seen"]


def test_sparsegpt_levels_are_exact_and_the_output_holds_them(tiny_dir, tmp_path, calib):
    outcome = _prune(tiny_dir, tmp_path / "sgpt", calib, pruner="sparsegpt", options={"delete_database": True})
    d = outcome.manifest.method_details
    assert d["database"]["kind"] == "weights" and d["database"]["deleted"]
    assert not Path(d["database"]["path"]).exists()
    assert d["achieved_zeros"] == d["target_zeros"] == outcome.manifest.sparsity["decoder_linear_zeros"]
    saved = _weights(tmp_path / "sgpt")
    for name, s in d["sparsity_per_matrix"].items():
        w = saved[f"{name}.weight"]
        assert int((w == 0).sum()) == round(s * w.numel())


def test_sparsegpt_database_of_a_float32_model_stores_bfloat16_values_unless_asked(tiny_dir, tmp_path, calib):
    """--database-dtype auto keeps a float32 model's SparseGPT levels in bfloat16 (about half the disk);
    the budget stays exact and the output holds bfloat16-representable weights. ``model`` keeps float32."""
    runs = {}
    for choice in ("auto", "model"):
        outcome = _prune(tiny_dir, tmp_path / choice, calib, pruner="sparsegpt",
                         # dense inputs: both runs' statistics are then the same (with uniform inputs the
                         # bfloat16 base levels feed the next blocks, so later Hessians differ by design)
                         options={"delete_database": True, "database_dtype": choice, "generations": 0,
                                  "database_inputs": "dense"})
        d = outcome.manifest.method_details
        assert d["achieved_zeros"] == d["target_zeros"] == outcome.manifest.sparsity["decoder_linear_zeros"]
        runs[choice] = (d, _weights(tmp_path / choice))
    (auto, auto_w), (full, full_w) = runs["auto"], runs["model"]
    assert auto["database"]["values_dtype"] == "bfloat16" and full["database"]["values_dtype"] == "float32"
    assert auto["database"]["key"] != full["database"]["key"]
    # values: 2 bytes instead of 4 per surviving weight, the bit mask unchanged (plus file headers)
    assert 0.45 < auto["database"]["bytes"] / full["database"]["bytes"] < 0.7
    names = list(auto["levels_per_matrix"])
    for name in names:
        a, f = auto_w[f"{name}.weight"], full_w[f"{name}.weight"]
        assert torch.equal(a, a.to(torch.bfloat16).float())          # bfloat16 values
        assert torch.equal(a == 0, f == 0)                             # the same masks (uniform seed: same levels)
        assert torch.equal(a, f.to(torch.bfloat16).float())            # = float32 SparseGPT, rounded once
    assert not all(torch.equal(full_w[f"{n}.weight"], full_w[f"{n}.weight"].to(torch.bfloat16).float()) for n in names)


@pytest.mark.parametrize("pruner", ["wanda", "sparsegpt"])
def test_the_database_follows_the_uniform_path_so_its_uniform_vector_is_the_shipped_pruning(tiny_dir, tmp_path, calib,
                                                                                           pruner):
    """--database-inputs uniform (default): block i's statistics see the model whose earlier blocks
    are at the base level, as sequential Wanda / SparseGPT prune, so the uniform seed's weights are
    exactly ``--method wanda`` / ``sparsegpt``'s; the reference's dense inputs give other weights."""
    shipped = _weights_of(api.prune(str(tiny_dir), pruner, sparsity=0.5, calib=calib, out=tmp_path / "ref", **RUN))
    runs = {}
    for inputs in ("uniform", "dense"):
        outcome = _prune(tiny_dir, tmp_path / inputs, calib, pruner=pruner,
                         options={"generations": 0, "database_inputs": inputs, "delete_database": True,
                                  "database_dtype": "model"})
        assert outcome.manifest.method_details["database"]["inputs"] == inputs
        runs[inputs] = _weights(tmp_path / inputs)
    linears = [k for k in shipped if ".layers." in k and k.endswith("proj.weight")]
    assert len(linears) == 14
    assert all(torch.equal(runs["uniform"][k], shipped[k]) for k in linears)
    first = [k for k in linears if ".layers.0." in k]  # block 0 sees the same (embedding) inputs either way
    assert all(torch.equal(runs["dense"][k], shipped[k]) for k in first)
    assert not all(torch.equal(runs["dense"][k], shipped[k]) for k in linears if k not in first)


def _weights_of(outcome) -> dict[str, torch.Tensor]:
    return _weights(Path(outcome.out))


def test_moe_experts_search_with_the_exact_budget(tiny_model_dir, tmp_path, calib):
    src = tiny_model_dir("qwen2_moe")
    outcome = api.prune(str(src), "evopress", sparsity=0.5, pruner="wanda", calib=calib, out=tmp_path / "moe",
                        method_options={**FAST, "generations": 3}, **RUN)
    d = outcome.manifest.method_details
    assert any(".experts." in n for n in d["levels_per_matrix"])
    assert d["achieved_zeros"] == d["target_zeros"] == outcome.manifest.sparsity["decoder_linear_zeros"]


def test_top_k_fitness_is_the_references_top_k_kl(tiny_dir, tmp_path, calib):
    """--kl-top-k K: the seeds' fitness is token_kl on the dense model's top-K logits (``generations 0``:
    only the seeds are scored)."""
    from compresskit.analysis.distances import top_k_logits
    from compresskit.calibration import CalibrationSpec, load_calibration
    from compresskit.models import load_model

    d = _prune(tiny_dir, tmp_path / "topk", calib, pruner="magnitude",
               options={"generations": 0, "top_k": 64}).manifest.method_details
    assert d["kl"] == "top-64" and d["fitness_history"] == []
    dense, tok = load_model(str(tiny_dir))
    pruned, _ = load_model(str(tiny_dir))
    for name, module in pruned.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            w = module.weight.data
            w.masked_fill_(matrix_mask(w.abs(), int(w.numel() * 0.5) / w.numel()), 0)
    from compresskit.search.fitness import draw_sequences

    rows = draw_sequences(128, 8, 32, 0, (0, 1))  # the seeds' draw: 4 random whole samples of 32
    ids = load_calibration(CalibrationSpec(source=calib, nsamples=8, seqlen=32, seed=0), tok).input_ids[[i for i, _ in rows]]
    with torch.no_grad():
        ref, new = dense(ids).logits[:, :-1].float(), pruned(ids).logits[:, :-1].float()
    expected = float(token_kl(top_k_logits(ref, 64), new).mean())
    assert d["seed_fitness"]["uniform"] == pytest.approx(expected, rel=1e-4)
    assert expected != pytest.approx(float(token_kl(ref, new).mean()), rel=1e-3)  # it is not the full KL


def test_lazy_model_holds_one_block_at_a_time(tiny_dir, tmp_path, calib, monkeypatch):
    """With the default --load lazy, scoring candidates materialises one decoder block at a time
    (swapping levels in never reads the whole model), and the search ends with the blocks on disk."""
    from compresskit.search import sparsity as sparsity_module

    seen: list[int] = []
    original = sparsity_module.LevelModel.installed

    def counting(self, i, levels):
        manager = original(self, i, levels)

        class Probe:
            def __enter__(probe):
                block = manager.__enter__()
                real = [b for b in self.adapter.blocks if any(not p.is_meta for p in b.parameters())]
                seen.append(len(real))
                return block

            def __exit__(probe, *exc):
                return manager.__exit__(*exc)

        return Probe()

    monkeypatch.setattr(sparsity_module.LevelModel, "installed", counting)
    outcome = _prune(tiny_dir, tmp_path / "lazy", calib, options={"generations": 2})
    assert outcome.manifest.hyperparameters["loading"].startswith("lazy")
    assert seen and max(seen) == 1
    assert all(p.is_meta for b in outcome.model.model.layers for p in b.parameters())


def test_all_three_heuristic_seeds_join_with_their_exact_budget_and_the_search_is_never_worse(tiny_dir, tmp_path,
                                                                                             calib):
    """``--seed-from uniform,owl,alphapruning``: every seed is scored, the final fitness is at most the
    best seed's, the budget is exact, and AlphaPruning's ε is recorded (lowered only where 0.3 cannot fit)."""
    outcome = api.prune(str(tiny_dir), "evopress", sparsity=0.7, pruner="wanda", calib=calib, out=tmp_path / "seeded",
                        method_options={**FAST, "seed_from": "uniform,owl,alphapruning"}, **RUN)
    d = outcome.manifest.method_details
    assert set(d["seed_fitness"]) == {"uniform", "owl", "alphapruning"}
    assert d["final_fitness"] <= min(d["seed_fitness"].values())
    assert d["seed_winner"] in d["seed_fitness"]
    assert d["achieved_zeros"] == d["target_zeros"] == outcome.manifest.sparsity["decoder_linear_zeros"]
    eps = d["seed_settings"]["alphapruning"]
    assert 0.0 <= eps["alpha_epsilon"] <= 0.3 and eps["alpha_epsilon_lowered"] == (eps["alpha_epsilon"] < 0.3)


def test_seed_options_reach_the_seeds_and_zero_spread_gives_the_uniform_vector(tiny_dir, tmp_path, calib):
    """``--owl-lambda`` / ``--owl-m`` / ``--alpha-epsilon`` set the owl and alphapruning seeds as they set
    those methods. A zero spread (λ = 0, ε = 0) makes both allocations uniform, so the three seeds are
    the same vector and score exactly the same KL; the settings are recorded."""
    outcome = api.prune(str(tiny_dir), "evopress", sparsity=0.6, pruner="wanda", calib=calib, out=tmp_path / "flat",
                        method_options={**FAST, "generations": 1, "seed_from": "uniform,owl,alphapruning",
                                        "owl_lambda": 0.0, "owl_m": 3.0, "alpha_epsilon": 0.0}, **RUN)
    d = outcome.manifest.method_details
    assert d["seed_settings"]["owl"] == {"owl_m": 3.0, "owl_lambda": 0.0}
    assert d["seed_settings"]["alphapruning"] == {"alpha_epsilon": 0.0, "alpha_epsilon_lowered": False}
    assert len(set(d["seed_fitness"].values())) == 1, d["seed_fitness"]
    spread = api.prune(str(tiny_dir), "evopress", sparsity=0.6, pruner="wanda", calib=calib, out=tmp_path / "spread",
                       method_options={**FAST, "generations": 1, "seed_from": "uniform,owl,alphapruning",
                                       "owl_lambda": 0.2, "alpha_epsilon": 0.3}, **RUN).manifest.method_details
    assert spread["seed_settings"]["owl"] == {"owl_m": 5.0, "owl_lambda": 0.2}
    assert spread["seed_fitness"]["uniform"] == d["seed_fitness"]["uniform"]
    assert spread["seed_fitness"]["owl"] != spread["seed_fitness"]["uniform"]
    assert spread["seed_fitness"]["alphapruning"] != spread["seed_fitness"]["uniform"]
