"""A wheel built from the source tree holds every file the package reads at run time.

The calibration sources / prompt formats and the offline lm-eval tasks used to live at the
repository top level, so only an editable install had them: `pip install` of a wheel gave a
compresskit whose `--calib c4` and `--tasks piqa_local` could not be found. They are package data
now; this test builds a real wheel (setuptools, no network) and compares its contents with the
source folders, and checks the run-time lookups point inside the package.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import compresskit
from compresskit.evaluation.task_sets import tasks_dir
from compresskit.paths import calibration_defs_dir

PACKAGE = Path(compresskit.__file__).resolve().parent
ROOT = PACKAGE.parent
DATA_DIRS = ("calibration/definitions", "evaluation/tasks", "demo_data")


def test_run_time_data_lives_inside_the_package(monkeypatch):
    monkeypatch.delenv("COMPRESSKIT_CALIBRATION_DIR", raising=False)
    monkeypatch.delenv("COMPRESSKIT_TASKS_DIR", raising=False)
    assert calibration_defs_dir() == PACKAGE / "calibration" / "definitions"
    assert tasks_dir() == PACKAGE / "evaluation" / "tasks"
    assert (calibration_defs_dir() / "sources" / "c4.yaml").is_file()
    assert (tasks_dir() / "piqa_local.yaml").is_file() and (tasks_dir() / "sets.yaml").is_file()


def test_a_built_wheel_holds_every_data_file(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(PACKAGE, src / "compresskit", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("compresskit-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"compresskit/{p.relative_to(PACKAGE).as_posix()}" for d in DATA_DIRS
                for p in (PACKAGE / d).rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert len(expected) > 20  # the sources, formats, tasks and demo texts
    assert expected <= names, sorted(expected - names)
