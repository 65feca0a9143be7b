"""Results schema (round trip, version and corruption errors), set means, and compare arithmetic."""

from __future__ import annotations

import json

import pytest

from compresskit.errors import EvaluationError
from compresskit.evaluation.compare import compare, delta, format_value, render_markdown, render_table
from compresskit.evaluation.results import (
    Efficiency,
    EvalResult,
    ModelInfo,
    PerplexityResult,
    TaskResult,
    compute_set_means,
)
from compresskit.evaluation.task_sets import load_task_sets

ZEROSHOT7 = ["boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]


def _task(acc: float, acc_norm: float | None = None, **kw) -> TaskResult:
    metrics = {"acc": {"value": acc, "stderr": 0.01}}
    if acc_norm is not None:
        metrics["acc_norm"] = {"value": acc_norm, "stderr": 0.01}
    return TaskResult(metric="acc", value=acc, stderr=0.01, version="1.0", metrics=metrics, **kw)


def _result(path: str, ppl: float, accs: dict[str, float], **eff) -> EvalResult:
    return EvalResult(
        model=ModelInfo(path=path, method="wanda"),
        device="cpu",
        dtype="float32",
        lm_eval_version="0.4.13",
        perplexity={"wikitext2": PerplexityResult(value=ppl, seqlen=2048, n_windows=10, tokens=20480, join="\n\n")},
        tasks={name: _task(v) for name, v in accs.items()},
        efficiency=Efficiency(**eff) if eff else None,
    )


# ----------------------------------------------------------------------------- schema
def test_save_load_round_trip(tmp_path):
    res = _result("/ckpt/dense", 5.68, {"boolq": 0.75}, disk_bytes=1000, timing_device="cpu")
    res.extra["note"] = "x"
    path = res.save(tmp_path / "sub" / "results.json")
    assert EvalResult.load(path) == res
    assert json.loads(path.read_text())["schema_version"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # no temp file left behind


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        (json.dumps({"schema_version": 0}), "schema_version 0, this compresskit reads version 1"),
        (json.dumps({"tasks": {}}), "schema_version None"),
        (json.dumps({"schema_version": 1, "tasks": {"boolq": {"metric": "acc"}}}), r"field tasks\.boolq\.value"),
        (json.dumps({"schema_version": 1, "surprise": 1}), "field surprise"),
    ],
)
def test_load_rejects_bad_files_with_one_line(tmp_path, content, message):
    path = tmp_path / "r.json"
    path.write_text(content)
    with pytest.raises(EvaluationError, match=message) as info:
        EvalResult.load(path)
    assert "\n" not in str(info.value)


def test_perplexity_module_output_fits_the_schema():
    # the dict compresskit.evaluation.perplexity.perplexity returns
    out = {"value": 22.5, "seqlen": 2048, "n_windows": 140, "tokens": 286720, "total_tokens": 287000,
           "seconds": 12.0, "dataset": "wikitext2", "source": "/data/wiki.test.raw", "join": "file as-is"}
    assert PerplexityResult.model_validate(out).n_windows == 140


def test_load_missing_file(tmp_path):
    with pytest.raises(EvaluationError, match="not found"):
        EvalResult.load(tmp_path / "nope.json")


# ----------------------------------------------------------------------------- set means
def test_set_means_use_each_sets_metric_and_flag_completeness():
    accs = dict(zip(ZEROSHOT7, [0.70, 0.60, 0.50, 0.65, 0.75, 0.40, 0.30], strict=True))
    res = EvalResult(tasks={n: _task(a, acc_norm=a + 0.1) for n, a in accs.items()})
    res.tasks["piqa"] = _task(0.72, acc_norm=0.74, limit=1000)
    compute_set_means(res, load_task_sets())

    z7 = res.task_sets["zeroshot7"]
    assert z7.mean == pytest.approx(3.90 / 7)  # acc, as the Wanda lineage reports
    assert z7.complete and z7.matches_protocol and z7.metrics["hellaswag"] == "acc"
    fc = res.task_sets["finercut9"]
    # FinerCut prefers acc_norm (acc + 0.1 here): the 6 zeroshot7 tasks other than rte (acc sum 3.30)
    # and piqa 0.74; lambada and mmlu are missing
    assert fc.tasks == ["openbookqa", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "boolq"]
    assert fc.mean == pytest.approx((3.30 + 0.6 + 0.74) / 7)
    assert not fc.complete and not fc.matches_protocol
    assert fc.metrics["piqa"] == "acc_norm"
    assert set(res.task_sets) == {"zeroshot7", "cdmoe8", "finercut9"}


def test_set_protocol_mismatch_is_flagged():
    res = EvalResult(tasks={n: _task(0.5, limit=100) for n in ZEROSHOT7})
    compute_set_means(res, load_task_sets())
    assert res.task_sets["zeroshot7"].complete and not res.task_sets["zeroshot7"].matches_protocol


