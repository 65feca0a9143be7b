"""Chains of methods: structural checkpoints as the input of further stages, and budgets on blocks
of unequal size (issue 17, "chains and budgets").

* The structure record (manifest ``structure`` entries, ``per_layer_config`` in config.json) is
  read off the model when it is saved (``checkpoint.describe_structure``), so a chain that deletes
  blocks or removes more sublayers saves and reloads exactly: FinerCut → FinerCut, FinerCut →
  block removal, FinerCut → OWL, CD-MoE → REAP, and a ``compresskit run`` of two FinerCut stages.
* Every allocation hits its parameter-weighted budget when blocks differ in size (MoE, CD-MoE
  condensed, removed sublayers, WeLore factors); the papers' arithmetic is unchanged for equal
  blocks (``tests/test_owl_math.py`` and friends hold the golden values).
* ``inspect`` and the prune summary say what a structural method removed, on the one parameter
  basis of ``--remove-params``.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
import transformers
from tiny_models import _BASE, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

import compresskit
from compresskit import api
from compresskit.allocation.owl import allocate_owl

BUDGET = 0.5
TOLERANCE = 0.005 * BUDGET  # within 0.5 % of the budget, parameter-weighted (measured over all decoder linears)


def _llama(layers: int = 4, hidden: int = 64, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{**_BASE, "num_hidden_layers": layers, "hidden_size": hidden,
                                         "intermediate_size": 2 * hidden})
    return transformers.LlamaForCausalLM(config).eval()


def _qwen2_moe(layers: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.Qwen2MoeConfig(**{**_BASE, "num_hidden_layers": layers}, moe_intermediate_size=32,
                                         shared_expert_intermediate_size=96, num_experts=4, num_experts_per_tok=2,
                                         mlp_only_layers=[])
    return transformers.Qwen2MoeForCausalLM(config).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> a saved model directory (config, safetensors, the real tiny tokenizer)."""
    builders = {"llama4": _llama, "llama4_wide": lambda: _llama(hidden=256), "qwen2_moe4": _qwen2_moe}
    made: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in made:
            path = tmp_path_factory.mktemp(name)
            builders[name]().save_pretrained(path)
            tiny_tokenizer().save_pretrained(path)
            made[name] = path
        return made[name]

    return make


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("Four score and seven years ago our fathers brought forth on this continent a new nation. " * 60)
    return f"file:{path}"


def _prune(model, method, calib, out=None, **options):
    common = dict(calib=calib, nsamples=2, seqlen=16, device="cpu", force=True)
    sparsity = options.pop("sparsity", None)
    pruner = options.pop("pruner", None)
    include = options.pop("include", None)
    tokenizer = None if isinstance(model, str) else tiny_tokenizer()
    return api.prune(model, method, out=out, sparsity=sparsity, pruner=pruner, include=include, tokenizer=tokenizer,
                     method_options=options, **common)


IDS = torch.tensor([[5, 17, 301, 42, 7, 1999, 64, 8], [9, 8, 7, 6, 5, 4, 3, 2]])


def _assert_reloads(outcome, out: Path, stock: bool) -> None:
    """The checkpoint reloads with compresskit.load to the logits of the model that was saved, and a
    stock one with plain from_pretrained too; a structural one says so in its manifest."""
    manifest = compresskit.inspect(out)
    assert manifest.loadable_with_transformers is stock and (not manifest.structure) is stock
    with torch.no_grad():
        expected = outcome.model(IDS).logits
        torch.testing.assert_close(compresskit.load(out)(IDS).logits, expected, rtol=0, atol=0)
        if stock:
            plain = AutoModelForCausalLM.from_pretrained(out).eval()
            torch.testing.assert_close(plain(IDS).logits, expected, rtol=1e-6, atol=1e-6)


def _config(out: Path) -> dict:
    return json.loads((out / "config.json").read_text())


# ---- FinerCut chains -------------------------------------------------------------------------


