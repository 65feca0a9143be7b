"""Hostile inputs and faults (issue 8, part A), one table: every row is a CLI call that must end with
exit 2 and exactly one ``error: ...`` line, no traceback, and leave the input model, the shared
checkpoints, the row's folder (outputs' parents, files named on the command line) byte for byte as
they were (``hostile_harness.run_row`` hashes them before and after).

Rows: data loss (outputs that are inputs, inside checkpoints, foreign files, directories, --force
on anything but a checkpoint, selections that match nothing), faults that used to be tracebacks
(corrupt weights / manifests / rank maps, disk full, read-only parents, closed pipes), and the
audit's "ok rows" (bad sparsity, patterns, paths, calibration files, recipes, method options) so
the table is complete on its own. Tests after the table cover what is not a failing row:
provenance, stale temporary directories, permissions, the calibration cache key, ``| head``.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from hostile_harness import Ctx, Row, make_inputs, run_checked, run_row


@pytest.fixture(scope="session")
def shared_inputs(tmp_path_factory, tiny_model_dir) -> Ctx:
    return make_inputs(tmp_path_factory.mktemp("hostile-inputs"), tiny_model_dir("llama"))


@pytest.fixture
def ctx(shared_inputs, tmp_path) -> Ctx:
    return dataclasses.replace(shared_inputs, tmp=tmp_path)


# ----------------------------------------------------------------------------- setups
def _copy(src_key: str, name: str = "ck"):
    """Setup: copy a shared input (model / ckpt / welore) to {tmp}/NAME, then return it."""

    def setup(ctx: Ctx) -> Path:
        src = {"model": ctx.model, "ckpt": ctx.ckpt, **ctx.extra}[src_key]
        dst = ctx.tmp / name
        shutil.copytree(src, dst)
        return dst

    return setup


def _then(*steps):
    def setup(ctx: Ctx):
        for step in steps:
            step(ctx)

    return setup


def _truncate(rel: str, keep: int | None = None, drop: int | None = None):
    def step(ctx: Ctx):
        f = ctx.tmp / rel
        size = f.stat().st_size
        os.truncate(f, keep if keep is not None else size - drop)

    return step


def _random_bytes(rel: str, n: int = 50_000):
    def step(ctx: Ctx):
        (ctx.tmp / rel).write_bytes(os.urandom(n))

    return step


def _edit_json(rel: str, fn):
    def step(ctx: Ctx):
        f = ctx.tmp / rel
        data = json.loads(f.read_text())
        f.write_text(json.dumps(fn(data)))

    return step


def _write(rel: str, text: str | bytes):
    def step(ctx: Ctx):
        f = ctx.tmp / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(text) if isinstance(text, bytes) else f.write_text(text)

    return step


def _mkdir(rel: str):
    def step(ctx: Ctx):
        (ctx.tmp / rel).mkdir(parents=True, exist_ok=True)

    return step


def _set(d: dict, key, value) -> dict:
    d[key] = value
    return d


def _bump_rank(manifest: dict) -> dict:
    ranks = manifest["structure"][0]["ranks"]
    name = next(iter(ranks))
    ranks[name] += 3
    return manifest


def _sharded_checkpoint(ctx: Ctx):
    """{tmp}/ck: the magnitude checkpoint re-saved in several small shards (with an index)."""
    from transformers import AutoModelForCausalLM

    dst = ctx.tmp / "ck"
    shutil.copytree(ctx.ckpt, dst)
    for f in dst.glob("*.safetensors"):
        f.unlink()
    AutoModelForCausalLM.from_pretrained(ctx.ckpt).save_pretrained(dst, max_shard_size="1MB")
    assert len(list(dst.glob("*.safetensors"))) > 1


def _truncate_shard(ctx: Ctx):
    """Cut 100 bytes off the second shard of {tmp}/ck."""
    shard = sorted((ctx.tmp / "ck").glob("*.safetensors"))[1]
    os.truncate(shard, shard.stat().st_size - 100)


def _pickle_garbage(ctx: Ctx):
    dst = ctx.tmp / "m"
    shutil.copytree(ctx.model, dst)
    for f in dst.glob("*.safetensors"):
        f.unlink()
    (dst / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle" + os.urandom(200))


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


def _disk_full_on_manifest(monkeypatch, ctx: Ctx):
    from compresskit.checkpoint.manifest import Manifest

    def full(self, directory):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(directory) / "compresskit.json"))

    monkeypatch.setattr(Manifest, "write", full)


def _disk_full_on_fsync(monkeypatch, ctx: Ctx):
    import compresskit.outputs as outputs

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(outputs.os, "fsync", full)


RECIPE = """\
model: {model}
device: cpu
output: {out}
calibration: {{source: "file:{calib}", nsamples: 2, seqlen: 16, batch_size: 2}}
stages: [{{method: magnitude, sparsity: 0.5}}]
evaluation: {{ppl_files: ["{text}"], seqlen: 16, max_windows: 2}}
"""


def _recipe(out: str, name: str = "r.yaml", stages: bool = True, model: str = "{model}"):
    def step(ctx: Ctx):
        text = RECIPE.format(model=ctx.format(model), out=ctx.format(out), calib=ctx.calib, text=ctx.text)
        if not stages:
            text = text.replace("stages: [{method: magnitude, sparsity: 0.5}]\n", "")
        (ctx.tmp / name).write_text(text)

    return step


# ----------------------------------------------------------------------------- the table
PRUNE = ["prune", "--model", "{model}", "--device", "cpu", "--quiet"]
MAG = [*PRUNE, "--method", "magnitude", "--sparsity", "0.5"]
CAL = ["--calib", "file:{calib}", "--nsamples", "2", "--seqlen", "16", "--batch-size", "2"]
WANDA = [*PRUNE, "--method", "wanda", "--sparsity", "0.5", *CAL]
EVAL = ["--ppl-file", "{text}", "--seqlen", "16", "--max-windows", "2", "--device", "cpu", "--quiet"]

ROWS = [
    # -- data loss 1: eval --json over anything that is not an earlier results file
    Row("eval --json into checkpoint weights", ["eval", "{ckpt}", *EVAL, "--json", "{ckpt}/model.safetensors"],
        needle="inside the input checkpoint"),
    Row("eval --json over the manifest", ["eval", "{ckpt}", *EVAL, "--json", "{ckpt}/compresskit.json"],
        needle="inside the input checkpoint"),
    Row("eval --json over a foreign file", ["eval", "{ckpt}", *EVAL, "--json", "{tmp}/notes.json"],
        setup=_write("notes.json", '{"mine": true}'), needle="not a compresskit results file"),
    Row("eval --json over its ppl file", ["eval", "{ckpt}", *EVAL, "--json", "{text}"], needle="input file"),
    Row("eval --json into the input model", ["eval", "--model", "{model}", *EVAL, "--json", "{model}/eval.json"],
        needle="inside the input model"),
    Row("eval --json DIR", ["eval", "{ckpt}", *EVAL, "--json", "{tmp}/d"], setup=_mkdir("d"), needle="is a directory"),
    # -- data loss 3: two outputs of one command, an input as output
    Row("eval --json X --baseline-json X", ["eval", "{ckpt}", *EVAL, "--baseline", "--json", "{tmp}/x.json",
                                            "--baseline-json", "{tmp}/x.json"], needle="same path"),
    Row("eval --baseline-json over the checkpoint weights", ["eval", "{ckpt}", *EVAL, "--baseline", "--json",
                                                             "{tmp}/x.json", "--baseline-json", "{ckpt}/model.safetensors"],
        needle="inside the input checkpoint"),
    Row("compare --out its own input", ["compare", "{results}", "{tmp}/b.json", "--out", "{results}"],
        setup=lambda c: shutil.copy(c.extra["results"], c.tmp / "b.json"), needle="is the input file"),
    Row("compare --out DIR", ["compare", "{results}", "{results}", "--out", "{tmp}/d"], setup=_mkdir("d"),
        needle="is a directory"),
    Row("compare --out a foreign file", ["compare", "{results}", "{results}", "--out", "{tmp}/README.md"],
        setup=_write("README.md", "# mine\n"), needle="not a compresskit markdown file"),
    # -- data loss 2: --force replaces only a checkpoint or an empty directory
    Row("prune --out . --force", [*MAG, "--out", ".", "--force"], cwd="{tmp}", setup=_write("keep.txt", "x"),
        needle="current directory"),
    Row("prune --out PARENT-OF-CWD --force", [*MAG, "--out", "..", "--force"], cwd="{tmp}/sub",
        setup=_mkdir("sub"), needle="current directory or one of its parents"),
    Row("prune --force over a folder of other files", [*MAG, "--out", "{tmp}/docs", "--force"],
        setup=_write("docs/thesis.tex", "precious"), needle="neither a compresskit checkpoint nor empty"),
    Row("prune --force over the folder holding the calibration file", [*WANDA[:-8], "--calib", "file:{tmp}/c/calib.jsonl",
                                                                       *CAL[2:], "--out", "{tmp}/c", "--force"],
        setup=lambda c: (c.tmp.joinpath("c").mkdir(), shutil.copy(c.calib, c.tmp / "c" / "calib.jsonl")),
        needle="holds the input file"),
    Row("prune --force over the folder holding the model", ["prune", "--model", "{tmp}/w/m", "--device", "cpu",
                                                            "--method", "magnitude", "--sparsity", "0.5",
                                                            "--out", "{tmp}/w", "--force"],
        setup=lambda c: shutil.copytree(c.model, c.tmp / "w" / "m"), needle="holds the input model"),
    Row("prune --out the model --force", [*MAG, "--out", "{model}", "--force"], needle="is the input model"),
    Row("prune --out inside the model", [*MAG, "--out", "{model}/pruned"], needle="inside the input model"),
    Row("prune --out the input checkpoint --force", ["prune", "--model", "{ckpt}", "--device", "cpu", "--method",
                                                     "magnitude", "--sparsity", "0.6", "--out", "{ckpt}", "--force"],
        needle="is the input checkpoint"),
    Row("prune --out an existing file", [*MAG, "--out", "{tmp}/f"], setup=_write("f", "x"),
        needle="not a directory"),
    Row("prune --out existing checkpoint without --force", [*MAG, "--out", "{tmp}/ck"], setup=_copy("ckpt"),
        needle="--force"),
    Row("finetune --out a foreign folder --force", ["finetune", "{welore}", "--data", "file:{calib}", "--steps", "1",
                                                    "--seqlen", "16", "--out", "{tmp}/docs", "--force", "--device", "cpu"],
        setup=_write("docs/a.txt", "x"), needle="neither a compresskit checkpoint nor empty"),
    Row("finetune --out the folder holding its --data file", ["finetune", "{welore}", "--data", "file:{tmp}/d/c.txt",
                                                             "--steps", "1", "--seqlen", "16", "--out", "{tmp}/d",
                                                             "--force", "--device", "cpu"],
        # d is a compresskit checkpoint (so --force could replace it) that also holds the training text
        setup=lambda c: (_copy("ckpt", "d")(c), _write("d/c.txt", "some words " * 200)(c)), needle="holds"),
    Row("run: output is the input model", ["run", "{tmp}/r.yaml", "--quiet"], setup=_recipe("{model}"),
        needle="is the input model"),
    Row("run without stages: eval.json into the input model", ["run", "{tmp}/r.yaml", "--quiet"],
        setup=_recipe("{model}", stages=False), needle="inside the input model"),
    Row("run: output holds the recipe, --force", ["run", "{tmp}/o/r.yaml", "--quiet", "--force"],
        setup=lambda c: (c.tmp.joinpath("o").mkdir(), _recipe("{tmp}/o", name="o/r.yaml")(c)),
        needle="holds the input file"),
    Row("run: report.md over a foreign file", ["run", "{tmp}/r.yaml", "--quiet"],
        setup=_then(_recipe("{tmp}/res", stages=False), _write("res/report.md", "my notes\n")),
        needle="not a compresskit markdown file"),
    # -- data loss 4: a selection that leaves nothing to compress
    Row("prune --include zzz", [*MAG, "--include", "zzz", "--out", "{tmp}/o"], needle="no decoder linear"),
    Row("prune --exclude '.*'", [*WANDA, "--exclude", ".*", "--out", "{tmp}/o"], needle="no decoder linear"),
    Row("owl --exclude '.*'", [*PRUNE, "--method", "owl", "--sparsity", "0.5", *CAL, "--exclude", ".*",
                               "--out", "{tmp}/o"], needle="no decoder linear"),
    Row("welore --include zzz", [*PRUNE, "--method", "welore", "--rank-reduction", "0.5", "--include", "zzz",
                                 "--out", "{tmp}/o"], needle="no decoder linear"),
    # -- tracebacks that must be one line: corrupt weights
    Row("eval truncated safetensors", ["eval", "{tmp}/ck", *EVAL],
        setup=_then(_copy("ckpt"), _truncate("ck/model.safetensors", drop=5000)), needle="model.safetensors is truncated"),
    Row("eval safetensors cut inside its header", ["eval", "{tmp}/ck", *EVAL],
        setup=_then(_copy("ckpt"), _truncate("ck/model.safetensors", keep=1000)), needle="model.safetensors"),
    Row("eval random-bytes safetensors", ["eval", "{tmp}/ck", *EVAL],
        setup=_then(_copy("ckpt"), _random_bytes("ck/model.safetensors")), needle="model.safetensors"),
    Row("prune a model with truncated safetensors", ["prune", "--model", "{tmp}/m", "--method", "magnitude",
                                                     "--sparsity", "0.5", "--out", "{tmp}/o", "--device", "cpu"],
        setup=_then(_copy("model", "m"), _truncate("m/model.safetensors", drop=5000)), needle="truncated"),
    Row("prune a model with random-bytes safetensors", ["prune", "--model", "{tmp}/m", "--method", "magnitude",
                                                        "--sparsity", "0.5", "--out", "{tmp}/o", "--device", "cpu"],
        setup=_then(_copy("model", "m"), _random_bytes("m/model.safetensors")), needle="model.safetensors"),
    Row("prune a second stage from a truncated checkpoint", ["prune", "--model", "{tmp}/ck", "--method", "magnitude",
                                                             "--sparsity", "0.6", "--out", "{tmp}/o", "--device", "cpu"],
        setup=_then(_copy("ckpt"), _truncate("ck/model.safetensors", drop=5000)), needle="truncated"),
    Row("eval a truncated shard", ["eval", "{tmp}/ck", *EVAL], setup=_then(_sharded_checkpoint, _truncate_shard),
        needle="-of-0000"),
    Row("prune from a truncated shard", ["prune", "--model", "{tmp}/ck", "--method", "magnitude", "--sparsity", "0.6",
                                         "--out", "{tmp}/o", "--device", "cpu"],
        setup=_then(_sharded_checkpoint, _truncate_shard), needle="-of-0000"),
    Row("config sizes disagree with the weights (prune)", ["prune", "--model", "{tmp}/m", "--method", "magnitude",
                                                           "--sparsity", "0.5", "--out", "{tmp}/o", "--device", "cpu"],
        setup=_then(_copy("model", "m"), _edit_json("m/config.json", lambda c: _set(c, "intermediate_size", 256))),
        needle="do not match config.json"),
    Row("config sizes disagree with the weights (eval)", ["eval", "{tmp}/ck", *EVAL],
        setup=_then(_copy("ckpt"), _edit_json("ck/config.json", lambda c: _set(c, "hidden_size", 128))),
        needle="do not match config.json"),
    Row("pytorch_model.bin that does not unpickle (prune)", ["prune", "--model", "{tmp}/m", "--method", "magnitude",
                                                             "--sparsity", "0.5", "--out", "{tmp}/o", "--device", "cpu"],
        setup=_pickle_garbage, needle="cannot be unpickled"),
    Row("pytorch_model.bin that does not unpickle (eval)", ["eval", "--model", "{tmp}/m", *EVAL],
        setup=_pickle_garbage, needle="cannot be unpickled"),
    # -- corrupt manifests and rank maps
    Row("inspect a manifest that is a list", ["inspect", "{tmp}/ck"],
        setup=_then(_copy("ckpt"), _write("ck/compresskit.json", "[1, 2]")), needle="must hold a JSON object"),
    Row("eval a manifest that is a list", ["eval", "{tmp}/ck", *EVAL],
        setup=_then(_copy("ckpt"), _write("ck/compresskit.json", "[1, 2]")), needle="must hold a JSON object"),
    Row("inspect format_version 'abc'", ["inspect", "{tmp}/ck"],
        setup=_then(_copy("ckpt"), _edit_json("ck/compresskit.json", lambda m: _set(m, "format_version", "abc"))),
        needle="format_version"),
    Row("eval format_version null", ["eval", "{tmp}/ck", *EVAL],
        setup=_then(_copy("ckpt"), _edit_json("ck/compresskit.json", lambda m: _set(m, "format_version", None))),
        needle="format_version"),
    Row("inspect a manifest that is not JSON", ["inspect", "{tmp}/ck"],
        setup=_then(_copy("ckpt"), _write("ck/compresskit.json", "{not json")), needle="not valid JSON"),
    Row("eval a rank map that disagrees with the factors", ["eval", "{tmp}/ck", *EVAL],
        setup=_then(_copy("welore"), _edit_json("ck/compresskit.json", _bump_rank)),
        needle="structure disagrees with the stored weights"),
    Row("prune from a rank map that disagrees", ["prune", "--model", "{tmp}/ck", "--method", "magnitude", "--sparsity",
                                                 "0.5", "--out", "{tmp}/o", "--device", "cpu"],
        setup=_then(_copy("welore"), _edit_json("ck/compresskit.json", _bump_rank)), needle="disagrees"),
    # -- writing fails: disk full, read-only parent (checked before compute)
    Row("disk full while saving a checkpoint", [*MAG, "--out", "{tmp}/o"], patch=_disk_full_on_manifest,
        needle="No space left on device"),
    Row("disk full while writing eval --json", ["eval", "{ckpt}", *EVAL, "--json", "{tmp}/e.json"],
        patch=_disk_full_on_fsync, needle="No space left on device"),
    Row("prune into a read-only parent", [*MAG, "--out", "{tmp}/ro/o"], setup=_read_only("ro"),
        patch=_no_write_access, needle="is not writable"),
    Row("eval --json into a read-only parent", ["eval", "{ckpt}", *EVAL, "--json", "{tmp}/ro/e.json"],
        setup=_read_only("ro"), patch=_no_write_access, needle="is not writable"),
    Row("compare --out into a read-only parent", ["compare", "{results}", "{results}", "--out", "{tmp}/ro/t.md"],
        setup=_read_only("ro"), patch=_no_write_access, needle="is not writable"),
    Row("prune --out below a file", [*MAG, "--out", "{tmp}/f/o"], setup=_write("f", "x"), needle="is a file"),
    # -- eval options
    Row("eval --limit -5", ["eval", "{ckpt}", *EVAL, "--limit", "-5"], needle="--limit"),
    Row("eval --limit 0", ["eval", "{ckpt}", *EVAL, "--limit", "0"], needle="--limit"),
    Row("eval --limit abc", ["eval", "{ckpt}", *EVAL, "--limit", "abc"], needle="--limit"),
    # -- the audit's ok rows: sparsity, patterns
    Row("sparsity 1.5", [*PRUNE, "--method", "wanda", "--sparsity", "1.5", "--out", "{tmp}/o"], needle="[0, 1)"),
    Row("sparsity -0.1", [*PRUNE, "--method", "wanda", "--sparsity", "-0.1", "--out", "{tmp}/o"], needle="[0, 1)"),
    Row("sparsity 'half'", [*PRUNE, "--method", "wanda", "--sparsity", "half", "--out", "{tmp}/o"], needle="--sparsity"),
    Row("sparsity missing", [*PRUNE, "--method", "wanda", "--out", "{tmp}/o"], needle="--sparsity"),
    Row("pattern 3:7 does not divide", [*PRUNE, "--method", "wanda", "--pattern", "3:7", *CAL, "--out", "{tmp}/o"],
        needle="multiple of 7"),
    Row("pattern 5:4", [*PRUNE, "--method", "wanda", "--pattern", "5:4", "--out", "{tmp}/o"], needle="5:4"),
    Row("pattern 'abc'", [*PRUNE, "--method", "wanda", "--pattern", "abc", "--out", "{tmp}/o"], needle="abc"),
    Row("pattern with a different --sparsity", [*PRUNE, "--method", "wanda", "--pattern", "2:4", "--sparsity", "0.7",
                                                "--out", "{tmp}/o"], needle="2:4"),
    Row("sparsity with welore", [*PRUNE, "--method", "welore", "--rank-reduction", "0.5", "--sparsity", "0.5",
                                 "--out", "{tmp}/o"], needle="do not apply"),
    # -- paths
    Row("missing model path", ["prune", "--model", "{tmp}/nope", "--method", "wanda", "--sparsity", "0.5",
                               "--out", "{tmp}/o"], needle="nope"),
    Row("model path is a file", ["prune", "--model", "{tmp}/f", "--method", "magnitude", "--sparsity", "0.5",
                                 "--out", "{tmp}/o"], setup=_write("f", "x"), needle="is a file"),
    Row("model dir without config.json", ["prune", "--model", "{tmp}/d", "--method", "magnitude", "--sparsity", "0.5",
                                          "--out", "{tmp}/o"], setup=_mkdir("d"), needle="config.json"),
    Row("eval a missing checkpoint", ["eval", "{tmp}/nope", *EVAL], needle="nope"),
    Row("eval a missing --ppl-file", ["eval", "{ckpt}", "--ppl-file", "{tmp}/nope.txt", "--seqlen", "16",
                                      "--device", "cpu"], needle="nope.txt"),
    Row("inspect a missing directory", ["inspect", "{tmp}/nope"], needle="nope"),
    Row("inspect a folder without manifest", ["inspect", "{model}"], needle="compresskit.json"),
    Row("compare a missing file", ["compare", "{results}", "{tmp}/nope.json"], needle="nope.json"),
    Row("compare a file that is not JSON", ["compare", "{results}", "{text}"], needle="not valid JSON"),
    Row("compare one file", ["compare", "{results}"], needle="at least two"),
    Row("baseline of a plain model", ["eval", "{model}", *EVAL, "--baseline"], needle="not a compresskit checkpoint"),
    # -- calibration files
    Row("calibration file missing", [*WANDA[:-8], "--calib", "file:{tmp}/missing.jsonl", *CAL[2:], "--out", "{tmp}/o"],
        needle="missing.jsonl"),
    Row("calibration file of random bytes", [*WANDA[:-8], "--calib", "file:{tmp}/bad.jsonl", *CAL[2:],
                                             "--out", "{tmp}/o"],
        setup=_write("bad.jsonl", b"\xff\xfe not json\n"), needle="bad.jsonl"),
    Row("calibration file empty", [*WANDA[:-8], "--calib", "file:{tmp}/empty.txt", *CAL[2:], "--out", "{tmp}/o"],
        setup=_write("empty.txt", ""), needle="empty.txt"),
    Row("calibration jsonl without a text field", [*WANDA[:-8], "--calib", "file:{tmp}/q.jsonl", *CAL[2:],
                                                   "--out", "{tmp}/o"],
        setup=_write("q.jsonl", '{"question": "a b c"}\n' * 4), needle="q.jsonl"),
    Row("calibration documents too short", [*WANDA[:-8], "--calib", "file:{tmp}/short.txt", "--nsamples", "2",
                                            "--seqlen", "200", "--batch-size", "2", "--out", "{tmp}/o"],
        setup=_write("short.txt", "too short"), needle="short.txt"),
    Row("unknown calibration source", [*WANDA[:-8], "--calib", "nosuchset", *CAL[2:], "--out", "{tmp}/o"],
        needle="nosuchset"),
    # -- method options
    Row("unknown method", [*PRUNE, "--method", "bogus", "--sparsity", "0.5", "--out", "{tmp}/o"], needle="unknown method"),
    Row("owl-m negative", [*PRUNE, "--method", "owl", "--sparsity", "0.5", "--owl-m", "-1", "--out", "{tmp}/o"],
        needle="--method owl: --owl-m must be greater than 0 (got -1.0)"),
    Row("owl option with wanda", [*PRUNE, "--method", "wanda", "--sparsity", "0.5", "--owl-m", "3", "--out", "{tmp}/o"],
        needle="--owl-m does not apply"),
    Row("welore rank reduction 1.5", [*PRUNE, "--method", "welore", "--rank-reduction", "1.5", "--out", "{tmp}/o"],
        needle="rank"),
    Row("welore without rank reduction", [*PRUNE, "--method", "welore", "--out", "{tmp}/o"], needle="--rank-reduction"),
    Row("unknown pruner", [*PRUNE, "--method", "owl", "--pruner", "bogus", "--sparsity", "0.5", "--out", "{tmp}/o"],
        needle="unknown pruner"),
    Row("bad include regex", [*MAG, "--include", "(", "--out", "{tmp}/o"], needle="regex"),
    Row("unknown dtype", [*MAG, "--dtype", "float8", "--out", "{tmp}/o"], needle="dtype"),
    # -- recipes
    Row("recipe: unknown field", ["run", "{tmp}/bad.yaml"], setup=_write("bad.yaml", "model: m\ncolour: red\n"),
        needle="bad.yaml:2: colour"),
    Row("recipe: not YAML", ["run", "{tmp}/bad.yaml"], setup=_write("bad.yaml", "model: m\nstages:\n  - [x\n"),
        needle="not valid YAML"),
    Row("recipe: sparsity out of range", ["run", "{tmp}/bad.yaml"],
        setup=_write("bad.yaml", "model: m\nstages:\n  - method: wanda\n    sparsity: 1.5\n"), needle="stages.0.sparsity"),
    Row("recipe: bad method option", ["run", "{tmp}/bad.yaml"],
        setup=_write("bad.yaml", "model: m\nstages:\n  - method: owl\n    sparsity: 0.5\n    owl_m: -1\n"),
        needle="stages.0.owl_m"),
    Row("recipe missing", ["run", "{tmp}/nope.yaml"], needle="nope.yaml"),
    Row("recipe: existing output without force", ["run", "{tmp}/r.yaml", "--quiet"],
        setup=_then(_recipe("{tmp}/ck"), _copy("ckpt")), needle="--force"),
]


def test_row_ids_are_unique():
    ids = [r.id for r in ROWS]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("row", ROWS, ids=str)
def test_row(row, ctx, monkeypatch):
    run_row(row, ctx, monkeypatch)


# ----------------------------------------------------------------------------- what a row cannot say
def test_results_file_may_go_beside_checkpoint_weights_and_be_replaced(ctx):
    """The README's `eval ck --baseline --json ck/eval.json`: results files beside the weights are fine,
    and an earlier results file (recognised by its schema fields) is replaced."""
    ck = ctx.tmp / "ck"
    shutil.copytree(ctx.ckpt, ck)
    for _ in range(2):
        run_checked(["eval", ck, *[ctx.format(a) for a in EVAL], "--baseline", "--json", ck / "eval.json"],
                    exit_code=0, changes=True)
    assert json.loads((ck / "eval.json").read_text())["schema_version"] == 1
    assert json.loads((ck / "eval.baseline.json").read_text())["extra"]["baseline_of"] == str(ck)
    md = ctx.tmp / "t.md"
    for _ in range(2):  # compare --out replaces its own earlier table (first-line marker)
        run_checked(["compare", ck / "eval.baseline.json", ck / "eval.json", "--out", md], exit_code=0, changes=True)
    assert md.read_text().startswith("<!-- written by compresskit -->\n")


def test_relative_model_is_recorded_absolute_and_baseline_works_elsewhere(ctx):
    work = ctx.tmp / "work"
    shutil.copytree(ctx.model, work / "models" / "llama")
    run_checked(["prune", "--model", "models/llama", "--method", "magnitude", "--sparsity", "0.5", "--out", "out/m",
                 "--device", "cpu", "--quiet"], exit_code=0, cwd=work, changes=True)
    manifest = json.loads((work / "out" / "m" / "compresskit.json").read_text())
    assert manifest["base_model"] == str((work / "models" / "llama").resolve())
    elsewhere = ctx.tmp / "elsewhere"
    elsewhere.mkdir()
    res = run_checked(["eval", work / "out" / "m", *[ctx.format(a) for a in EVAL], "--baseline", "--json", "-"],
                      exit_code=0, cwd=elsewhere, changes=True)
    data = json.loads(res.stdout)
    assert data["baseline"]["model"]["path"] == manifest["base_model"]


def test_builtin_names_stay_as_typed():
    from pathlib import Path

    from compresskit.checkpoint.reader import LoadedModel
    from compresskit.models.source import Source

    def provenance(source):
        return LoadedModel(model=None, tokenizer=None, source=source, loading="lazy").provenance

    assert provenance(Source("smollm2-135m", "builtin", Path("/cache/models/smollm2-135m"))) == "smollm2-135m"
    assert provenance(Source("org/some-hub-model", "hub")) == "org/some-hub-model"  # no such local path: a Hub id
    assert provenance(Source("rel/dir", "local", Path("rel/dir"))) == str(Path("rel/dir").resolve())


def test_stale_temporaries_of_dead_processes_are_removed_live_ones_kept(ctx):
    from compresskit.outputs import HOST as _HOST

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = ctx.tmp / f".o.tmp-{_HOST}-{dead.pid}-abc123"
    live = ctx.tmp / f".o.tmp-{_HOST}-1-def456"  # pid 1 is always alive
    other_host = ctx.tmp / f".o.tmp-elsewhere-{dead.pid}-ghi789"
    for d in (stale, live, other_host):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    run_checked([*[ctx.format(a) for a in MAG], "--out", ctx.tmp / "o"], exit_code=0, changes=True)
    assert not stale.exists() and live.exists() and other_host.exists()
    assert (ctx.tmp / "o" / "compresskit.json").is_file()
    leftovers = [p.name for p in ctx.tmp.iterdir() if p.name.startswith(".o.") and p not in (live, other_host)]
    assert leftovers == []


def test_output_directories_honour_the_umask(ctx):
    old = os.umask(0o027)
    try:
        run_checked([*[ctx.format(a) for a in MAG], "--out", ctx.tmp / "o"], exit_code=0, changes=True)
        run_checked(["eval", ctx.tmp / "o", *[ctx.format(a) for a in EVAL], "--json", ctx.tmp / "e.json"],
                    exit_code=0, changes=True)
    finally:
        os.umask(old)
    assert stat.S_IMODE((ctx.tmp / "o").stat().st_mode) == 0o750
    assert stat.S_IMODE((ctx.tmp / "e.json").stat().st_mode) == 0o640


def test_calibration_cache_is_keyed_on_content(ctx):
    """New content with the same size and mtime must not reuse the old samples or their hash."""
    calib = ctx.tmp / "c.jsonl"
    shutil.copy(ctx.calib, calib)
    args = [*[ctx.format(a) for a in PRUNE], "--method", "wanda", "--sparsity", "0.5", "--calib", f"file:{calib}",
            *CAL[2:], "--json"]
    first = json.loads(run_checked([*args, "--out", ctx.tmp / "a"], exit_code=0, changes=True).stdout)
    st = calib.stat()
    text = calib.read_text()
    calib.write_text(text.replace("rainy", "sunny").replace("harbour", "airport"))  # same length
    os.utime(calib, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert calib.stat().st_size == st.st_size and calib.stat().st_mtime_ns == st.st_mtime_ns
    second = json.loads(run_checked([*args, "--out", ctx.tmp / "b"], exit_code=0, changes=True).stdout)
    assert first["calibration"]["hash"] != second["calibration"]["hash"]


def test_closed_stdout_is_not_an_error(shared_inputs):
    """`compresskit inspect X | head -1` exits 0 and prints nothing on stderr (a real pipe)."""
    exe = Path(sys.executable).with_name("compresskit")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "compresskit.cli"]
    proc = subprocess.Popen([*cmd, "inspect", str(shared_inputs.ckpt)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()  # the reader goes away after one line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 0, err
    assert "Traceback" not in err and "error" not in err, err


class _ClosedPipe:
    """A stdout whose reader has gone: every write raises EPIPE."""

    def write(self, text):
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    def flush(self):
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    def isatty(self):
        return False


@pytest.mark.parametrize("extra", [[], ["--json"]], ids=["rich table", "print json"])
def test_closed_stdout_in_process(shared_inputs, extra, monkeypatch):
    """Both ways output is printed (rich console, plain print) end in exit 0, not a traceback or exit 1."""
    from compresskit import cli

    pipe = _ClosedPipe()
    monkeypatch.setattr(sys, "argv", ["compresskit", "inspect", str(shared_inputs.ckpt), *extra])
    monkeypatch.setattr(sys, "stdout", pipe)
    monkeypatch.setattr(sys, "stderr", sys.stderr)  # click wraps both streams on EPIPE: restore them after
    monkeypatch.setattr(cli.out_console, "file", pipe)
    monkeypatch.setattr(cli.out_console, "quiet", cli.out_console.quiet)  # a broken pipe silences the console
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 0
