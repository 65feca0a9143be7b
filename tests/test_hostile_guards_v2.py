"""Output guards and defaults (issue 17, part 1), one table plus focused tests.

Classes, each at its root:

* an unset ``--seqlen`` is ``min(default, the model's context)`` with one ``note:`` line, recorded
  (``models.context.fit_seqlen``, used by prune / eval / finetune / run / analyze); an explicit
  value above the context stays an error;
* ``inspect --plot`` goes through the guard every ``--plot`` uses (``OutputGuard.png``);
* ``--force`` recognises a checkpoint by its manifest's content and never deletes a file the
  checkpoint layout does not name: it refuses (``outputs.check_replaceable``); the same for
  finetune's ``OUT.train-state`` folder (``heal.state.remove_train_state``);
* every path an option reads is an input of the guard (``outputs.option_inputs``), ``--from-order``
  included.

Rows: exit 2, exactly one ``error:`` line, the inputs, the row's folder and every named path byte for
byte unchanged, no temporary folder left (``hostile_harness.run_row`` hashes ``{tmp}`` with its hidden
entries). The tiny models declare ``max_position_embeddings`` 256.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from hostile_harness import Ctx, Row, make_inputs, run_checked, run_row

CPU = ["--device", "cpu", "--quiet"]
LONG_TEXT = "The harbour master counted the boats that came in before the storm, one by one. " * 120


@pytest.fixture(scope="session")
def shared_inputs(tmp_path_factory, tiny_model_dir) -> Ctx:
    import compresskit

    ctx = make_inputs(tmp_path_factory.mktemp("hostile-guards-v2"), tiny_model_dir("llama"))
    root = ctx.tmp
    long_text = root / "long.txt"  # documents long enough for 256-token windows
    long_text.write_text(LONG_TEXT)
    finercut = root / "shared-finercut"
    compresskit.prune(str(ctx.model), "finercut", out=finercut, device="cpu", calib=f"file:{long_text}",
                      nsamples=2, seqlen=16, method_options={"remove": 0.25})
    moe = tiny_model_dir("qwen2_moe")
    cdmoe = root / "shared-cdmoe"
    compresskit.prune(str(moe), "cdmoe", out=cdmoe, device="cpu", calib=f"file:{long_text}", nsamples=2, seqlen=16,
                      method_options={"experts": 1, "layers": 1})
    ctx.extra.update(long=long_text, finercut=finercut, moe=moe, cdmoe=cdmoe)
    return ctx


@pytest.fixture
def ctx(shared_inputs, tmp_path) -> Ctx:
    return dataclasses.replace(shared_inputs, tmp=tmp_path, extra=dict(shared_inputs.extra))


# ----------------------------------------------------------------------------- setups
def _copy(src_key: str, name: str):
    def setup(ctx: Ctx) -> Path:
        src = {"model": ctx.model, "ckpt": ctx.ckpt, **ctx.extra}[src_key]
        shutil.copytree(src, ctx.tmp / name)
        return ctx.tmp / name

    return setup


def _write(rel: str, content: str | bytes):
    def step(ctx: Ctx):
        f = ctx.tmp / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(content) if isinstance(content, bytes) else f.write_text(content)

    return step


def _then(*steps):
    def setup(ctx: Ctx):
        for step in steps:
            step(ctx)

    return setup


def _read_only(rel: str):
    def step(ctx: Ctx):
        d = ctx.tmp / rel
        d.mkdir(parents=True, exist_ok=True)
        d.chmod(0o555)

    return step


def _no_write_access(monkeypatch, ctx: Ctx):
    """As root, mode bits do not stop writes: make os.access answer from the mode bits, as for a user."""
    import compresskit.outputs as outputs

    real = os.access

    def access(path, mode, *a, **k):
        if mode & os.W_OK and not (os.stat(path).st_mode & stat.S_IWUSR):
            return False
        return real(path, mode, *a, **k)

    monkeypatch.setattr(outputs.os, "access", access)


def _disk_full_on_savefig(monkeypatch, ctx: Ctx):
    from matplotlib.figure import Figure

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Figure, "savefig", full)


def _not_called(monkeypatch, ctx: Ctx):
    """The guard must answer before the model is loaded."""

    def fail(*a, **k):
        raise AssertionError("compute started before the output was checked")

    monkeypatch.setattr("compresskit.api.open_model", fail)


FAKE_MANIFEST = json.dumps({"method": "mine", "base_model": "notes", "format_version": 1})

RECIPE_FROM_ORDER = """\
model: {moe}
device: cpu
output: {out}
force: true
stages: [{{method: cdmoe, experts: 1, layers: 1, from_order: "{order}"}}]
evaluation: {{ppl_files: ["{text}"], seqlen: 16, max_windows: 1}}
"""


def _recipe_from_order(out: str, order: str):
    def step(ctx: Ctx):
        (ctx.tmp / "r.yaml").write_text(RECIPE_FROM_ORDER.format(moe=ctx.extra["moe"], out=ctx.format(out),
                                                                 order=ctx.format(order), text=ctx.text))

    return step


# ----------------------------------------------------------------------------- the table
MAG = ["prune", "--model", "{model}", "--method", "magnitude", "--sparsity", "0.5", *CPU]
CDMOE = ["prune", "--model", "{moe}", "--method", "cdmoe", "--experts", "1", "--layers", "1", *CPU]

ROWS = [
    # -- defaults that do not fit the model: an explicit length above the context stays an error
    Row("prune --seqlen above the context, given", ["prune", "--model", "{model}", "--method", "wanda", "--sparsity",
                                                    "0.5", "--calib", "file:{long}", "--nsamples", "2", "--seqlen",
                                                    "300", "--out", "{tmp}/o", *CPU],
        needle="--seqlen 300 is above the model's max_position_embeddings 256"),
    Row("eval --seqlen above the context, given", ["eval", "{ckpt}", "--ppl-file", "{long}", "--seqlen", "257", *CPU],
        needle="--seqlen 257 is above the model's max_position_embeddings 256"),
    Row("analyze --seqlen above the context, given", ["analyze", "--model", "{model}", "--metric", "owl", "--calib",
                                                      "file:{long}", "--nsamples", "2", "--seqlen", "300",
                                                      "--device", "cpu"],
        needle="--seqlen 300 is above the model's max_position_embeddings 256"),
    # -- inspect --plot: the guard of every --plot
    Row("inspect --plot over a foreign png", ["inspect", "{finercut}", "--plot", "{tmp}/holiday.png"],
        setup=_write("holiday.png", b"\x89PNG\r\n\x1a\n not ours"), needle="is not a compresskit png file"),
    Row("inspect --plot over a pdf", ["inspect", "{finercut}", "--plot", "{tmp}/paper.pdf"],
        setup=_write("paper.pdf", b"%PDF-1.4 mine"), needle="give a .png file name"),
    Row("inspect --plot over the checkpoint's config.json", ["inspect", "{tmp}/ck", "--plot", "{tmp}/ck/config.json"],
        setup=_copy("finercut", "ck"), needle="give a .png file name"),
    Row("inspect --plot into a folder inside the checkpoint", ["inspect", "{tmp}/ck", "--plot", "{tmp}/ck/sub/x.png"],
        setup=_copy("finercut", "ck"), needle="inside the input checkpoint"),
    Row("inspect --plot the checkpoint folder itself", ["inspect", "{tmp}/ck", "--plot", "{tmp}/ck"],
        setup=_copy("finercut", "ck"), needle="is a directory"),
    Row("inspect --plot DIR", ["inspect", "{finercut}", "--plot", "{tmp}/plots"],
        setup=_write("plots/keep.txt", "x"), needle="is a directory"),
    Row("inspect --plot into a read-only folder", ["inspect", "{finercut}", "--plot", "{tmp}/ro/removed.png"],
        setup=_read_only("ro"), patch=_no_write_access, needle="is not writable"),
    Row("inspect --plot below a file", ["inspect", "{finercut}", "--plot", "{tmp}/f/removed.png"],
        setup=_write("f", "x"), needle="is a file"),
    Row("inspect --plot, disk full while drawing", ["inspect", "{finercut}", "--plot", "{tmp}/removed.png"],
        patch=_disk_full_on_savefig, needle="No space left on device"),
    # -- --force recognises a checkpoint by content and deletes nothing the layout does not name
    Row("--force over a folder with a fake compresskit.json", [*MAG, "--out", "{tmp}/docs", "--force"],
        setup=_then(_write("docs/compresskit.json", FAKE_MANIFEST), _write("docs/thesis.tex", "precious")),
        patch=_not_called, needle="neither a compresskit checkpoint nor empty"),
    Row("--force over a folder with an empty compresskit.json", [*MAG, "--out", "{tmp}/docs", "--force"],
        setup=_then(_write("docs/compresskit.json", ""), _write("docs/a.py", "print(1)")),
        patch=_not_called, needle="neither a compresskit checkpoint nor empty"),
    Row("--force over a checkpoint holding a foreign file", [*MAG, "--out", "{tmp}/ck", "--force"],
        setup=_then(_copy("ckpt", "ck"), _write("ck/notes.txt", "my notes")), patch=_not_called,
        needle="also holds notes.txt, which compresskit did not write"),
    Row("--force over a checkpoint holding a foreign folder", [*MAG, "--out", "{tmp}/ck", "--force"],
        setup=_then(_copy("ckpt", "ck"), _write("ck/runs/log.txt", "x")), patch=_not_called,
        needle="also holds runs"),
    Row("--force over a checkpoint holding a foreign eval.json", [*MAG, "--out", "{tmp}/ck", "--force"],
        setup=_then(_copy("ckpt", "ck"), _write("ck/eval.json", '{"mine": 1}')), patch=_not_called,
        needle="also holds eval.json"),
    Row("finetune --force over a checkpoint holding a foreign file",
        ["finetune", "{welore}", "--data", "file:{long}", "--steps", "1", "--seqlen", "16", "--out", "{tmp}/ck",
         "--force", *CPU], setup=_then(_copy("ckpt", "ck"), _write("ck/todo.md", "- x")), needle="also holds todo.md"),
    Row("run --force over a checkpoint holding a foreign file", ["run", "{tmp}/r.yaml", "--quiet", "--force"],
        setup=_then(_copy("ckpt", "ck"), _write("ck/todo.md", "- x"),
                    lambda c: (c.tmp / "r.yaml").write_text(
                        f"model: {c.model}\ndevice: cpu\noutput: {c.tmp}/ck\nstages: [{{method: magnitude, sparsity: 0.5}}]\n"
                        f"evaluation: {{ppl_files: [\"{c.text}\"], seqlen: 16, max_windows: 1}}\n")),
        needle="also holds todo.md"),
    Row("finetune --force over a training-state folder holding a foreign file",
        ["finetune", "{welore}", "--data", "file:{long}", "--steps", "1", "--seqlen", "16", "--out", "{tmp}/ft",
         "--force", *CPU], setup=_then(_write("ft.train-state/state.pt", b"old"), _write("ft.train-state/notes.txt", "x")),
        needle="also holds notes.txt, which is not part of a training state"),
    Row("finetune --force with a file named like the training state",
        ["finetune", "{welore}", "--data", "file:{long}", "--steps", "1", "--seqlen", "16", "--out", "{tmp}/ft",
         "--force", *CPU], setup=_write("ft.train-state", "my file"), needle="is not a training state folder"),
    # -- every path an option reads is an input: --from-order
    Row("--from-order CK --out CK --force", [*CDMOE, "--from-order", "{tmp}/cd", "--out", "{tmp}/cd", "--force"],
        setup=_copy("cdmoe", "cd"), patch=_not_called, needle="is the input checkpoint"),
    Row("--from-order CK/compresskit.json --out CK --force",
        [*CDMOE, "--from-order", "{tmp}/cd/compresskit.json", "--out", "{tmp}/cd", "--force"],
        setup=_copy("cdmoe", "cd"), patch=_not_called, needle="holds the input file"),
    Row("--from-order FILE --out the folder holding it --force",
        [*CDMOE, "--from-order", "{tmp}/cd/orders.json", "--out", "{tmp}/cd", "--force"],
        setup=_then(_copy("cdmoe", "cd"),
                    lambda c: (c.tmp / "cd" / "orders.json").write_text(
                        json.dumps(json.loads((c.tmp / "cd" / "compresskit.json").read_text())["method_details"]["orders"]))),
        patch=_not_called, needle="holds the input file"),
    Row("--from-order inside --out", [*CDMOE, "--from-order", "{tmp}/o/cd", "--out", "{tmp}/o", "--force"],
        setup=_copy("cdmoe", "o/cd"), patch=_not_called, needle="holds the input checkpoint"),
    Row("run: stage from_order is the output", ["run", "{tmp}/r.yaml", "--quiet"],
        setup=_then(_copy("cdmoe", "cd"), _recipe_from_order("{tmp}/cd", "{tmp}/cd")), needle="is the input checkpoint"),
]


def test_row_ids_are_unique():
    ids = [r.id for r in ROWS]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("row", ROWS, ids=str)
def test_row(row, ctx, monkeypatch):
    run_row(row, ctx, monkeypatch)
    leftovers = [p.name for p in ctx.tmp.iterdir() if ".tmp-" in p.name or ".old-" in p.name or "spill" in p.name]
    assert leftovers == [], leftovers


# ----------------------------------------------------------------------------- seqlen defaults: the positive side
NOTE = "note: --seqlen not given: using 256, the model's max_position_embeddings, instead of the default {default}"


def _notes(res) -> list[str]:
    return [line for line in res.stderr.splitlines() if line.strip()]


def test_prune_without_seqlen_fits_the_model_and_records_it(ctx):
    out = ctx.tmp / "o"
    res = run_checked(["prune", "--model", ctx.model, "--method", "wanda", "--sparsity", "0.5", "--calib",
                       f"file:{ctx.extra['long']}", "--nsamples", "2", "--out", out, *CPU], exit_code=0, changes=True)
    assert _notes(res) == [NOTE.format(default=2048)]
    calibration = json.loads((out / "compresskit.json").read_text())["calibration"]
    assert calibration["seqlen"] == 256 and calibration["seqlen_default"] == 2048
    shown = " ".join(run_checked(["inspect", out], exit_code=0, changes=True).stdout.split())
    assert "2×256" in shown and "--seqlen not given: the default 2048 lowered to the model's context" in shown


def test_a_default_that_fits_is_left_alone(ctx):
    out = ctx.tmp / "o"
    res = run_checked(["prune", "--model", ctx.model, "--method", "wanda", "--sparsity", "0.5", "--calib",
                       f"file:{ctx.extra['long']}", "--nsamples", "2", "--seqlen", "256", "--out", out, *CPU],
                      exit_code=0, changes=True)
    assert _notes(res) == []
    assert "seqlen_default" not in json.loads((out / "compresskit.json").read_text())["calibration"]


def test_eval_without_seqlen_fits_the_model_and_records_it(ctx):
    res = run_checked(["eval", ctx.ckpt, "--ppl-file", ctx.extra["long"], "--max-windows", "1", "--json",
                       ctx.tmp / "e.json", *CPU], exit_code=0, changes=True)
    assert _notes(res) == [NOTE.format(default=2048)]
    result = json.loads((ctx.tmp / "e.json").read_text())
    assert result["perplexity"]["long"]["seqlen"] == 256 and result["extra"]["seqlen_default"] == 2048


def test_finetune_without_seqlen_fits_the_model_and_records_it(ctx):
    out = ctx.tmp / "ft"
    res = run_checked(["finetune", ctx.extra["welore"], "--data", f"file:{ctx.extra['long']}", "--steps", "1",
                       "--batch-size", "1", "--out", out, *CPU], exit_code=0, changes=True)
    assert _notes(res) == [NOTE.format(default=512)]
    hyper = json.loads((out / "compresskit.json").read_text())["hyperparameters"]
    assert hyper["seqlen"] == 256 and hyper["seqlen_default"] == 512


def test_analyze_without_seqlen_fits_the_model(ctx):
    res = run_checked(["analyze", "--model", ctx.model, "--metric", "owl", "--calib", f"file:{ctx.extra['long']}",
                       "--nsamples", "2", "--device", "cpu", "--json"], exit_code=0, changes=True)
    assert _notes(res) == [NOTE.format(default=2048)]
    report = json.loads(res.stdout)
    assert report["calibration_seqlen"] == 256 and report["calibration_seqlen_default"] == 2048


def test_run_without_seqlen_fits_the_model(ctx):
    recipe = ctx.tmp / "r.yaml"
    recipe.write_text(f"model: {ctx.model}\ndevice: cpu\noutput: {ctx.tmp}/out\n"
                      f"calibration: {{source: \"file:{ctx.extra['long']}\", nsamples: 2, batch_size: 2}}\n"
                      "stages: [{method: wanda, sparsity: 0.5}]\n"
                      f"evaluation: {{ppl_files: [\"{ctx.extra['long']}\"], max_windows: 1}}\n")
    res = run_checked(["run", recipe, "--quiet"], exit_code=0, changes=True)
    assert NOTE.format(default=2048) in _notes(res)
    manifest = json.loads((ctx.tmp / "out" / "compresskit.json").read_text())
    assert manifest["calibration"]["seqlen"] == 256
    assert json.loads((ctx.tmp / "out" / "eval.json").read_text())["perplexity"]["long"]["seqlen"] == 256


def test_fit_seqlen_rule():
    import warnings

    from transformers import LlamaConfig

    from compresskit.errors import CompressKitNote, InputError
    from compresskit.models.context import fit_seqlen

    config = LlamaConfig(max_position_embeddings=512)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert fit_seqlen(config, None, 2048) == (512, 2048)
        assert fit_seqlen(config, None, 256) == (256, None)
        assert fit_seqlen(config, 300, 2048) == (300, None)
    assert [w.category for w in seen] == [CompressKitNote]
    assert "--seqlen not given: using 512" in str(seen[0].message)
    with pytest.raises(InputError, match="--seqlen 2048 is above the model's max_position_embeddings 512"):
        fit_seqlen(config, 2048, 2048)


# ----------------------------------------------------------------------------- inspect --plot: the positive side
def test_inspect_plot_writes_its_own_png_and_may_replace_it(ctx):
    from compresskit.outputs import written_by_compresskit

    target = ctx.tmp / "removed"
    for _ in range(2):  # the second run replaces the plot the first wrote
        run_checked(["inspect", ctx.extra["finercut"], "--plot", target], exit_code=0, changes=True)
        written = target.with_name("removed.png")
        assert written.is_file() and not target.exists() and written_by_compresskit(written, "png")
    beside = ctx.tmp / "ck"
    shutil.copytree(ctx.extra["finercut"], beside)
    run_checked(["inspect", beside, "--plot", beside / "removed.png"], exit_code=0, changes=True)
    assert written_by_compresskit(beside / "removed.png", "png")  # a results file beside the weights, like eval.json


# ----------------------------------------------------------------------------- --force: the positive side
def test_force_replaces_a_checkpoint_with_its_own_results(ctx):
    """A real checkpoint holding only the layout and compresskit's own results / plots is replaced."""
    ck = ctx.tmp / "ck"
    shutil.copytree(ctx.extra["finercut"], ck)
    run_checked(["eval", ck, "--ppl-file", ctx.text, "--seqlen", "16", "--max-windows", "1", "--json",
                 ck / "eval.json", *CPU], exit_code=0, changes=True)
    run_checked(["inspect", ck, "--plot", ck / "removed.png"], exit_code=0, changes=True)
    run_checked(["prune", "--model", ctx.model, "--method", "magnitude", "--sparsity", "0.5", "--out", ck, "--force",
                 *CPU], exit_code=0, changes=True)
    assert json.loads((ck / "compresskit.json").read_text())["method"] == "magnitude"
    assert not (ck / "eval.json").exists() and not (ck / "removed.png").exists()
    assert [p.name for p in ctx.tmp.iterdir() if p.name.startswith(".ck.")] == []  # no temporary or old copy left


