"""End to end through the CLI on tiny models: prune → save → load → identical logits, exact sparsity."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import compresskit
from compresskit.checkpoint import MANIFEST_NAME
from compresskit.models import get_adapter

CALIB = ["--nsamples", "8", "--seqlen", "32", "--batch-size", "4", "--device", "cpu", "--quiet"]


def _calib(sotu: Path) -> list[str]:
    return ["--calib", f"file:{sotu}", *CALIB]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _expected_zeros(src: Path, method: str, s: float, nm: bool) -> int:
    """Zeros each pruner leaves by construction: int(numel·s) per comparison group."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src)
    adapter = get_adapter(model)
    total = 0
    for i in range(adapter.num_blocks):
        with adapter.unfused_experts(i):
            for m in adapter.prunable_linears(i).values():
                rows, cols = m.weight.shape
                if nm:
                    total += int(m.weight.numel() * s)
                elif method == "magnitude":
                    total += int(m.weight.numel() * s)
                elif method == "wanda":
                    total += rows * int(cols * s)
                else:  # sparsegpt: per block of 128 columns
                    total += sum(int(rows * min(128, cols - c) * s) for c in range(0, cols, 128))
    return total


def _decoder_zero_fraction(model) -> tuple[float, list[float]]:
    adapter = get_adapter(model)
    zeros = total = 0
    per_block = []
    for i in range(adapter.num_blocks):
        with adapter.unfused_experts(i):
            bz = bt = 0
            for m in adapter.prunable_linears(i).values():
                bz += int((m.weight == 0).sum())
                bt += m.weight.numel()
        per_block.append(bz / bt)
        zeros += bz
        total += bt
    return zeros / total, per_block


@pytest.mark.parametrize(
    "family,method,extra",
    [
        ("llama", "wanda", ["--sparsity", "0.5"]),
        ("llama", "sparsegpt", ["--pattern", "2:4"]),
        ("llama", "magnitude", ["--sparsity", "0.6"]),
        ("qwen2", "sparsegpt", ["--sparsity", "0.5"]),
        ("opt", "wanda", ["--pattern", "4:8"]),
        ("gemma3", "wanda", ["--sparsity", "0.7"]),
        ("qwen2_moe", "wanda", ["--sparsity", "0.5"]),
        ("deepseek_v2", "sparsegpt", ["--sparsity", "0.5"]),
    ],
)
def test_prune_save_load_identical_logits(cli, tiny_model_dir, sotu_jsonl, tmp_path, family, method, extra):
    src = tiny_model_dir(family)
    before = {p.name: p.stat().st_mtime_ns for p in src.iterdir()}
    out = tmp_path / "out"
    res = cli("prune", "--model", src, "--method", method, "--out", out, *extra, *_calib(sotu_jsonl))
    assert res.exit_code == 0, res.stderr
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    target = 0.5 if ":" in extra[1] else float(extra[1])
    assert manifest["method"] == method
    expected = _expected_zeros(src, method, target, nm=":" in extra[1])
    assert manifest["sparsity"]["decoder_linear_zeros"] == expected
    if method != "magnitude":
        assert manifest["calibration"]["nsamples"] == 8 and manifest["calibration"]["hash"]

    loaded = compresskit.load(out)
    overall, per_block = _decoder_zero_fraction(loaded)
    assert overall == pytest.approx(manifest["sparsity"]["overall"], abs=1e-9)
    assert per_block == pytest.approx(manifest["sparsity"]["per_block"], abs=1e-9)
    # The checkpoint reproduces the in-memory pruned model exactly: prune again in memory.
    outcome = compresskit.prune(
        str(src), method, sparsity=None if ":" in extra[1] else float(extra[1]),
        pattern=extra[1] if ":" in extra[1] else "unstructured",
        calib=f"file:{sotu_jsonl}", nsamples=8, seqlen=32, batch_size=4, device="cpu",
    )
    ids = torch.randint(0, 8192, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(loaded, ids), _logits(outcome.model, ids), rtol=0, atol=0)
    # the input model directory is untouched
    assert {p.name: p.stat().st_mtime_ns for p in src.iterdir()} == before


