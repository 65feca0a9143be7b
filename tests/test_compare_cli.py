"""``compresskit compare``: the before/after arithmetic through the CLI, on hand-made results files."""

from __future__ import annotations

import json
import re

import pytest

from compresskit.evaluation.results import Efficiency, EvalResult, ModelInfo, PerplexityResult, TaskResult


def _result(path: str, ppl: float, acc: float, disk: int, prefill: float) -> EvalResult:
    return EvalResult(
        model=ModelInfo(path=path),
        perplexity={"wikitext2": PerplexityResult(value=ppl, seqlen=2048, n_windows=4, tokens=8192)},
        tasks={"boolq": TaskResult(metric="acc", value=acc, metrics={"acc": {"value": acc}})},
        efficiency=Efficiency(disk_bytes=disk, prefill_tokens_per_s=prefill, timing_device="cpu"),
    )


@pytest.fixture
def files(tmp_path):
    dense = _result("/runs/dense", 10.0, 0.60, 1000, 100.0).save(tmp_path / "dense.json")
    w50 = _result("/runs/w50", 15.0, 0.45, 600, 125.0).save(tmp_path / "w50.json")
    owl = _result("/runs/owl70", 40.0, 0.30, 1000, 80.0).save(tmp_path / "owl70.json")
    return dense, w50, owl


def _row(markdown: str, label: str) -> list[str]:
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == label:
            return cells[1:]
    raise AssertionError(f"no row {label!r} in:\n{markdown}")


def test_markdown_deltas_and_retention(cli, files, tmp_path):
    dense, w50, owl = files
    res = cli("compare", dense, w50, owl, "--markdown", "--out", tmp_path / "table.md")
    assert res.exit_code == 0, res.stderr
    md = res.stdout
    header = _row(md, "metric")
    assert header == ["dense (baseline)", "w50", "Δ", "Δ rel", "retention", "owl70", "Δ", "Δ rel", "retention"]
    # ppl 10 → 15: +5, +50 %, no retention for perplexity; 10 → 40: +30, +300 %
    assert _row(md, "wikitext2 ppl (seqlen 2048)") == [
        "10.000", "15.000", "+5.000", "+50.0%", "–", "40.000", "+30.000", "+300.0%", "–"]
    # acc 0.60 → 0.45: retention 0.45 / 0.60 = 75 %; → 0.30: 50 %
    assert _row(md, "boolq acc") == [
        "0.6000", "0.4500", "-0.1500", "-25.0%", "75.0%", "0.3000", "-0.3000", "-50.0%", "50.0%"]
    assert _row(md, "disk size") == ["1000 B", "600 B", "-400 B", "-40.0%", "–", "1000 B", "0 B", "+0.0%", "–"]
    assert _row(md, "prefill tokens/s") == ["100.0", "125.0", "+25.0", "+25.0%", "–", "80.0", "-20.0", "-20.0%", "–"]
    assert (tmp_path / "table.md").read_text() == md


def test_terminal_table_and_json(cli, files):
    dense, w50, _ = files
    res = cli("compare", dense, w50)
    assert res.exit_code == 0, res.stderr
    assert "75.0%" in res.stdout and "+50.0%" in res.stdout
    res = cli("compare", dense, w50, "--json")
    data = json.loads(res.stdout)
    assert data["baseline_label"] == "dense" and data["labels"] == ["w50"]
    rows = {r["key"]: r for r in data["rows"]}
    acc = rows["task:boolq"]["others"][0]
    assert acc["delta"] == pytest.approx(-0.15) and acc["rel_delta"] == pytest.approx(-0.25)
    assert acc["retention"] == pytest.approx(75.0)
    assert rows["ppl:wikitext2"]["others"][0]["retention"] is None


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda d, p: [d], "at least two results files"),
        (lambda d, p: [d, p / "missing.json"], "missing.json not found"),
        (lambda d, p: [d, _write(p / "old.json", {"schema_version": 0})], "schema_version 0"),
        (lambda d, p: [d, _write(p / "bad.json", "{nope")], "not valid JSON"),
    ],
)
def test_bad_input_is_one_line_exit_2(cli, files, tmp_path, make, needle):
    res = cli("compare", *make(files[0], tmp_path))
    assert res.exit_code == 2, (res.stdout, res.stderr)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(re.escape(needle), lines[0]), res.stderr


def _write(path, content):
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path
