"""benchmarks/heal.py's report: a row with its own dense model (the REAP rows on the MoE fixtures)
is measured against that model, not against SmolLM2's; a row that compression did not make worse
has no gap to recover (no division by a zero or negative gap)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def _load():
    spec = importlib.util.spec_from_file_location("bench_heal", BENCHMARKS / "heal.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _variant(ppl: float, moby: float | None = None) -> dict:
    return {"ppl": ppl, "piqa": 0.5, **({"moby_tail_ppl": moby} if moby else {}), "trained": ["reap"],
            "trainable_params": 10, "seconds_per_step": 1.0, "wall_s": 3.0, "sparsity_kept": None,
            "curve": [{"train_tokens": 0, "ppl": ppl}]}


def _result() -> dict:
    return {"model": "smollm2-135m",
            "settings": {"tokens_per_run": 16384, "steps": 32, "batch": 2, "seqlen": 256, "ppl_windows": 4,
                         "ppl_seqlen": 512, "piqa_limit": 100},
            "dense": {"ppl": 10.0, "piqa": 0.6, "curve_ppl": 11.0},
            "rows": {"wanda70": {"before": _variant(1000.0), "ce": _variant(200.0), "kd": _variant(100.0)},
                     "reap25-x": {"model": "fixture", "dense": {"ppl": 50.0, "piqa": 0.5, "curve_ppl": 55.0,
                                                                "moby_tail_ppl": 10.0},
                                  "before": _variant(200.0, 40.0), "ce": _variant(150.0, 35.0),
                                  "kd": _variant(100.0, 20.0)},
                     "reap25-nogap": {"model": "fixture2", "dense": {"ppl": 50.0, "piqa": 0.5, "curve_ppl": 55.0},
                                      "before": _variant(49.0), "kd": _variant(45.0)}}}


def test_gap_recovered_uses_the_rows_own_dense_and_says_when_there_is_no_gap():
    bench = _load()
    result = _result()
    assert bench.row_dense(result, result["rows"]["wanda70"])["ppl"] == 10.0
    assert bench.row_dense(result, result["rows"]["reap25-x"])["ppl"] == 50.0
    assert math.isclose(bench.gap_recovered(50.0, 200.0, 100.0), math.log(2) / math.log(4))
    assert bench.gap_recovered(50.0, 49.0, 45.0) is None
    lines = bench.table(result).splitlines()
    reap = next(line for line in lines if line.startswith("| reap25-x | 50.00"))
    assert "| 50% |" in reap  # log 200/100 over log 200/50, not against SmolLM2's dense 10
    assert next(line for line in lines if line.startswith("| wanda70 | 10.00")).count("| 50% |") == 1
    assert "| no gap |" in next(line for line in lines if line.startswith("| reap25-nogap |"))
    moby = next(line for line in lines if line.startswith("| reap25-x | 10.00"))  # the Moby Dick tail table
    assert "| 50% | yes |" in moby  # log 40/20 over log 40/10
