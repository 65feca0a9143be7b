"""Recipes: the shipped ones validate, bad ones fail with field + line, checks arithmetic, and
``compresskit run --check`` exit codes end to end on a tiny model."""

from __future__ import annotations

import json

import pytest

from compresskit.errors import EvaluationError, RecipeError
from compresskit.evaluation.checks import Threshold, check_one, evaluate_checks, metric_values
from compresskit.evaluation.results import (
    Efficiency,
    EvalResult,
    ModelInfo,
    PerplexityResult,
    TaskResult,
    compute_set_means,
)
from compresskit.paths import REPO_ROOT, shared_dir
from compresskit.recipe import load_recipe

RECIPES = sorted((REPO_ROOT / "recipes").glob("*.yaml"))


# ----------------------------------------------------------------------------- shipped recipes
def test_recipes_folder_has_the_papers_settings():
    names = {p.name for p in RECIPES}
    for expected in ("owl-wanda-70-llama7b.yaml", "owl-sparsegpt-70-llama7b.yaml", "alphapruning-wanda-70-llama7b.yaml",
                     "wanda-2of4-llama2-7b.yaml", "sparsegpt-50-llama2-7b.yaml", "welore-50-llama2-7b.yaml",
                     "smollm2-offline.yaml"):
        assert expected in names


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.stages, "a shipped recipe compresses something"
    assert recipe.output and recipe.evaluation.ppl


# methods.md §5.3: ε per model and pruner in the AlphaPruning scripts
ALPHA_EPSILON = {
    "alphapruning-wanda-70-llama7b.yaml": 0.2,
    "alphapruning-sparsegpt-70-llama7b.yaml": 0.2,
    "alphapruning-magnitude-70-llama7b.yaml": 0.3,
    "alphapruning-wanda-70-llama2-7b.yaml": 0.3,
    "alphapruning-magnitude-70-llama2-7b.yaml": 0.5,
}


def test_papers_hyperparameters():
    for name, eps in ALPHA_EPSILON.items():
        stage = load_recipe(REPO_ROOT / "recipes" / name).stages[0]
        assert (stage.method, stage.sparsity, stage.method_options["alpha_epsilon"]) == ("alphapruning", 0.7, eps)
    owl = load_recipe(REPO_ROOT / "recipes" / "owl-wanda-70-llama7b.yaml")
    assert owl.stages[0].method_options == {"owl_m": 5, "owl_lambda": 0.08}
    assert (owl.calibration.source, owl.calibration.nsamples, owl.calibration.seqlen, owl.calibration.seed) == (
        "c4", 128, 2048, 0)
    assert owl.evaluation.tasks == ["zeroshot7"] and owl.evaluation.seqlen == 2048
    assert load_recipe(REPO_ROOT / "recipes" / "wanda-2of4-llama2-7b.yaml").stages[0].pattern == "2:4"
    welore = load_recipe(REPO_ROOT / "recipes" / "welore-50-llama2-7b.yaml").stages[0]
    assert (welore.method, welore.method_options) == ("welore", {"rank_reduction": 0.5})


def test_offline_recipe_expands_the_shared_dir(monkeypatch):
    monkeypatch.delenv("COMPRESSKIT_SHARED_DIR", raising=False)
    recipe = load_recipe(REPO_ROOT / "recipes" / "smollm2-offline.yaml")
    assert recipe.calibration.source == f"file:{shared_dir()}/data/corpora/sotu.jsonl"
    monkeypatch.setenv("COMPRESSKIT_SHARED_DIR", "/elsewhere")
    assert load_recipe(REPO_ROOT / "recipes" / "smollm2-offline.yaml").calibration.source == (
        "file:/elsewhere/data/corpora/sotu.jsonl")


# ----------------------------------------------------------------------------- env, overrides
def test_env_defaults_and_recipe_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("CK_TEST_UNSET", raising=False)
    path = tmp_path / "r.yaml"
    path.write_text("model: ${RECIPE_DIR}/m\noutput: ${CK_TEST_UNSET:-out/default}\n")
    recipe = load_recipe(path)
    assert (recipe.model, recipe.output) == (f"{tmp_path.resolve()}/m", "out/default")