def test_finercut_then_finercut_renumbers_the_earlier_removals(saved, calib, tmp_path):
    # stage 1: attention of 2 of the 4 blocks; stage 2: the MLP of the first of them (the only candidate
    # --keep leaves), so that block is deleted and the later one moves down by one
    first = _prune(str(saved("llama4")), "finercut", calib, out=tmp_path / "a", level="attn", remove=0.5)
    gone = sorted(first.manifest.structure[0]["attention"])
    assert len(gone) == 2
    keep = "|".join(rf"layers\.{i}\.mlp$" for i in range(4) if i != gone[0])
    second = _prune(str(tmp_path / "a"), "finercut", calib, out=tmp_path / "b", level="mlp", remove=0.25, keep=keep)
    d = second.manifest.method_details
    assert d["blocks_deleted"] == 1 and d["order"][0]["block"] == gone[0]
    assert second.manifest.structure == [{"kind": "removed_sublayers", "attention": [gone[1] - 1], "mlp": []}]
    assert _config(tmp_path / "b")["per_layer_config"] == {str(gone[1] - 1): {"skip": ["attention"]}}
    assert _config(tmp_path / "b")["num_hidden_layers"] == 3
    _assert_reloads(second, tmp_path / "b", stock=False)


def test_finercut_then_block_removal_renumbers_the_earlier_removals(saved, calib, tmp_path):
    first = _prune(str(saved("llama4")), "finercut", calib, out=tmp_path / "a", remove=0.25, keep=r"layers\.0\.")
    entry = first.manifest.structure[0]
    assert entry["attention"] + entry["mlp"] and 0 not in entry["attention"] + entry["mlp"]
    # block removal: only block 0 is a candidate, so every earlier removal moves down by one
    second = _prune(str(tmp_path / "a"), "finercut", calib, out=tmp_path / "b", level="block", remove=0.25,
                    keep=r"layers\.[1-3]$")
    assert second.manifest.method_details["blocks_deleted"] == 1
    shifted = {k: [i - 1 for i in entry[k]] for k in ("attention", "mlp")}
    assert second.manifest.structure == [{"kind": "removed_sublayers", **shifted}]
    _assert_reloads(second, tmp_path / "b", stock=False)


def test_block_removal_chain_stays_a_stock_checkpoint(saved, calib, tmp_path):
    _prune(str(saved("llama4")), "finercut", calib, out=tmp_path / "a", level="block", remove=0.25)
    second = _prune(str(tmp_path / "a"), "finercut", calib, out=tmp_path / "b", level="block", remove=0.34)
    assert _config(tmp_path / "b")["num_hidden_layers"] == 2
    _assert_reloads(second, tmp_path / "b", stock=True)


def test_finercut_then_owl_hits_the_budget_and_reloads(saved, calib, tmp_path):
    # wide enough (256 inputs per row) that Wanda's per-row rounding stays well inside the tolerance
    _prune(str(saved("llama4_wide")), "finercut", calib, out=tmp_path / "a", remove=0.25)
    second = _prune(str(tmp_path / "a"), "owl", calib, out=tmp_path / "b", sparsity=BUDGET, owl_lambda=0.2)
    ratios = second.manifest.block_ratios
    assert max(ratios) - min(ratios) > 0.1  # the allocation is really non-uniform
    assert abs(second.manifest.sparsity["overall"] - BUDGET) <= TOLERANCE, second.manifest.sparsity["overall"]
    assert [s["method"] for s in second.manifest.stages] == ["finercut"]
    _assert_reloads(second, tmp_path / "b", stock=False)


def test_run_recipe_with_two_finercut_stages_succeeds_and_loads(cli, saved, calib, tmp_path):
    recipe = tmp_path / "two-cuts.yaml"
    recipe.write_text(
        f"model: {saved('llama4')}\ndevice: cpu\noutput: {tmp_path / 'run'}\n"
        f"calibration:\n  source: {calib}\n  nsamples: 2\n  seqlen: 16\n"
        "stages:\n  - method: finercut\n    remove: 0.25\n  - method: finercut\n    remove: 0.5\n"
        "evaluation:\n  ppl: [demo]\n  seqlen: 32\n  max_windows: 1\nbaseline: never\n")
    res = cli("run", recipe, "--quiet")
    assert res.exit_code == 0, res.stderr
    manifest = compresskit.inspect(tmp_path / "run")
    assert manifest.method == "finercut" and [s["method"] for s in manifest.stages] == ["finercut"]
    with torch.no_grad():
        assert torch.isfinite(compresskit.load(tmp_path / "run")(IDS).logits).all()


