"""Shared fixtures: an isolated cache, tiny model directories, and a CLI runner that keeps exit codes."""

from __future__ import annotations

import io
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest

from compresskit.paths import shared_data_dir


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Calibration / spectra caches go to a per-session temp dir; converted models stay shared."""
    monkeypatch.setenv("COMPRESSKIT_CACHE_DIR", str(_session_cache(tmp_path_factory)))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


_CACHE: list[Path] = []


def _session_cache(factory) -> Path:
    if not _CACHE:
        _CACHE.append(factory.mktemp("compresskit-cache"))
    return _CACHE[0]


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str


def run_cli(*args: str) -> CliResult:
    """Run ``compresskit`` in-process exactly as the console script does (error handling included)."""
    from compresskit import cli

    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["compresskit", *map(str, args)]
    code = 0
    try:
        with redirect_stdout(out), redirect_stderr(err):
            # rich consoles bound to the real streams at import: point them at ours for this call
            cli.err_console.file = err
            cli.out_console.file = out
            try:
                cli.main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = argv
        cli.err_console.file = sys.stderr
        cli.out_console.file = sys.stdout
    return CliResult(code, out.getvalue(), err.getvalue())


def needs_shared(path) -> Path:
    """``path`` (a file or folder of ``../shared``), or skip: a user's clone has no shared folder."""
    path = Path(path)
    if not path.exists():
        pytest.skip(f"shared data missing: {path}")
    return path


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="session")
def sotu_jsonl() -> Path:
    path = shared_data_dir() / "corpora" / "sotu.jsonl"
    if not path.exists():
        pytest.skip(f"shared data missing: {path}")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory: family -> a saved local model directory (config, safetensors, real tokenizer)."""
    from tiny_models import tiny_model, tiny_tokenizer

    made: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in made:
            path = tmp_path_factory.mktemp(f"tiny-{family}")
            model = tiny_model(family)
            model.save_pretrained(path)
            tiny_tokenizer().save_pretrained(path)
            made[family] = path
        return made[family]

    return make
