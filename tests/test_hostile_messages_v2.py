"""Issue 17, processes and messages: one error line under torchrun, SIGTERM cleans up like SIGINT,
and the messages / refusals of the newer commands (table rows: exit code, exactly one ``error:``
line, inputs and bystanders unchanged)."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import run_cli
from hostile_harness import Ctx, Row, make_inputs, run_row

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"


# ----------------------------------------------------------------------------- torchrun: one line, once
def test_torchrun_user_error_is_one_line_from_rank_0(tmp_path):
    """Every rank meets the same bad option; rank 0 prints it once, every rank exits 2 (torchrun then
    reports the failed ranks itself: that report is torchrun's, not a line per rank of ours)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "compresskit",
           "prune", "--model", "m", "--method", "wanda", "--sparsity", "0.5", "--owl-m", "3", "--out", str(tmp_path / "o")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: --owl-m does not apply to --method wanda"], proc.stderr[-3000:]
    assert proc.returncode != 0 and "exitcode: 2" in proc.stderr, proc.stderr[-3000:]
    assert "compresskit/cli.py" not in proc.stderr  # no traceback of ours
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_only_rank_0_prints_errors_and_warnings(monkeypatch, tiny_model_dir, tmp_path):
    """The rule itself, for any error (here one found after the model is loaded) and for warnings."""
    import warnings

    from compresskit.errors import CompressKitWarning

    args = ["prune", "--model", str(tiny_model_dir("llama")), "--method", "wanda", "--sparsity", "0.5",
            "--calib", f"file:{tmp_path / 'missing.jsonl'}", "--out", str(tmp_path / "o"), "--device", "cpu", "--quiet"]
    monkeypatch.setenv("RANK", "1")
    res = run_cli(*args)
    assert (res.exit_code, res.stderr) == (2, "")
    monkeypatch.setenv("RANK", "0")
    res = run_cli(*args)
    assert res.exit_code == 2 and res.stderr.startswith("error: ") and len(res.stderr.splitlines()) == 1
    from compresskit import cli

    cli._show_our_warnings_as_lines()
    monkeypatch.setenv("RANK", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        cli.err_console.file = err = __import__("io").StringIO()
        try:
            warnings.warn("rank 1 says this", CompressKitWarning)
        finally:
            cli.err_console.file = sys.stderr
    assert err.getvalue() == ""


# ----------------------------------------------------------------------------- SIGTERM = SIGINT
def test_sigterm_during_save_leaves_nothing(tiny_model_dir, tmp_path, monkeypatch):
    """Mirror of test_cli_e2e.test_interrupted_save_leaves_nothing (Ctrl-C), with a real SIGTERM
    delivered to this process while the checkpoint is being written."""
    from compresskit.checkpoint import io as ckpt_io

    def sigterm(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this returns
        raise AssertionError("SIGTERM did not stop the save")

    def default_handler(*_):  # what the default action (end the process, no clean-up) stands for here
        raise AssertionError("SIGTERM reached the handler the CLI should have replaced")

    monkeypatch.setattr(ckpt_io.Manifest, "write", sigterm)
    before = signal.signal(signal.SIGTERM, default_handler)
    out = tmp_path / "o"
    try:
        res = run_cli("prune", "--model", str(tiny_model_dir("llama")), "--method", "magnitude", "--sparsity", "0.5",
                      "--out", str(out), "--device", "cpu", "--quiet")
        assert signal.getsignal(signal.SIGTERM) is default_handler  # the CLI restores the handler it replaced
    finally:
        signal.signal(signal.SIGTERM, before)
    assert res.exit_code == 143, res.stderr
    assert res.stderr.strip() == "terminated; nothing was written in place of the output"
    assert not out.exists() and os.listdir(tmp_path) == []


SPILL_CHILD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from compresskit.models import lazy_store
    from compresskit.cli import main
    spill = lazy_store.LazyStore._spill
    def spill_then_wait(self, items, done):
        spill(self, items, done)
        print("SPILLED", self.spill_dir, flush=True)
        time.sleep(120)
    lazy_store.LazyStore._spill = spill_then_wait
    sys.argv = ["compresskit", *sys.argv[1:]]
    main()
""")


def test_sigterm_during_a_lazy_prune_removes_spills_and_the_temporary_checkpoint(tiny_model_dir, tmp_path):
    """Mirror of test_lazy_spill's killed / failed prunes: SIGTERM (what torchrun sends the surviving
    ranks) runs the same clean-up as an error or Ctrl-C: no spill folder, no output, nothing in TMPDIR."""
    (tmp_path / "tmpdir").mkdir()
    out = tmp_path / "out"
    args = ["prune", "--model", str(tiny_model_dir("llama")), "--method", "wanda", "--sparsity", "0.5", "--calib", "demo",
            "--nsamples", "2", "--seqlen", "16", "--device", "cpu", "--out", str(out), "--quiet"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=str(tmp_path / "tmpdir"))
    proc = subprocess.Popen([sys.executable, "-c", SPILL_CHILD.format(tests=str(TESTS)), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline, spill_dir = time.time() + 240, None
        while time.time() < deadline and spill_dir is None:
            line = proc.stdout.readline()
            if line.startswith("SPILLED"):
                spill_dir = Path(line.split(maxsplit=1)[1].strip())
            elif not line and proc.poll() is not None:
                break
        assert spill_dir is not None and spill_dir.is_dir(), proc.stderr.read()[-2000:]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-2000:]
    assert err.strip() == "terminated; nothing was written in place of the output"
    assert not spill_dir.exists() and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tmpdir"] and list((tmp_path / "tmpdir").iterdir()) == []
