"""The quickstart works on a user's machine: Hub → local mirror → shipped demo sample.

Fast tests drive the fallback logic (``--calib auto``, ``--ppl auto``, ``demo``) on a tiny model;
the slow test runs ``scripts/quickstart.sh``'s compresskit commands on the real SmolLM2-135M from a
``git clone`` with no ``../shared`` beside it, ``COMPRESSKIT_SHARED_DIR`` unset and the Hub off.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from compresskit.checkpoint import MANIFEST_NAME
from compresskit.demo_data import CALIBRATION_FILE, PERPLEXITY_FILE

REPO = Path(__file__).resolve().parents[1]
TINY = ["--nsamples", "4", "--seqlen", "32", "--batch-size", "4", "--device", "cpu"]


@pytest.fixture
def no_mirror(tmp_path, monkeypatch, tiny_model_dir):
    """A shared folder without any data, and no WikiText-2 override: only the demo is left."""
    tiny_model_dir("llama")  # built first: its tokenizer comes from the real shared folder
    empty = tmp_path / "no-shared"
    empty.mkdir()
    monkeypatch.setenv("COMPRESSKIT_SHARED_DIR", str(empty))
    monkeypatch.delenv("COMPRESSKIT_WIKITEXT2_FILE", raising=False)
    return empty


def _prune(cli, model: Path, out: Path, calib: str, *extra: str):
    return cli("prune", "--model", model, "--method", "wanda", "--sparsity", "0.5", "--calib", calib, *TINY,
               "--out", out, *extra)


def _manifest(path: Path) -> dict:
    return json.loads((path / MANIFEST_NAME).read_text())


def test_demo_data_is_small_public_domain_and_packaged():
    assert CALIBRATION_FILE.is_file() and PERPLEXITY_FILE.is_file()
    assert CALIBRATION_FILE.stat().st_size + PERPLEXITY_FILE.stat().st_size < 400_000
    readme = (CALIBRATION_FILE.parent / "README.md").read_text()
    assert "DEMO" in readme and "public domain" in readme
    pyproject = (REPO / "pyproject.toml").read_text()
    assert "demo_data/*.jsonl" in pyproject and "demo_data/*.txt" in pyproject


def test_calib_auto_without_hub_or_mirror_uses_the_demo_and_says_so(cli, tiny_model_dir, tmp_path, no_mirror):
    out = tmp_path / "ck"
    res = _prune(cli, tiny_model_dir("llama"), out, "auto")
    assert res.exit_code == 0, res.stderr
    calib = _manifest(out)["calibration"]
    assert calib["source"] == "auto" and calib["source_used"] == "demo"
    assert "demo" in calib["source_label"] and "not the papers' protocol" in calib["source_label"]
    assert any("Hub is unreachable" in s for s in calib["fallback_skipped"])
    assert any(str(no_mirror) in s for s in calib["fallback_skipped"])
    assert "note: calibration data: demo (shipped public-domain sample" in res.stderr
    shown = cli("inspect", out)
    assert "calibration: auto → demo (shipped" in shown.stdout


def test_calib_auto_prefers_the_local_mirror(cli, tiny_model_dir, tmp_path, monkeypatch):
    tiny_model_dir("llama")
    shared = tmp_path / "shared"
    (shared / "data" / "corpora").mkdir(parents=True)
    mirror = shared / "data" / "corpora" / "sotu.jsonl"
    mirror.write_text(CALIBRATION_FILE.read_text())
    monkeypatch.setenv("COMPRESSKIT_SHARED_DIR", str(shared))
    out = tmp_path / "ck"
    res = _prune(cli, tiny_model_dir("llama"), out, "auto")
    assert res.exit_code == 0, res.stderr
    calib = _manifest(out)["calibration"]
    assert calib["source_used"] == f"file:{mirror}"
    assert "source_label" not in calib
    assert calib["fallback_skipped"] == ["wikitext2: the Hugging Face Hub is unreachable"]


def test_calib_demo_by_name_is_labelled(cli, tiny_model_dir, tmp_path):
    out = tmp_path / "ck"
    res = _prune(cli, tiny_model_dir("llama"), out, "demo")
    assert res.exit_code == 0, res.stderr
    calib = _manifest(out)["calibration"]
    assert calib["source"] == "demo" and "not the papers' protocol" in calib["source_label"]
    assert "source_used" not in calib
    assert "note: calibration data: demo (shipped" in res.stderr


def test_explicit_hub_source_never_falls_back(cli, tiny_model_dir, tmp_path, no_mirror):
    out = tmp_path / "ck"
    res = _prune(cli, tiny_model_dir("llama"), out, "wikitext2")
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: calibration source 'wikitext2' needs the Hugging Face Hub")
    assert not out.exists()


def _eval_json(cli, model: Path, *args: str) -> tuple[dict, str]:
    res = cli("eval", model, "--seqlen", "32", "--max-windows", "2", "--device", "cpu", "--json", "-", *args)
    assert res.exit_code == 0, res.stderr
    return json.loads(res.stdout), res.stderr


def test_ppl_auto_falls_back_to_the_demo_text(cli, tiny_model_dir, no_mirror):
    data, _ = _eval_json(cli, tiny_model_dir("llama"), "--ppl", "auto")
    assert list(data["perplexity"]) == ["demo"]
    ppl = data["perplexity"]["demo"]
    assert ppl["dataset"] == "demo" and ppl["requested"] == "auto"
    assert ppl["source"].startswith("demo (shipped public-domain sample") and "not WikiText-2" in ppl["source"]
    assert "WikiText-2 needs the Hugging Face Hub" in ppl["fallback"]
    assert ppl["n_windows"] == 2


def test_ppl_auto_uses_the_local_wikitext2_copy(cli, tiny_model_dir, tmp_path, monkeypatch):
    copy = tmp_path / "wiki.test.raw"
    copy.write_text(PERPLEXITY_FILE.read_text()[:20000])
    monkeypatch.setenv("COMPRESSKIT_WIKITEXT2_FILE", str(copy))
    data, _ = _eval_json(cli, tiny_model_dir("llama"), "--ppl", "auto")
    assert list(data["perplexity"]) == ["wikitext2"]
    ppl = data["perplexity"]["wikitext2"]
    assert ppl["source"] == str(copy) and ppl["requested"] == "auto" and ppl["fallback"] is None


def test_ppl_notes_on_the_terminal(cli, tiny_model_dir, no_mirror):
    res = cli("eval", tiny_model_dir("llama"), "--ppl", "auto", "--seqlen", "32", "--max-windows", "2",
              "--device", "cpu")
    assert res.exit_code == 0, res.stderr
    assert "note: demo perplexity: text from demo (shipped public-domain sample" in res.stderr
    assert "--ppl auto chose demo" in res.stderr
    assert "demo ppl" in res.stdout


@pytest.mark.parametrize("ppl,needle", [
    ("wikitext2", "WikiText-2 needs the Hugging Face Hub"),
    ("auto,wikitext2", "--ppl auto already means wikitext2, else demo"),
])
def test_ppl_explicit_wikitext2_never_falls_back(cli, tiny_model_dir, no_mirror, ppl, needle):
    res = cli("eval", tiny_model_dir("llama"), "--ppl", ppl, "--seqlen", "32", "--max-windows", "2", "--device", "cpu")
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0]


# ----------------------------------------------------------------------------- the real quickstart
def _clone_env(tmp_path: Path, clone: Path) -> dict[str, str]:
    """The environment of a user's machine: no shared folder, no Hub, compresskit from the clone."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    wrapper = bindir / "compresskit"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m compresskit.cli "$@"\n')
    wrapper.chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if k not in ("COMPRESSKIT_SHARED_DIR", "COMPRESSKIT_WIKITEXT2_FILE", "COMPRESSKIT_CALIBRATION_DIR")}
    env.update(
        HF_HUB_OFFLINE="1", PYTHONPATH=str(clone), PATH=f"{bindir}{os.pathsep}{env.get('PATH', '')}",
        OMP_NUM_THREADS="1",  # beside the other xdist worker, more threads oversubscribe the cores
        QUICKSTART_SKIP_SETUP="1",
        QUICKSTART_NSAMPLES=os.environ.get("QUICKSTART_NSAMPLES", "4"),
        QUICKSTART_SEQLEN=os.environ.get("QUICKSTART_SEQLEN", "128"),
        QUICKSTART_PPL_SEQLEN=os.environ.get("QUICKSTART_PPL_SEQLEN", "256"),
        QUICKSTART_MAX_WINDOWS=os.environ.get("QUICKSTART_MAX_WINDOWS", "2"),
    )
    return env