# ---- MoE chains ------------------------------------------------------------------------------


@pytest.mark.parametrize("stock", [True, False], ids=["stock", "structure"])
def test_cdmoe_then_reap_saves_and_reloads(saved, calib, tmp_path, stock):
    gate = {"shared_gate": "constant"} if stock else {}
    first = _prune(str(saved("qwen2_moe4")), "cdmoe", calib, out=tmp_path / "a", experts=1, layers=1, **gate)
    assert first.manifest.loadable_with_transformers is stock
    second = _prune(str(tmp_path / "a"), "reap", calib, out=tmp_path / "b", remove_experts=0.5)
    condensed = first.manifest.method_details["condensed_blocks"]
    reaped = second.manifest.method_details["moe_blocks"]
    assert len(reaped) == 3 and not set(condensed) & set(reaped)
    assert _config(tmp_path / "b")["num_experts"] == 2
    # REAP alone writes a stock checkpoint; after a compact CD-MoE stage the form must say it is not one
    assert ("earlier stage" in (second.manifest.form_reason or "")) is not stock
    _assert_reloads(second, tmp_path / "b", stock=stock)


# ---- budgets on blocks of unequal size --------------------------------------------------------


def _kind_model(kind: str, calib: str):
    """An in-memory model whose blocks differ in size for ``kind`` (chosen so that OWL's plain mean
    would miss the budget by more than the tolerance: checked in the test)."""
    if kind == "moe":
        return tiny_model("deepseek_v2")  # a dense block, then an MoE block with shared experts
    if kind == "condensed":
        return _prune(_qwen2_moe(), "cdmoe", calib, experts=1, layers=1, stock=False).model
    if kind == "removed":
        return _prune(_llama(), "finercut", calib, remove=0.25).model
    if kind == "lowrank":
        return _prune(_llama(), "welore", None, rank_reduction=0.7, include=r"layers\.[13]\.").model
    raise ValueError(kind)


