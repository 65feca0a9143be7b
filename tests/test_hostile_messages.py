"""Wrong or misleading messages (issue 8), one table: each row is a CLI call that must end with the
right one-line reason (exit 2) and leave every input, output parent and named file as it was; "ok"
rows prove the remedy the message names really works."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest

from hostile_harness import Ctx, Row, make_inputs, run_row

CPU = ["--device", "cpu", "--quiet"]
PRUNE = ["prune", "--model", "{model}", "--method", "wanda", "--sparsity", "0.5", "--nsamples", "4", "--seqlen", "32",
         *CPU]
EVAL = ["eval", "{ckpt}", "--ppl-file", "{text}", "--seqlen", "32", *CPU]
ANALYZE = ["analyze", "--model", "{model}", "--metric", "alpha", *CPU[:2]]


@pytest.fixture(scope="session")
def shared_inputs(tmp_path_factory, tiny_model_dir) -> Ctx:
    import compresskit

    ctx = make_inputs(tmp_path_factory.mktemp("hostile-messages"), tiny_model_dir("llama"))
    root = ctx.tmp
    body = root / "body.jsonl"  # documents under another column than "text"
    body.write_text("".join(json.dumps({"body": f"{i}: " + "The harbour was quiet that morning. " * 40}) + "\n"
                            for i in range(6)))
    qa = root / "qa.jsonl"
    qa.write_text("".join(json.dumps({"question": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n"
                          for i in range(6)))
    welore = root / "welore"
    compresskit.prune(str(ctx.model), "welore", out=welore, device="cpu", method_options={"rank_reduction": 0.5, "min_ratio": 0.3})
    unknown = root / "unknown-kind"
    shutil.copytree(welore, unknown)
    manifest = json.loads((unknown / "compresskit.json").read_text())
    manifest["structure"] = [{"kind": "martian", "module": "model.layers.0"}]
    (unknown / "compresskit.json").write_text(json.dumps(manifest))
    rope = root / "rope-scaled"  # the same model, configured to extrapolate (linear RoPE scaling)
    shutil.copytree(ctx.model, rope)
    config = json.loads((rope / "config.json").read_text())
    for key in ("rope_parameters", "rope_scaling"):
        config[key] = {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
    (rope / "config.json").write_text(json.dumps(config))
    ctx.extra.update(body=body, qa=qa, welore=welore, unknown=unknown, rope=rope)
    return ctx


@pytest.fixture
def ctx(shared_inputs, tmp_path) -> Ctx:
    return dataclasses.replace(shared_inputs, tmp=tmp_path, extra=dict(shared_inputs.extra))


def _not_called(*_a, **_k):
    raise AssertionError("compute started before the output was checked")


def _read_only(monkeypatch, ctx) -> None:
    """A read-only folder, also for root (for whom chmod alone does not stop writes)."""
    ro = ctx.tmp / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if Path(p) == ro and mode & os.W_OK
                        else real(p, mode, *a, **k))
    monkeypatch.setattr("compresskit.api.open_model", _not_called)


def _existing_dir(ctx) -> None:
    (ctx.tmp / "plots").mkdir()


def _foreign_png(ctx) -> None:
    (ctx.tmp / "holiday.png").write_bytes(b"\x89PNG\r\n\x1a\n not ours")


ROWS = [
    # --text-field: the hint names a flag that exists, and the flag works
    Row("calib field missing names --text-field", [*PRUNE, "--calib", "file:{body}", "--out", "{tmp}/o"],
        needle="has no field 'text' (its records have: body); pass --text-field with one of them"),
    Row("prune --text-field works", [*PRUNE, "--calib", "file:{body}", "--text-field", "body", "--out", "{tmp}/o"],
        exit_code=0, changes=True),
    Row("qa records in window format hint", [*PRUNE, "--calib", "file:{qa}", "--out", "{tmp}/o"],
        needle="use format icl, cot, single or zero, or --text-field NAME"),
    Row("qa hint names no missing flag", [*PRUNE, "--calib", "file:{body}", "--calib-format", "icl", "--out", "{tmp}/o"],
        needle="use format window (the text column: --text-field NAME)"),
    Row("finetune --text-field works",
        ["finetune", "{welore}", "--data", "file:{body}", "--text-field", "body", "--steps", "2", "--seqlen", "32",
         "--batch-size", "2", "--out", "{tmp}/ft", *CPU], exit_code=0, changes=True),
    Row("analyze --text-field reaches the calibration",
        ["analyze", "--model", "{model}", "--metric", "owl", "--calib", "file:{body}", "--text-field", "nope",
         "--nsamples", "4", "--seqlen", "32", *CPU[:2]], needle="has no field 'nope' (its records have: body)"),

    # user text is never markup or emoji
    Row("hf source error keeps :train:", [*PRUNE, "--calib", "hf:onlyone", "--out", "{tmp}/o"],
        needle="e.g. hf:allenai/c4:en:train:text"),
    Row("file path with markup and emoji codes", [*PRUNE, "--calib", "file:{tmp}/[bold]x[/bold]:smile:.jsonl",
                                                  "--out", "{tmp}/o"], needle="[bold]x[/bold]:smile:.jsonl"),

    # --max-windows / --batch-size / --seqlen
    Row("eval --max-windows 0", [*EVAL, "--max-windows", "0"], needle="--max-windows must be at least 1"),
    Row("eval --max-windows -3", [*EVAL, "--max-windows", "-3"], needle="--max-windows must be at least 1"),
    Row("eval --ppl-batch-size 0", [*EVAL, "--ppl-batch-size", "0"], needle="--ppl-batch-size must be at least 1"),
    Row("prune --batch-size 0", [*PRUNE, "--calib", "file:{calib}", "--batch-size", "0", "--out", "{tmp}/o"],
        needle="--batch-size must be an integer >= 1, got 0"),
    Row("prune --batch-size -2", [*PRUNE, "--calib", "file:{calib}", "--batch-size", "-2", "--out", "{tmp}/o"],
        needle="--batch-size must be an integer >= 1"),
    Row("analyze --batch-size 0", [*ANALYZE, "--batch-size", "0"], needle="--batch-size must be an integer >= 1"),
    Row("prune --seqlen above max_position_embeddings",
        ["prune", "--model", "{model}", "--method", "wanda", "--sparsity", "0.5", "--nsamples", "2", "--seqlen", "512",
         "--calib", "file:{calib}", "--out", "{tmp}/o", *CPU],
        needle="--seqlen 512 is above the model's max_position_embeddings 256; use --seqlen 256 or less"),
    Row("eval --seqlen above max_position_embeddings", ["eval", "{ckpt}", "--ppl-file", "{text}", "--seqlen", "300", *CPU],
        needle="--seqlen 300 is above the model's max_position_embeddings 256"),
    Row("finetune --seqlen above max_position_embeddings",
        ["finetune", "{welore}", "--data", "file:{calib}", "--steps", "2", "--seqlen", "512", "--out", "{tmp}/ft", *CPU],
        needle="--seqlen 512 is above the model's max_position_embeddings 256"),

    # analyze --plot
    Row("analyze --plot an existing directory", [*ANALYZE, "--plot", "{tmp}/plots"], setup=_existing_dir,
        needle="is a directory; give a PNG file"),
    Row("analyze --plot not a png name", [*ANALYZE, "--plot", "{tmp}/alpha.pdf"], needle="give a .png file name"),
    Row("analyze --plot over a foreign png", [*ANALYZE, "--plot", "{tmp}/holiday.png"], setup=_foreign_png,
        needle="is not a compresskit png file"),
    Row("analyze --plot read-only, before compute", [*ANALYZE, "--plot", "{tmp}/ro/alpha.png"], patch=_read_only,
        needle="is not writable"),
    Row("analyze --plot the model's folder", [*ANALYZE, "--plot", "{model}/alpha.png"], needle="refusing to write"),

    # finetune gives the real reason
    Row("finetune a missing directory", ["finetune", "{tmp}/nope", "--data", "file:{calib}", "--steps", "2",
                                         "--out", "{tmp}/ft", *CPU], needle="nope does not exist"),
    Row("finetune a file", ["finetune", "{calib}", "--data", "file:{calib}", "--steps", "2", "--out", "{tmp}/ft", *CPU],
        needle="is not a directory"),
    Row("finetune a plain model directory", ["finetune", "{model}", "--data", "file:{calib}", "--steps", "2",
                                             "--out", "{tmp}/ft", *CPU], needle="is not a compresskit checkpoint"),
    Row("finetune an unknown structure kind", ["finetune", "{unknown}", "--data", "file:{calib}", "--steps", "2",
                                               "--out", "{tmp}/ft", *CPU], needle="unknown structure kind(s) martian"),
    Row("finetune without low-rank factors", ["finetune", "{ckpt}", "--data", "file:{calib}", "--steps", "2",
                                              "--out", "{tmp}/ft", *CPU], needle="nothing to fine-tune"),
    Row("finetune --warmup above --steps", ["finetune", "{welore}", "--data", "file:{calib}", "--steps", "10",
                                            "--warmup", "11", "--out", "{tmp}/ft", *CPU],
        needle="--warmup must be in [0, --steps 10]"),
]


@pytest.mark.parametrize("row", ROWS, ids=str)
def test_row(row, ctx, monkeypatch):
    run_row(row, ctx, monkeypatch)


# ----------------------------------------------------------------------------- rows that need more than one line
def test_tables_show_user_paths_literally(cli, ctx):
    out = ctx.tmp / "o[red]x[/red]:smile:"
    res = cli("prune", "--model", ctx.model, "--method", "magnitude", "--sparsity", "0.5", "--device", "cpu",
              "--out", out)
    assert res.exit_code == 0, res.stderr
    flat = "".join(res.stdout.split())
    assert "[red]x[/red]:smile:" in flat and "😄" not in res.stdout
    shown = cli("inspect", out)
    assert shown.exit_code == 0 and "[red]x[/red]:smile:" in "".join(shown.stdout.split())


def test_error_emoji_codes_stay_text(cli, ctx):
    res = cli("prune", "--model", ctx.model, "--method", "wanda", "--sparsity", "0.5", "--calib", "hf:onlyone",
              "--seqlen", "32", "--out", ctx.tmp / "o")
    assert res.exit_code == 2 and ":train:" in res.stderr and "🚆" not in res.stderr


def test_analyze_plot_without_suffix_says_the_real_path(cli, ctx):
    target = ctx.tmp / "alpha"
    res = cli("analyze", "--model", ctx.model, "--metric", "alpha", "--device", "cpu", "--plot", target)
    assert res.exit_code == 0, res.stderr
    written = target.with_name("alpha.png")
    assert written.is_file() and not target.exists()
    assert f"plot written to {written}" in " ".join(res.stdout.split())
    again = cli("analyze", "--model", ctx.model, "--metric", "alpha", "--device", "cpu", "--plot", written)
    assert again.exit_code == 0, again.stderr  # its own plot may be replaced


def test_seqlen_above_the_limit_only_warns_with_rope_scaling(cli, ctx):
    res = cli("eval", ctx.extra["rope"], "--ppl-file", ctx.text, "--seqlen", "300", "--max-windows", "1",
              "--device", "cpu", "--quiet")
    assert res.exit_code == 0, res.stderr
    assert res.stderr.strip() == ("warning: --seqlen 300 is above the model's max_position_embeddings 256; "
                                  "relying on its linear RoPE scaling to extrapolate")


def test_finetune_default_warmup_fits_short_runs(cli, ctx):
    from compresskit.heal.finetune import FinetuneSettings, default_warmup

    assert [default_warmup(s) for s in (1, 5, 10, 50, 999, 1000, 5000)] == [0, 0, 1, 5, 99, 100, 100]
    assert FinetuneSettings(data=("c4",), steps=30).warmup == 3
    assert FinetuneSettings(data=("c4",), steps=30, warmup=7).warmup == 7
    out = ctx.tmp / "ft"
    res = cli("finetune", ctx.extra["welore"], "--data", f"file:{ctx.calib}", "--steps", "3", "--seqlen", "32",
              "--batch-size", "2", "--device", "cpu", "--quiet", "--out", out)
    assert res.exit_code == 0, res.stderr
    hyper = json.loads((out / "compresskit.json").read_text())["hyperparameters"]
    assert hyper["warmup"] == 0 and hyper["steps"] == 3