@pytest.mark.slow
def test_quickstart_from_a_clone_without_shared_data(tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True, timeout=300)
    assert not (clone.parent / "shared").exists()
    env = _clone_env(tmp_path, clone)
    where = subprocess.run([sys.executable, "-c", "import compresskit; print(compresskit.__file__)"],
                           env=env, cwd=tmp_path, capture_output=True, text=True, check=True)
    assert Path(where.stdout.strip()).is_relative_to(clone), where.stdout  # the clone's code, not this checkout's

    proc = subprocess.run(["bash", "scripts/quickstart.sh"], cwd=clone, env=env, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    out = clone / "out" / "smollm2-wanda50"
    calib = _manifest(out)["calibration"]
    assert calib["source"] == "auto" and calib["source_used"] == "demo"
    assert "not the papers' protocol" in calib["source_label"]
    for name in ("eval.json", "eval.baseline.json"):
        result = json.loads((out / name).read_text())
        ppl = result["perplexity"]["demo"]
        assert ppl["requested"] == "auto" and "not WikiText-2" in ppl["source"]
    assert "note: calibration data: demo (shipped public-domain sample" in proc.stderr
    assert "note: demo perplexity: text from demo (shipped public-domain sample" in proc.stderr
    assert "demo ppl" in proc.stdout


def test_hub_reachable_but_failing_falls_back_only_under_auto(cli, tiny_model_dir, no_mirror, monkeypatch):
    import datasets

    def broken(*_a, **_k):
        raise ConnectionError("503 Service Unavailable")

    monkeypatch.setattr("compresskit.evaluation.perplexity.hub_reachable", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", broken)
    data, _ = _eval_json(cli, tiny_model_dir("llama"), "--ppl", "auto")
    assert list(data["perplexity"]) == ["demo"]
    assert "Hugging Face Hub (failed: 503 Service Unavailable)" in data["perplexity"]["demo"]["fallback"]
    res = cli("eval", tiny_model_dir("llama"), "--ppl", "wikitext2", "--seqlen", "32", "--device", "cpu")
    assert res.exit_code == 2 and res.stderr.count("\n") == 1 and "failed: 503" in res.stderr
