"""The GPU speed benchmark (benchmarks/speed_llama7b.py) runs end to end at a tiny shape on CPU.

Not timed: it only checks that one run produces every row and field of the issue's table, and
that the reference columns are skipped with a note when no reference checkouts are given.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_speed_benchmark_tiny_writes_the_whole_table(tmp_path, capsys):
    bench = _load("speed_llama7b")
    out = tmp_path / "speed.json"
    bench.main(["--tiny", "--out", str(out)])
    info = json.loads(out.read_text())
    rows = {r["method"]: r for r in info["rows"]}
    assert list(rows) == ["forward", "wanda", "owl", "sparsegpt", "alpha_spectra", "welore"]
    for name, row in rows.items():
        assert row["seconds"] > 0 and row["x_forward"] > 0
        for field in ("peak_gpu_gib", "peak_beyond_activations_gb", "x_reference", "target_s", "meets_target"):
            assert field in row
    assert rows["wanda"]["target_s"] == 20 and rows["sparsegpt"]["target_s"] == 60
    assert "reference columns skipped" in info["reference_note"]
    assert info["args"]["hidden"] == 64 and info["activation_bytes"] == 2 * 4 * 32 * 64 * 2
    printed = capsys.readouterr().out
    assert "x reference" in printed and "note: no --reference-dir given" in printed


def test_speed_benchmark_reports_a_missing_reference_checkout(tmp_path):
    reference_code = _load("reference_code")
    assert "wanda/lib/prune.py not found" in reference_code.missing(tmp_path)
    (tmp_path / "wanda" / "lib").mkdir(parents=True)
    (tmp_path / "wanda" / "lib" / "prune.py").write_text("")
    assert "OWL/lib/prune_all.py not found" in reference_code.missing(tmp_path)
