"""Where a lazily loaded model spills its changed blocks, and that nothing is left behind.

Spills (``models.lazy_store``) go beside the output of ``prune`` (never TMPDIR), else under
``$COMPRESSKIT_SPILL_DIR`` or ``<cache dir>/spill``; they are removed on success and on failure,
and a killed run's directory is removed by the next lazy load under the same root.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from compresskit.models import get_adapter
from compresskit.models.lazy import load_lazily
from compresskit.models.lazy_store import SPILL_PREFIX
from compresskit.models.placement import onload
from tiny_models import tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("spill") / "llama"
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def _spills(root: Path) -> list[Path]:
    return sorted(root.glob(f"{SPILL_PREFIX}*")) if root.is_dir() else []


def _edit_block_zero(model) -> None:
    block = get_adapter(model).block(0)
    with onload(block, "cpu"):
        block.mlp.up_proj.weight.data.zero_()


def test_spills_go_to_the_configured_root_not_tmpdir(llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmpdir"))
    monkeypatch.setenv("COMPRESSKIT_CACHE_DIR", str(tmp_path / "cache"))
    model = load_lazily(llama_dir)
    _edit_block_zero(model)
    assert [p.parent for p in _spills(tmp_path / "cache" / "spill")] == [tmp_path / "cache" / "spill"]

    monkeypatch.setenv("COMPRESSKIT_SPILL_DIR", str(tmp_path / "env"))
    env_model = load_lazily(llama_dir)
    _edit_block_zero(env_model)
    assert len(_spills(tmp_path / "env")) == 1

    explicit = load_lazily(llama_dir, spill_root=tmp_path / "explicit")
    _edit_block_zero(explicit)
    assert len(_spills(tmp_path / "explicit")) == 1
    assert not (tmp_path / "tmpdir").exists()

    store_dir = Path(explicit._compresskit_lazy_store.spill_dir)
    del explicit
    import gc

    gc.collect()
    assert not store_dir.exists()  # removed with the model


def test_a_read_only_pass_creates_no_spill_directory(llama_dir, tmp_path):
    model = load_lazily(llama_dir, spill_root=tmp_path)
    for i in range(get_adapter(model).num_blocks):
        with onload(get_adapter(model).block(i), "cpu"):
            pass
    assert _spills(tmp_path) == []


CHILD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from compresskit.models import lazy_store
    from compresskit.cli import main
    spill = lazy_store.LazyStore._spill
    def spill_then_stop(self, items, done):
        spill(self, items, done)
        print("SPILLED", self.spill_dir, flush=True)
        if sys.argv[1] == "kill":
            time.sleep(120)
        raise RuntimeError("simulated failure after the first spill")
    lazy_store.LazyStore._spill = spill_then_stop
    sys.argv = ["compresskit", *sys.argv[2:]]
    main()
""")


def _prune_child(mode: str, llama_dir: Path, out: Path) -> subprocess.Popen:
    args = ["prune", "--model", str(llama_dir), "--method", "wanda", "--sparsity", "0.5", "--calib", "demo",
            "--nsamples", "2", "--seqlen", "16", "--device", "cpu", "--out", str(out), "--quiet"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=str(out.parent / "tmpdir"))
    return subprocess.Popen([sys.executable, "-c", CHILD.format(tests=str(ROOT / "tests")), mode, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _spilled_line(proc: subprocess.Popen) -> str:
    deadline = time.time() + 240
    while time.time() < deadline:
        line = proc.stdout.readline()
        if line.startswith("SPILLED"):
            return line.split(maxsplit=1)[1].strip()
        if not line and proc.poll() is not None:
            break
    raise AssertionError(f"the prune never spilled: {proc.stderr.read()[-2000:]}")


def test_a_failed_prune_removes_its_spills_beside_the_output(llama_dir, tmp_path):
    (tmp_path / "tmpdir").mkdir()
    proc = _prune_child("fail", llama_dir, tmp_path / "out")
    spill_dir = Path(_spilled_line(proc))
    assert spill_dir.parent == tmp_path  # beside the output, not in TMPDIR
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "simulated failure" in err
    assert _spills(tmp_path) == [] and not (tmp_path / "out").exists()
    assert list((tmp_path / "tmpdir").iterdir()) == []


def test_a_killed_prune_leaves_spills_that_the_next_run_removes(llama_dir, tmp_path):
    (tmp_path / "tmpdir").mkdir()
    proc = _prune_child("kill", llama_dir, tmp_path / "out")
    try:
        spill_dir = Path(_spilled_line(proc))
        assert spill_dir.is_dir() and any(spill_dir.iterdir())
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert spill_dir.is_dir()  # SIGKILL runs no clean-up
    load_lazily(llama_dir, spill_root=tmp_path)  # the next lazy load under the same root
    assert not spill_dir.exists()
    assert _spills(tmp_path) == []


def test_load_flag_forces_the_in_memory_path_and_rejects_other_values(llama_dir, tmp_path):
    from conftest import run_cli

    common = ["prune", "--model", str(llama_dir), "--method", "wanda", "--sparsity", "0.5", "--calib", "demo",
              "--nsamples", "2", "--seqlen", "16", "--device", "cpu", "--quiet"]
    bad = run_cli(*common, "--load", "mmap", "--out", str(tmp_path / "bad"))
    assert bad.exit_code == 2 and "--load must be one of lazy, in-memory" in bad.stderr
    assert not (tmp_path / "bad").exists()
    for load, expected in (("in-memory", "in-memory: --load in-memory"), ("lazy", "lazy")):
        ok = run_cli(*common, "--load", load, "--out", str(tmp_path / load))
        assert ok.exit_code == 0, ok.stderr
        import json

        manifest = json.loads((tmp_path / load / "compresskit.json").read_text())
        assert manifest["hyperparameters"]["loading"] == expected
    import gc

    gc.collect()  # in-process, the spills live as long as the pruned model (it reads its blocks there)
    assert _spills(tmp_path) == []
