"""A recipe stage ``method: heal``: prune → heal → eval → checks, and its validation errors."""

from __future__ import annotations

import json

import pytest
import torch

import compresskit
from compresskit.checkpoint import MANIFEST_NAME
from compresskit.errors import RecipeError
from compresskit.recipe import load_recipe
from compresskit.run import run_recipe


def _recipe(model, sotu, out, heal_lines: str, first: str = "  - method: wanda\n    sparsity: 0.5\n") -> str:
    return f"""model: {model}
device: cpu
output: {out}
calibration:
  source: file:{sotu}
  nsamples: 2
  seqlen: 32
stages:
{first}{heal_lines}evaluation:
  ppl_files: [{sotu}]
  seqlen: 32
  max_windows: 2
baseline: never
checks:
  sparsity: {{min: 0.49, max: 0.51}}
"""


HEAL = """  - method: heal
    data: file:{sotu}
    steps: 3
    batch_size: 2
    seqlen: 32
    warmup: 0
    lr: 0.001
"""


def test_prune_then_heal_then_eval_then_checks(tiny_model_dir, sotu_jsonl, tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "out"
    text = _recipe(tiny_model_dir("llama"), sotu_jsonl, out, HEAL.format(sotu=sotu_jsonl))
    path = tmp_path / "r.yaml"
    path.write_text(text)
    run = run_recipe(load_recipe(path))
    assert run.passed, [c.describe() for c in run.checks]
    stage0 = out.with_name("out.stage1-wanda")
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["method"] == "heal" and manifest["stages"][-1]["path"] == str(stage0.resolve())
    assert manifest["method_details"]["sparsity_kept"]["unchanged_per_tensor"] is True
    assert [s["method"] for s in run.stage_summaries] == ["wanda", "heal"]
    report = (out / "report.md").read_text()
    assert "`heal` →" in report and "loss=kd" in report
    before, after = compresskit.load(stage0).state_dict(), compresskit.load(out).state_dict()
    key = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(before[key] == 0, after[key] == 0) and not torch.equal(before[key], after[key])


@pytest.mark.parametrize("heal_lines,first,message", [
    (HEAL, "", "stages.0.method: a heal stage heals the checkpoint of an earlier stage"),
    (HEAL + "    train: lora\n", None, "stages.1.merge: a recipe's heal stage writes a checkpoint: with train: lora set merge: true"),
    (HEAL + "    sparsity: 0.5\n", None, "stages.1.sparsity: does not apply to a heal stage"),
    (HEAL + "    rank: 3\n", None, "stages.1.rank: unknown option for a heal stage"),
    (HEAL + "    kd_weight: 0.2\n", None, "--kd-weight applies to --loss kd+ce only"),
])
def test_bad_heal_stages_are_one_line_with_the_field(tiny_model_dir, sotu_jsonl, tmp_path, heal_lines, first, message):
    kwargs = {} if first is None else {"first": first}
    path = tmp_path / "r.yaml"
    path.write_text(_recipe(tiny_model_dir("llama"), sotu_jsonl, tmp_path / "out", heal_lines.format(sotu=sotu_jsonl),
                            **kwargs))
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
