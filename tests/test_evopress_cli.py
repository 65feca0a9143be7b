"""EvoPress through the CLI: bad input (one line, exit 2, nothing written), prune -> checkpoint -> load, recipes."""

from __future__ import annotations

import json

import pytest
import torch

import compresskit
from compresskit.pruning import matrix_mask


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _args(model_dir, calib, out, *extra):
    return ("prune", "--model", model_dir, "--method", "evopress", "--calib", f"file:{calib}", "--nsamples", "8",
            "--seqlen", "32", "--batch-size", "4", "--device", "cpu", "--out", out, "--quiet", *extra)


@pytest.mark.parametrize("extra,needle", [
    (("--level", "sublayer", "--remove", "0.25", "--pruner", "wanda"), "do not apply to --method evopress --level sublayer"),
    (("--level", "block", "--remove", "0.25", "--sparsity", "0.5"), "do not apply to --method evopress --level block"),
    (("--sparsity", "0.5", "--seed-from", "uniform,oracle"), "unknown --seed-from 'oracle'"),
    (("--sparsity", "0.5", "--seed-from", "finercut"), "unknown --seed-from 'finercut' for --level matrix"),
    (("--sparsity", "0.5", "--alpha-epsilon", "0.2"), "--alpha-epsilon sets the alphapruning seed"),
    (("--sparsity", "0.5", "--seed-from", "alphapruning", "--owl-lambda", "0.1"), "--owl-lambda sets the owl seed"),
    (("--level", "sublayer", "--remove", "0.25", "--owl-m", "3"), "--owl-m sets the owl seed"),
    (("--sparsity", "0.0"), "needs --sparsity in (0, 1)"),
    (("--sparsity", "1.0"), "--sparsity must be in [0, 1)"),
    (("--pattern", "2:4"), "searches unstructured sparsity levels"),
    (("--sparsity", "0.5", "--tokens", "32,x"), "--tokens takes comma-separated integers"),
    (("--sparsity", "0.5", "--survivors", "2,2"), "--survivors must end with 1"),
    (("--sparsity", "0.5", "--tokens", "32,64,128", "--survivors", "2,1"), "one entry per stage"),
    (("--sparsity", "0.5", "--remove", "0.2"), "--remove applies to --level sublayer|block"),
    (("--sparsity", "0.5", "--levels", "0"), "--levels"),
    (("--sparsity", "0.5", "--schedule", "slow"), "--schedule"),
    (("--level", "sublayer"), "needs --remove"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(cli, tiny_model_dir, sotu_jsonl, tmp_path, extra, needle):
    out = tmp_path / "out"
    res = cli(*_args(tiny_model_dir("llama"), sotu_jsonl, out, *extra))
    assert res.exit_code == 2, (res.stdout, res.stderr)
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], res.stderr
    assert not out.exists() and not (tmp_path / "out.search-state").exists()


def test_cli_prune_saves_the_levels_and_load_gives_their_logits(cli, tiny_model_dir, sotu_jsonl, tmp_path):
    """Magnitude levels are checkable by hand: a matrix at level ℓ holds exactly the
    ``base + ℓ·Δ`` smallest |w| zeroed (matrix_mask), everything else unchanged."""
    from compresskit.models import load_model

    src = tiny_model_dir("llama")
    out = tmp_path / "evo"
    res = cli(*_args(src, sotu_jsonl, out, "--pruner", "magnitude", "--sparsity", "0.6", "--generations", "3",
                     "--offspring", "4", "--tokens", "32,128", "--survivors", "2,1", "--levels", "4",
                     "--search-seed", "3"))
    assert res.exit_code == 0, res.stderr
    manifest = json.loads((out / "compresskit.json").read_text())
    d = manifest["method_details"]
    assert manifest["method"] == "evopress" and manifest["hyperparameters"]["pruner"] == "magnitude"
    assert len(d["fitness_history"]) == 3 and d["schedule"]["generations"] == 3
    assert [s["tokens"] for s in d["schedule"]["stages"]] == [32, 128]
    assert d["tokens_seen"] == d["fitness_history"][-1]["tokens_seen"] > 0
    assert d["seed_winner"] == "uniform" and d["search_seed"] == 3 and d["levels"] == 4
    assert len(d["database"]["key"]) == 24 and d["kl"] == "full"
    assert all(-4 <= lv <= 4 for lv in d["levels_per_matrix"].values())
    assert sum(d["levels_per_matrix"].values()) == 0

    dense, _ = load_model(str(src))
    expected = {}
    for name, level in d["levels_per_matrix"].items():
        w = dense.get_submodule(name).weight.data
        zeros = int(w.numel() * 0.6) + level * d["level_step"]
        assert d["sparsity_per_matrix"][name] == zeros / w.numel()
        expected[name] = w.masked_fill(matrix_mask(w.abs(), zeros / w.numel()), 0) if zeros else w.clone()
    for name, w in expected.items():
        dense.get_submodule(name).weight.data = w
    loaded = compresskit.load(out)
    for name, w in expected.items():
        assert torch.equal(loaded.get_submodule(name).weight.data, w), name
    ids = torch.randint(1, 8000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, dense(ids).logits, rtol=0, atol=0)


def test_recipe_runs_evopress(tmp_path, tiny_model_dir, sotu_jsonl):
    from compresskit.run import run_recipe

    recipe = tmp_path / "evo.yaml"
    recipe.write_text(
        f"model: {tiny_model_dir('llama')}\n"
        "device: cpu\n"
        f"output: {tmp_path / 'result'}\n"
        "baseline: never\n"
        f"calibration: {{source: 'file:{sotu_jsonl}', nsamples: 8, seqlen: 32, seed: 0, batch_size: 4}}\n"
        "stages:\n"
        "  - method: evopress\n"
        "    pruner: wanda\n"
        "    sparsity: 0.5\n"
        "    generations: 2\n"
        "    offspring: 3\n"
        "    tokens: 32,64\n"
        "    survivors: 2,1\n"
        "evaluation: {ppl: [demo], seqlen: 32, max_windows: 1}\n"
    )
    run = run_recipe(recipe)
    manifest = json.loads((run.stage_dirs[0] / "compresskit.json").read_text())
    assert manifest["method"] == "evopress" and len(manifest["method_details"]["fitness_history"]) == 2
    assert manifest["sparsity"]["decoder_linear_zeros"] == manifest["method_details"]["target_zeros"]