@pytest.fixture(scope="module")
def kind_models(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib-kinds") / "calib.txt"
    path.write_text("Four score and seven years ago our fathers brought forth on this continent a new nation. " * 60)
    made: dict[str, object] = {}

    def make(kind: str):
        if kind not in made:
            made[kind] = _kind_model(kind, f"file:{path}")
        return copy.deepcopy(made[kind]), f"file:{path}"

    return make


ALLOCATIONS = {"uniform": {}, "owl": {"owl_lambda": 0.2}, "owled": {"owl_lambda": 0.2},
               "alphapruning": {"alpha_epsilon": 0.3}}


@pytest.mark.parametrize("method", list(ALLOCATIONS))
@pytest.mark.parametrize("kind", ["moe", "condensed", "removed", "lowrank"])
def test_every_allocation_hits_its_parameter_weighted_budget(kind_models, kind, method):
    model, calib = kind_models(kind)
    # magnitude: exact counts per matrix, so what is measured is the allocation's own budget
    outcome = _prune(model, method, calib, sparsity=BUDGET, pruner="magnitude",
                     **ALLOCATIONS[method])
    measured = outcome.manifest.sparsity["overall"]
    assert abs(measured - BUDGET) <= TOLERANCE, (kind, method, measured, outcome.manifest.block_ratios)
    if method in ("owl", "owled"):  # the blocks differ enough that the unweighted mean would miss
        d = outcome.manifest.method_details
        plain = allocate_owl(d["outlier_ratio_D"], BUDGET, ALLOCATIONS[method]["owl_lambda"])
        sizes = d["block_params"]
        assert abs(sum(r * n for r, n in zip(plain, sizes)) / sum(sizes) - BUDGET) > 2 * TOLERANCE


def test_owl_weights_the_mean_by_block_size_and_keeps_the_reference_for_equal_blocks():
    D = [3.1, 7.4, 5.0, 9.9]
    plain = allocate_owl(D, 0.5, 0.1)
    assert allocate_owl(D, 0.5, 0.1, sizes=[1000] * 4) == plain  # bit for bit: the reference's mean
    sizes = [10, 30, 20, 40]
    ratios = allocate_owl(D, 0.5, 0.1, sizes=sizes)
    assert sum(r * s for r, s in zip(ratios, sizes)) / sum(sizes) == pytest.approx(0.5, abs=1e-12)
    assert max(ratios) - min(ratios) == pytest.approx(0.2)  # the spread is still 2λ


def test_analyze_owl_previews_the_weighted_allocation_prune_makes(saved, calib, tmp_path):
    from compresskit.analyze import analyze

    _prune(str(saved("qwen2_moe4")), "cdmoe", calib, out=tmp_path / "cd", experts=1, layers=1, stock=False)
    src = str(tmp_path / "cd")  # one of the 4 MoE blocks condensed: blocks of unequal size
    report = analyze(src, "owl", sparsity=BUDGET, options={"owl_lambda": 0.2}, calib=calib, nsamples=2, seqlen=16,
                     device="cpu")
    sizes = _prune(src, "owl", calib, sparsity=BUDGET, owl_lambda=0.2).manifest.method_details["block_params"]
    assert len(set(sizes)) > 1
    expected = allocate_owl(report["per_block"]["outlier_ratio_D"], BUDGET, 0.2, sizes=sizes)
    assert report["per_block"]["owl_sparsity"] == pytest.approx(expected, abs=1e-12)


# ---- what inspect and the prune summary report --------------------------------------------------


def test_inspect_reports_finercut_on_the_remove_params_basis(cli, saved, calib, tmp_path):
    out = tmp_path / "fc"
    res = cli("prune", "--model", saved("llama4"), "--method", "finercut", "--remove-params", "0.3",
              "--calib", calib, "--nsamples", "2", "--seqlen", "16", "--device", "cpu", "--out", out)
    assert res.exit_code == 0, res.stderr
    d = compresskit.inspect(out).method_details
    achieved = d["achieved_param_fraction"]
    assert abs(achieved - d["param_fraction_model"]) > 0.01  # the two bases differ on this model
    for text in (res.stdout, cli("inspect", out).stdout):
        flat = " ".join(text.split())
        assert f"parameter fraction {achieved:.3f} of the decoder blocks' parameters" in flat, flat
        assert "removed sublayers" in flat and "measured sparsity" not in flat


def test_inspect_and_summary_name_the_condensed_layers_and_removed_experts(cli, saved, calib, tmp_path):
    common = ("--calib", calib, "--nsamples", "2", "--seqlen", "16", "--device", "cpu")
    res = cli("prune", "--model", saved("qwen2_moe4"), "--method", "cdmoe", "--experts", "1", "--layers", "2",
              *common, "--out", tmp_path / "cd")
    assert res.exit_code == 0, res.stderr
    d = compresskit.inspect(tmp_path / "cd").method_details
    for text in (res.stdout, cli("inspect", tmp_path / "cd").stdout):
        flat = " ".join(text.split())
        assert f"condensed 2 of 4 MoE layers" in flat and f"blocks {sorted(d['condensed_blocks'])}" in flat, flat
        assert "measured sparsity" not in flat
        for b in d["condensed_blocks"]:  # the kept expert of each condensed block, in its row
            assert re.search(rf"│\s*{b}\s*│\s*{d['layers'][str(b)]['experts'][0]}\s", text), text
    res = cli("prune", "--model", tmp_path / "cd", "--method", "reap", "--remove-experts", "0.5", *common,
              "--out", tmp_path / "reap")
    assert res.exit_code == 0, res.stderr
    d = compresskit.inspect(tmp_path / "reap").method_details
    for text in (res.stdout, cli("inspect", tmp_path / "reap").stdout):
        flat = " ".join(text.split())
        assert "removed 2 of 4 routed experts in each of 2 MoE layers" in flat, flat
        assert "measured sparsity" not in flat
        for b, layer in d["layers"].items():
            removed = " ".join(map(str, layer["removed"]))
            assert re.search(rf"│\s*{b}\s*│\s*{removed}\s*│", text), text