def test_add_lm_eval_output_validates_and_fills_sets():
    out = {
        "lm_eval_version": "0.4.13",
        "tasks": {"boolq": {"metric": "acc", "value": 0.6, "stderr": 0.02, "version": "2.0", "fewshot": 0,
                            "limit": None, "n": 3270, "metrics": {"acc": {"value": 0.6, "stderr": 0.02}},
                            "aggregation": "lm-eval", "subtasks": {}, "sets": ["zeroshot7"]}},
    }
    res = EvalResult().add_lm_eval(out)
    assert res.lm_eval_version == "0.4.13" and res.tasks["boolq"].n == 3270
    assert res.task_sets["zeroshot7"].mean == 0.6 and res.task_sets["zeroshot7"].tasks == ["boolq"]


# ----------------------------------------------------------------------------- compare
def test_delta_arithmetic():
    d = delta(0.50, 0.45, with_retention=True)
    assert d.delta == pytest.approx(-0.05)
    assert d.rel_delta == pytest.approx(-0.10)
    assert d.retention == pytest.approx(90.0)
    ppl = delta(5.0, 7.5, with_retention=False)
    assert (ppl.delta, ppl.rel_delta, ppl.retention) == (2.5, 0.5, None)
    assert delta(0.0, 0.1, with_retention=True).rel_delta is None
    assert delta(0.5, None, with_retention=True).delta is None


def test_compare_rows_and_markdown():
    dense = _result("/ckpt/dense", 5.0, {"boolq": 0.50, "rte": 0.60}, disk_bytes=2 * 1024**3,
                    decode_tokens_per_s=100.0, timing_device="cuda")
    sparse = _result("/ckpt/wanda-50", 7.5, {"boolq": 0.45, "rte": 0.60}, disk_bytes=1024**3,
                     decode_tokens_per_s=126.0, timing_device="cuda")
    for r in (dense, sparse):
        compute_set_means(r, load_task_sets())
    cmp = compare(dense, sparse)
    assert (cmp.baseline_label, cmp.labels) == ("dense", ("wanda-50",))

    boolq = cmp.row("task:boolq").others[0]
    assert (boolq.delta, boolq.rel_delta, boolq.retention) == pytest.approx((-0.05, -0.10, 90.0))
    z7 = cmp.row("set:zeroshot7")
    assert z7.baseline == pytest.approx(0.55) and z7.others[0].retention == pytest.approx(0.525 / 0.55 * 100)
    assert z7.note == "incomplete set"
    ppl = cmp.row("ppl:wikitext2")
    assert ppl.label == "wikitext2 ppl (seqlen 2048)" and ppl.others[0].retention is None
    assert ppl.others[0].rel_delta == pytest.approx(0.5)
    disk = cmp.row("eff:disk_bytes").others[0]
    assert disk.rel_delta == pytest.approx(-0.5) and disk.retention is None
    assert cmp.row("eff:decode_tokens_per_s").others[0].rel_delta == pytest.approx(0.26)

    md = render_markdown(cmp)
    assert "| metric | dense (baseline) | wanda-50 | Δ | Δ rel | retention |" in md
    assert "| boolq acc | 0.5000 | 0.4500 | -0.0500 | -10.0% | 90.0% |" in md
    assert "| wikitext2 ppl (seqlen 2048) | 5.000 | 7.500 | +2.500 | +50.0% | – |" in md
    assert "| disk size | 2.00 GiB | 1.00 GiB | -1.00 GiB | -50.0% | – |" in md
    assert "Retention = compressed / dense" in md
    assert render_table(cmp).row_count == len(cmp.rows)


def test_compare_several_models_and_mismatches():
    dense = _result("dense", 5.0, {"boolq": 0.5})
    a = _result("a", 6.0, {"boolq": 0.4})
    b = _result("b", 7.0, {})
    b.perplexity["wikitext2"] = PerplexityResult(value=7.0, seqlen=4096, n_windows=5, tokens=20480)
    cmp = compare(dense, a, b)
    row = cmp.row("task:boolq")
    assert row.others[0].retention == pytest.approx(80.0) and row.others[1].value is None
    assert cmp.row("ppl:wikitext2").note == "seqlen differs"
    assert render_markdown(cmp).splitlines()[0].count("retention") == 2


@pytest.mark.parametrize(
    "kind, value, signed, text",
    [
        ("count", 1_122_624, False, "1.12M"),
        ("count", -73_728, True, "-73.73K"),
        ("count", 512, False, "512"),
        ("bytes", 1536, False, "1.50 KiB"),
        ("bytes", 100, True, "+100 B"),
        ("speed", 12.345, False, "12.3"),
        ("accuracy", None, False, "–"),
    ],
)
def test_format_value(kind, value, signed, text):
    assert format_value(kind, value, signed=signed) == text