def test_overrides_replace_fields_before_validation(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: m\nstages:\n  - method: owl\n    sparsity: 0.7\n    owl_m: 5\n")
    recipe = load_recipe(path, overrides=["stages.0.sparsity=0.6", "evaluation.limit=20", "checks.sparsity.min=0.59",
                                          "model=other"])
    assert recipe.stages[0].sparsity == 0.6 and recipe.evaluation.limit == 20 and recipe.model == "other"
    assert recipe.checks["sparsity"].min == 0.59
    assert recipe.output == "out/r"  # default: out/<recipe stem>
    swapped = load_recipe(path, overrides=["stages.0={method: wanda, sparsity: 0.5}"])
    assert (swapped.stages[0].method, swapped.stages[0].method_options) == ("wanda", {})
    with pytest.raises(RecipeError, match=r"stages\.0\.sparsity \(set by --set stages\.0\.sparsity\): .*less than 1"):
        load_recipe(path, overrides=["stages.0.sparsity=1.5"])
    with pytest.raises(RecipeError, match="stages.3 is not an existing list item"):
        load_recipe(path, overrides=["stages.3.sparsity=0.5"])


# ----------------------------------------------------------------------------- bad recipes
BAD = {
    "unknown field": ("model: m\nstages:\n  - method: wanda\n    sparsity: 0.5\n    colour: red\n",
                      5, "stages.0.colour", "unknown option for method wanda"),
    "unknown top-level field": ("model: m\n\nevalution:\n  seqlen: 128\n", 3, "evalution", "unknown field"),
    "wrong type": ("model: m\ncalibration:\n  source: c4\n  nsamples: lots\n", 4, "calibration.nsamples",
                   "valid integer"),
    "unknown method": ("model: m\nstages:\n  - sparsity: 0.5\n    method: bogus\n", 4, "stages.0.method",
                       "unknown method 'bogus'"),
    "missing model": ("# no model\nstages:\n  - method: wanda\n    sparsity: 0.5\n", 2, "model", "required field"),
    "bad method option": ("model: m\nstages:\n  - method: owl\n    sparsity: 0.7\n    owl_m: -1\n", 5,
                          "stages.0.owl_m", "greater than 0"),
    "option of another method": ("model: m\nstages:\n  - method: wanda\n    sparsity: 0.5\n    owl_m: 3\n", 5,
                                 "stages.0.owl_m", "unknown option for method wanda"),
    "missing sparsity": ("model: m\nstages:\n  - method: owl\n", 3, "stages.0.sparsity", "needs a sparsity"),
    "sparsity out of range": ("model: m\nstages:\n  - method: wanda\n    sparsity: 1.5\n", 4, "stages.0.sparsity",
                              "less than 1"),
    "unknown check metric": ("model: m\nevaluation:\n  ppl: [wikitext2]\nchecks:\n  wikitext_ppl: {max: 30}\n", 5,
                             "checks.wikitext_ppl", "unknown metric"),
    "unknown check rule": ("model: m\nchecks:\n  wikitext2_ppl:\n    maximum: 30\n", 4, "checks.wikitext2_ppl.maximum",
                           "unknown field"),
    "ratio without baseline": ("model: m\nbaseline: never\nchecks:\n  wikitext2_ppl: {max_ratio: 2}\n", 4,
                               "checks.wikitext2_ppl", "needs a baseline"),
    "duplicate key": ("model: m\nstages: []\nmodel: n\n", 3, "", "key 'model' appears twice (first at line 1)"),
    "unset env var": ("model: m\ncalibration:\n  source: file:${CK_SURELY_UNSET}/x.jsonl\n", 3, "calibration.source",
                      "CK_SURELY_UNSET is not set"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_recipe_names_field_and_line(cli, tmp_path, name):
    text, line, field, message = BAD[name]
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    res = cli("run", path, "--dry-run")
    assert res.exit_code == 2, (res.stdout, res.stderr)
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, res.stderr
    prefix = f"error: {path}:{line}: " + (f"{field}: " if field else "")
    assert lines[0].startswith(prefix), lines[0]
    assert message in lines[0], lines[0]


def test_yaml_syntax_error_has_a_line(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("model: m\nstages:\n  - method: [wanda\n")
    with pytest.raises(RecipeError, match=rf"^{path}:4: not valid YAML"):
        load_recipe(path)


# ----------------------------------------------------------------------------- checks arithmetic
def _result(ppl: float, acc: float, disk: int, sparsity: float | None = None) -> EvalResult:
    result = EvalResult(
        model=ModelInfo(path="x", manifest={"sparsity": sparsity} if sparsity is not None else None),
        perplexity={"wikitext2": PerplexityResult(value=ppl, seqlen=2048, n_windows=1, tokens=2048)},
        tasks={"piqa_local": TaskResult(metric="acc", value=acc,
                                        metrics={"acc": {"value": acc}, "acc_norm": {"value": acc + 0.01}})},
        efficiency=Efficiency(disk_bytes=disk),
    )
    return compute_set_means(result)


def test_metric_names():
    values = metric_values(_result(12.5, 0.6, 1000, sparsity=0.7))
    assert values == {"wikitext2_ppl": 12.5, "piqa_local": 0.6, "piqa_local_acc": 0.6,
                      "piqa_local_acc_norm": pytest.approx(0.61), "disk_bytes": 1000.0, "sparsity": 0.7}


def test_check_rules():
    assert check_one("p", "max", 30.0, 30.0).passed  # bounds are inclusive
    assert not check_one("p", "max", 30.0, 30.01).passed
    assert check_one("a", "min", 0.6, 0.6).passed and not check_one("a", "min", 0.6, 0.59).passed
    ratio = check_one("d", "max_ratio", 0.6, 700.0, baseline=1000.0)
    assert (ratio.observed, ratio.passed) == (0.7, False)
    assert "ratio 0.7 (700 / dense 1000) above max_ratio 0.6" in ratio.describe()
    kept = check_one("m", "min_retention", 0.9, 0.54, baseline=0.6)
    assert kept.observed == pytest.approx(0.9) and kept.passed
    with pytest.raises(EvaluationError, match="needs a dense baseline"):
        check_one("m", "min_ratio", 0.9, 0.5)
    with pytest.raises(EvaluationError, match="dense value is 0"):
        check_one("m", "min_ratio", 0.9, 0.5, baseline=0.0)


def test_evaluate_checks_against_a_baseline():
    dense, pruned = _result(10.0, 0.60, 1000), _result(14.0, 0.51, 1000)
    checks = {"wikitext2_ppl": Threshold(max=15.0, max_ratio=1.3), "piqa_local_acc": Threshold(min_retention=0.9),
              "disk_bytes": Threshold(max_ratio=0.6)}
    outcomes = evaluate_checks(checks, pruned, dense)
    assert [(c.metric, c.rule, c.passed) for c in outcomes] == [
        ("wikitext2_ppl", "max", True), ("wikitext2_ppl", "max_ratio", False),  # 1.4 > 1.3
        ("piqa_local_acc", "min_retention", False),  # 0.85 < 0.9
        ("disk_bytes", "max_ratio", False)]  # 1.0 > 0.6
    with pytest.raises(EvaluationError, match="no such metric"):
        evaluate_checks({"c4_ppl": Threshold(max=1)}, pruned)


# ----------------------------------------------------------------------------- run --check end to end
RECIPE = """\
model: {model}
device: cpu
output: {out}
calibration:
  source: file:{sotu}
  nsamples: 4
  seqlen: 32
  batch_size: 4
stages:
  - method: magnitude
    sparsity: 0.3
  - method: wanda
    sparsity: 0.5
evaluation:
  ppl_files: [{text}]
  seqlen: 32
  efficiency: true
checks:
  sparsity: {{min: 0.5, max: 0.5}}
  val_ppl: {{max: 1.0e9, max_ratio: 100.0}}
  disk_bytes: {{max_ratio: 1.0}}
"""


@pytest.fixture
def tiny_recipe(tiny_model_dir, sotu_jsonl, tmp_path):
    text = tmp_path / "val.txt"
    text.write_text(" ".join(["the quick brown fox jumps over the lazy dog"] * 40))
    path = tmp_path / "tiny.yaml"
    path.write_text(RECIPE.format(model=tiny_model_dir("llama"), out=tmp_path / "out" / "w50", sotu=sotu_jsonl,
                                  text=text))
    return path


def test_run_check_passes_then_fails(cli, tiny_recipe, tiny_model_dir, tmp_path):
    out = tmp_path / "out" / "w50"
    res = cli("run", tiny_recipe, "--check", "--quiet")
    assert res.exit_code == 0, res.stderr
    # two stages: the first is kept beside the output, the second is the output
    assert (tmp_path / "out" / "w50.stage1-magnitude" / "compresskit.json").is_file()
    result, dense = EvalResult.load(out / "eval.json"), EvalResult.load(out / "baseline.json")
    assert result.model.manifest["stages"] == ["magnitude", "wanda"] and result.model.method == "wanda"
    assert result.model.manifest["sparsity"] == 0.5
    assert dense.model.path == str(tiny_model_dir("llama")) and dense.model.manifest is None
    assert result.perplexity["val"].seqlen == 32 == dense.perplexity["val"].seqlen
    assert result.efficiency.disk_bytes == dense.efficiency.disk_bytes  # zeros are stored: no saving on disk
    assert result.efficiency.nonzeros_decoder_linear == result.efficiency.params_decoder_linear // 2
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] and len(report["checks"]) == 5  # one per (metric, rule)
    assert "| sparsity | max | 0.5 | 0.5 | pass |" in (out / "report.md").read_text()

    # a violated threshold: exit 1 with --check, the violation named on one line
    again = ["--quiet", "--set", "checks.sparsity.max=0.4", "--set", f"baseline={out / 'baseline.json'}"]
    res = cli("run", tiny_recipe, "--check", *again, "--out", tmp_path / "again")
    assert res.exit_code == 1, res.stderr
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert lines == ["error: 1 of 5 checks failed: sparsity = 0.5 above max 0.4"]
    assert "| sparsity | max | 0.4 | 0.5 | **FAIL** |" in (tmp_path / "again" / "report.md").read_text()
    assert not (tmp_path / "again" / "baseline.json").exists()  # the given baseline file was used

    # without --check the same run succeeds and only warns
    res = cli("run", tiny_recipe, *again, "--out", tmp_path / "again", "--force")
    assert res.exit_code == 0 and "1 check(s) failed" in res.stderr, res.stderr


def test_run_refuses_existing_output_before_work(cli, tiny_recipe, tmp_path):
    (tmp_path / "out" / "w50").mkdir(parents=True)
    res = cli("run", tiny_recipe, "--check", "--quiet")
    assert res.exit_code == 2 and "--force" in res.stderr, res.stderr
    assert not (tmp_path / "out" / "w50.stage1-magnitude").exists()
