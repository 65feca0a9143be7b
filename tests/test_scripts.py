"""scripts/setup.sh never deletes a folder it did not make (COMPRESSKIT_VENV may point anywhere)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_setup_refuses_a_venv_path_that_is_not_a_virtualenv(tmp_path):
    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "chapter1.tex").write_text("precious")
    res = subprocess.run(["bash", str(REPO / "scripts" / "setup.sh")], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "COMPRESSKIT_VENV": str(foreign)})
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [f"error: {foreign} exists and is not a virtual environment; "
                                               "move it or set COMPRESSKIT_VENV"]
    assert (foreign / "chapter1.tex").read_text() == "precious" and sorted(os.listdir(foreign)) == ["chapter1.tex"]