def test_checkpoint_recognition(ctx):
    from compresskit.outputs import is_checkpoint_dir

    assert is_checkpoint_dir(ctx.ckpt)
    fake = ctx.tmp / "fake"
    fake.mkdir()
    for text in ("", "[]", "{}", FAKE_MANIFEST, json.dumps({**json.loads((ctx.ckpt / "compresskit.json").read_text()),
                                                          "written_by": "someone", "versions": {}})):
        (fake / "compresskit.json").write_text(text)
        assert not is_checkpoint_dir(fake), text
    old = json.loads((ctx.ckpt / "compresskit.json").read_text())
    old.pop("written_by")  # a checkpoint of an earlier compresskit: recognised by the version it records
    (fake / "compresskit.json").write_text(json.dumps(old))
    assert is_checkpoint_dir(fake)


def test_the_save_rechecks_the_output_at_the_end(ctx):
    """A foreign file that appears in the output while the model is compressed is not deleted by the
    final swap: the save refuses, and the temporary folder is removed."""
    from compresskit.checkpoint.writer import atomic_directory
    from compresskit.errors import OutputError

    ck = ctx.tmp / "ck"
    shutil.copytree(ctx.ckpt, ck)
    with pytest.raises(OutputError, match="also holds late.txt"):
        with atomic_directory(ck, force=True) as tmp:
            (tmp / "compresskit.json").write_text("{}")
            (ck / "late.txt").write_text("written while compressing")
    assert (ck / "late.txt").read_text() == "written while compressing"
    assert sorted(p.name for p in ctx.tmp.iterdir()) == ["ck"]


# ----------------------------------------------------------------------------- option → input: one place
def test_option_inputs_walks_every_option_value():
    from compresskit.outputs import option_inputs

    assert option_inputs("file:a.jsonl", {"from_order": "ck", "experts": 2, "nested": [Path("x"), ("y",)]}, None) \
        == ["file:a.jsonl", "ck", "x", "y"]

