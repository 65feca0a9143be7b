"""FinerCut through the CLI: bad input (one line, exit 2), inspect --plot, and the recipe."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import compresskit

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def calib_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(("Four score and seven years ago our fathers brought forth on this continent a new nation. " * 60))
    return path


def prune_args(model_dir, calib_file, out, *extra):
    return ("prune", "--model", model_dir, "--method", "finercut", "--calib", f"file:{calib_file}", "--nsamples", "2",
            "--seqlen", "16", "--device", "cpu", "--out", out, "--quiet", *extra)


@pytest.mark.parametrize("extra,needle", [
    (("--remove", "1.0"), "remove"),
    (("--remove", "1.5"), "remove"),
    (("--remove", "0"), "remove"),
    (("--remove", "-0.2"), "remove"),
    ((), "exactly one of --remove"),
    (("--remove", "0.2", "--remove-params", "0.2"), "exactly one of --remove"),
    (("--remove", "0.2", "--level", "layers"), "level"),
    (("--remove", "0.2", "--distance", "cosine"), "distance"),
    (("--remove", "0.2", "--js-form", "reverse"), "--js-form must be 'code' or 'textbook'"),
    (("--remove", "0.2", "--keep", "."), "nothing left to remove"),
    (("--remove", "0.2", "--keep", "("), "invalid --keep regex"),
    (("--remove", "0.1"), "removes nothing"),  # 2 blocks: int(4 * 0.1) = 0 sublayers
    (("--remove", "0.2", "--sparsity", "0.5"), "do not apply"),
])
def test_bad_input_is_one_line_and_exit_2(cli, tiny_model_dir, calib_file, tmp_path, extra, needle):
    out = tmp_path / "out"
    res = cli(*prune_args(tiny_model_dir("llama"), calib_file, out, *extra))
    assert res.exit_code == 2, (res.stdout, res.stderr)
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], res.stderr
    assert not out.exists()


def test_prune_inspect_and_plot(cli, tiny_model_dir, calib_file, tmp_path):
    out = tmp_path / "fc"
    res = cli(*prune_args(tiny_model_dir("qwen2_moe"), calib_file, out, "--remove", "0.5", "--distance", "angular"))
    assert res.exit_code == 0, res.stderr
    manifest = compresskit.inspect(out)
    d = manifest.method_details
    assert d["removed"] == 2 and d["distance"] == "angular" and len(d["per_layer"]) == 2
    png = tmp_path / "removed.png"
    res = cli("inspect", out, "--plot", png)
    assert res.exit_code == 0, res.stderr
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    assert "order:" in res.stdout and "form:" in res.stdout
    model = compresskit.load(out)  # MoE sublayer or attention stubs rebuilt
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7, 8]]))


def test_recipe_finercut_then_owl_runs_offline(cli, tiny_model_dir, sotu_jsonl, tmp_path):
    recipe = ROOT / "recipes" / "finercut-then-owl.yaml"
    out = tmp_path / "run"
    res = cli("run", recipe, "--model", tiny_model_dir("llama"), "--out", out, "--quiet",
              "--set", "calibration.nsamples=2", "--set", "calibration.seqlen=32",
              "--set", "stages.0.remove=0.5", "--set", "evaluation.seqlen=32", "--set", "evaluation.max_windows=2")
    assert res.exit_code == 0, res.stderr
    manifest = compresskit.inspect(out)
    assert manifest.method == "owl" and [s["method"] for s in manifest.stages] == ["finercut"]
    assert any(e.get("kind") == "removed_sublayers" for e in manifest.structure) or manifest.loadable_with_transformers
    model = compresskit.load(out)
    assert 0.45 < manifest.sparsity["overall"] < 0.55
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[5, 6, 7]])).logits).all()