def test_exact_sparsity_every_row_wanda_and_nm_groups(cli, tiny_model_dir, sotu_jsonl, tmp_path):
    out = tmp_path / "w"
    assert cli("prune", "--model", tiny_model_dir("llama"), "--method", "wanda", "--sparsity", "0.5",
               "--out", out, *_calib(sotu_jsonl)).exit_code == 0
    model = compresskit.load(out)
    adapter = get_adapter(model)
    for i in range(adapter.num_blocks):
        for m in adapter.prunable_linears(i).values():
            zeros_per_row = (m.weight == 0).sum(dim=1)
            assert torch.all(zeros_per_row == int(m.in_features * 0.5))
    out24 = tmp_path / "nm"
    assert cli("prune", "--model", tiny_model_dir("llama"), "--method", "wanda", "--pattern", "2:4",
               "--out", out24, *_calib(sotu_jsonl)).exit_code == 0
    model = compresskit.load(out24)
    for i in range(adapter.num_blocks):
        for m in get_adapter(model).prunable_linears(i).values():
            groups = (m.weight == 0).view(m.out_features, -1, 4).sum(-1)
            assert torch.all(groups >= 2)


def test_dense_checkpoint_loads_with_plain_transformers(cli, tiny_model_dir, sotu_jsonl, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "w"
    assert cli("prune", "--model", tiny_model_dir("llama"), "--method", "wanda", "--sparsity", "0.5",
               "--out", out, *_calib(sotu_jsonl)).exit_code == 0
    plain = AutoModelForCausalLM.from_pretrained(out)
    ours = compresskit.load(out)
    ids = torch.arange(20).view(1, 20)
    torch.testing.assert_close(_logits(plain, ids), _logits(ours, ids), rtol=0, atol=0)
    assert json.loads((out / MANIFEST_NAME).read_text())["loadable_with_transformers"] is True


def test_inspect_and_json(cli, tiny_model_dir, sotu_jsonl, tmp_path):
    out = tmp_path / "w"
    res = cli("prune", "--model", tiny_model_dir("llama"), "--method", "sparsegpt", "--sparsity", "0.5",
              "--out", out, "--json", *_calib(sotu_jsonl))
    assert res.exit_code == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["sparsity"]["overall"] == pytest.approx(0.5, abs=1e-3)
    assert summary["hyperparameters"]["pruner"] == "sparsegpt"
    res = cli("inspect", out)
    assert res.exit_code == 0 and "per-block sparsity" in res.stdout and "0.5000" in res.stdout
    res = cli("inspect", out, "--json")
    assert json.loads(res.stdout)["method"] == "sparsegpt"


def test_eval_ppl_file(cli, tiny_model_dir, sotu_jsonl, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(" ".join(["the quick brown fox jumps over the lazy dog"] * 200))
    res = cli("eval", "--model", tiny_model_dir("llama"), "--ppl-file", text, "--seqlen", "64", "--device", "cpu", "--json", "-")
    assert res.exit_code == 0, res.stderr
    r = json.loads(res.stdout)["perplexity"]["t"]  # a perplexity file is keyed by its stem
    assert r["seqlen"] == 64 and r["n_windows"] == r["total_tokens"] // 64 and r["value"] > 1


# ----------------------------------------------------------------------------- bad input
def _assert_clean_error(res, needle: str, out: Path | None = None):
    assert res.exit_code == 2, (res.exit_code, res.stdout, res.stderr)
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert needle in lines[0], lines[0]
    assert "Traceback" not in res.stderr
    if out is not None:
        assert not out.exists()
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_bad_input_errors(cli, tiny_model_dir, sotu_jsonl, tmp_path):
    src = tiny_model_dir("llama")
    out = tmp_path / "o"
    base = ["--out", out, *_calib(sotu_jsonl)]
    _assert_clean_error(cli("prune", "--model", tmp_path / "nope", "--method", "wanda", "--sparsity", "0.5", *base), "nope", out)
    _assert_clean_error(cli("prune", "--model", src, "--method", "bogus", "--sparsity", "0.5", *base), "unknown method", out)
    _assert_clean_error(cli("prune", "--model", src, "--method", "wanda", "--sparsity", "1.0", *base), "[0, 1)", out)
    _assert_clean_error(cli("prune", "--model", src, "--method", "wanda", "--sparsity", "-0.1", *base), "[0, 1)", out)
    # tiny llama hidden is 64 → 3:7 does not divide it
    _assert_clean_error(cli("prune", "--model", src, "--method", "wanda", "--pattern", "3:7", *base), "multiple of 7", out)
    _assert_clean_error(cli("prune", "--model", src, "--method", "wanda", "--sparsity", "0.5", "--out", out,
                            "--calib", f"file:{tmp_path / 'missing.jsonl'}", *CALIB), "missing.jsonl", out)
    # usage errors (missing option, unparsable value) are one line too
    _assert_clean_error(cli("prune", "--model", src, "--method", "wanda"), "--out", out)
    _assert_clean_error(cli("prune", "--model", src, "--method", "wanda", "--sparsity", "half", *base), "--sparsity", out)
    unreadable = tmp_path / "bad.jsonl"
    unreadable.write_bytes(b"\xff\xfe not json\n")
    _assert_clean_error(cli("prune", "--model", src, "--method", "wanda", "--sparsity", "0.5", "--out", out,
                            "--calib", f"file:{unreadable}", *CALIB), "bad.jsonl", out)


def test_existing_output_needs_force(cli, tiny_model_dir, sotu_jsonl, tmp_path):
    src = tiny_model_dir("llama")
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    res = cli("prune", "--model", src, "--method", "magnitude", "--sparsity", "0.5", "--out", out, "--quiet")
    _assert_clean_error(res, "--force")
    assert (out / "keep.txt").read_text() == "precious"
    # --force replaces only an earlier checkpoint (or an empty directory), never a folder of other files
    res = cli("prune", "--model", src, "--method", "magnitude", "--sparsity", "0.5", "--out", out, "--quiet", "--force")
    _assert_clean_error(res, "neither a compresskit checkpoint nor empty")
    assert (out / "keep.txt").read_text() == "precious"
    (out / "keep.txt").unlink()
    for _ in range(2):  # an empty directory, then the checkpoint written into it
        res = cli("prune", "--model", src, "--method", "magnitude", "--sparsity", "0.5", "--out", out, "--quiet", "--force")
        assert res.exit_code == 0 and (out / MANIFEST_NAME).exists(), res.stderr
    # writing into the input model is refused even with --force
    res = cli("prune", "--model", src, "--method", "magnitude", "--sparsity", "0.5", "--out", src, "--quiet", "--force")
    _assert_clean_error(res, "input model")


def test_interrupted_save_leaves_nothing(tiny_model_dir, tmp_path, monkeypatch):
    from compresskit.checkpoint.manifest import Manifest

    src = tiny_model_dir("llama")
    out = tmp_path / "o"

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Manifest, "write", boom)
    with pytest.raises(KeyboardInterrupt):
        compresskit.prune(str(src), "magnitude", sparsity=0.5, out=out, device="cpu")
    assert not out.exists()
    assert os.listdir(tmp_path) == []


def test_method_calibration_defaults_are_the_papers(monkeypatch):
    """Unset --calib / --nsamples / --seqlen take each method's paper setting; given values win."""
    from compresskit import api
    from compresskit.methods import get_method

    wanda, finercut, cdmoe = get_method("wanda"), get_method("finercut"), get_method("cdmoe")
    assert [wanda.calibration_setting(k, None) for k in ("calib", "nsamples", "seqlen")] == ["c4", 128, 2048]
    assert [finercut.calibration_setting(k, None) for k in ("calib", "nsamples", "seqlen")] == ["wikitext2", 10, 256]
    assert [cdmoe.calibration_setting(k, None) for k in ("calib", "nsamples", "seqlen")] == ["c4", 100, 256]
    assert finercut.calibration_setting("nsamples", 4) == 4

    seen = {}

    def fake_job_calibration(**kwargs):
        seen.update(kwargs)
        raise SystemExit(0)

    monkeypatch.setattr(api, "job_calibration", fake_job_calibration)
    with pytest.raises(SystemExit):
        api.prune("smollm2-135m", "finercut", method_options={"remove": 0.25}, device="cpu")
    # seqlen: unset (None), so the method's default is fitted to the model's context once it is loaded
    assert (seen["calib"], seen["nsamples"], seen["seqlen"], seen["default_seqlen"]) == ("wikitext2", 10, None, 256)
