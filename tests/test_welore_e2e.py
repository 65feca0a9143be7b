"""WeLore end to end on tiny models: prune → low-rank checkpoint → load, --merge, analyze spectrum.

Expectations are recomputed independently from the source weights (torch.linalg.svdvals and the
pure planning functions), so the CLI, the manifest and the files on disk are checked against
numbers the pipeline did not produce itself.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from torch import nn

import compresskit
from compresskit.checkpoint import MANIFEST_NAME
from compresskit.lowrank import LowRankLinear, find_global_tau, normalised_spectrum, plan_ranks, ranks_pruned
from compresskit.models import get_adapter

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CPU = ["--device", "cpu", "--quiet"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Two cores shared with other test runs: one intra-op thread avoids oversubscription stalls."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _source_spectra(src: Path) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, int]]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in PROJ}
    spectra = {n: torch.linalg.svdvals(m.weight.detach().float()) for n, m in linears.items()}
    return spectra, {n: tuple(m.weight.shape) for n, m in linears.items()}


def _tensor_bytes(directory: Path) -> int:
    """Bytes of tensor data in the safetensors files (file size minus the 8-byte length and header)."""
    total = 0
    for f in directory.glob("*.safetensors"):
        with open(f, "rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
        total += f.stat().st_size - 8 - header_len
    return total


def _logits(model, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, 8192, (2, 16), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_welore_checkpoint_reloads_exactly_and_manifest_matches_an_independent_plan(cli, tiny_model_dir, tmp_path):
    src = tiny_model_dir("llama")
    out = tmp_path / "welore50"
    res = cli("prune", "--model", src, "--method", "welore", "--rank-reduction", "0.5", "--min-ratio", "0.4",
              "--out", out, *CPU)
    assert res.exit_code == 0, res.stderr

    spectra, shapes = _source_spectra(src)
    expected = plan_ranks(spectra, shapes, 0.5, min_ratio=0.4)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    details = manifest["method_details"]
    assert manifest["method"] == "welore" and manifest["block_ratios"] is None
    assert manifest["loadable_with_transformers"] is False
    assert manifest["structure"] == [{"kind": "lowrank", "ranks": expected.rank_map}]
    assert details["tau"] == pytest.approx(expected.tau, abs=1e-12)
    assert details["tau_llama2_table"] == 0.175  # the reference's τ at 50 %, kept as a cross-check
    # Both reductions, from shapes and ranks by hand.
    n_ranks = sum(min(s) for s in shapes.values())
    pruned = sum(ranks_pruned(spectra[n], expected.tau) for n in spectra)
    assert abs(pruned - 0.5 * n_ranks) <= len(spectra)  # within one rank per matrix
    assert details["planned_rank_reduction"] == pytest.approx(pruned / n_ranks)
    removed = sum(min(shapes[n]) - k for n, k in expected.rank_map.items())
    assert details["applied_rank_reduction"] == pytest.approx(removed / n_ranks)
    dense = sum(m * n for m, n in shapes.values())
    saved = sum(shapes[n][0] * shapes[n][1] - k * sum(shapes[n]) for n, k in expected.rank_map.items())
    assert details["applied_param_reduction"] == pytest.approx(saved / dense)
    assert manifest["parameters"]["total_after"] == manifest["parameters"]["total_before"] - saved
    assert manifest["hyperparameters"]["rank_reduction"] == 0.5 and manifest["hyperparameters"]["merge"] is False

    loaded = compresskit.load(out)
    factored = {n: m.rank for n, m in loaded.named_modules() if isinstance(m, LowRankLinear)}
    assert factored == expected.rank_map
    first = next(iter(factored))
    assert tuple(loaded.get_submodule(first).U.weight.shape) == (shapes[first][0], factored[first])
    in_memory = compresskit.prune(str(src), "welore", device="cpu", method_options={"rank_reduction": 0.5, "min_ratio": 0.4})
    torch.testing.assert_close(_logits(loaded), _logits(in_memory.model), rtol=0, atol=0)


def test_lowrank_safetensors_shrink_exactly_as_the_plan_predicts(cli, tiny_model_dir, tmp_path):
    src = tiny_model_dir("llama")
    out = tmp_path / "w"
    assert cli("prune", "--model", src, "--method", "welore", "--rank-reduction", "0.6", "--min-ratio", "0.0",
               "--out", out, *CPU).exit_code == 0
    ranks = json.loads((out / MANIFEST_NAME).read_text())["structure"][0]["ranks"]
    _, shapes = _source_spectra(src)
    # fp32: 4 bytes per element; each LRC stores k·(m+n) instead of m·n (llama linears have no bias).
    saved_bytes = 4 * sum(shapes[n][0] * shapes[n][1] - k * sum(shapes[n]) for n, k in ranks.items())
    assert saved_bytes > 0
    assert _tensor_bytes(out) == _tensor_bytes(src) - saved_bytes
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        name, k = next(iter(ranks.items()))
        assert f"{name}.weight" not in keys
        assert f.get_slice(f"{name}.U.weight").get_shape() == [shapes[name][0], k]
        assert f.get_slice(f"{name}.V.weight").get_shape() == [k, shapes[name][1]]


def test_merge_writes_the_factored_model_as_plain_dense_weights(cli, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    src = tiny_model_dir("llama")
    factored_dir, merged_dir = tmp_path / "factored", tmp_path / "merged"
    common = ["--method", "welore", "--rank-reduction", "0.5", "--min-ratio", "0.4", *CPU]
    assert cli("prune", "--model", src, "--out", factored_dir, *common).exit_code == 0
    assert cli("prune", "--model", src, "--out", merged_dir, "--merge", *common).exit_code == 0

    manifest = json.loads((merged_dir / MANIFEST_NAME).read_text())
    assert manifest["structure"] == [] and manifest["loadable_with_transformers"] is True
    assert manifest["parameters"]["total_after"] == manifest["parameters"]["total_before"]
    ranks = manifest["method_details"]["rank_map"]
    assert ranks == json.loads((factored_dir / MANIFEST_NAME).read_text())["structure"][0]["ranks"]

    merged = AutoModelForCausalLM.from_pretrained(merged_dir)  # plain transformers, no compresskit
    factored = compresskit.load(factored_dir)
    torch.testing.assert_close(_logits(merged), _logits(factored), rtol=1e-4, atol=1e-5)
    source = AutoModelForCausalLM.from_pretrained(src)
    for name, module in merged.named_modules():
        if isinstance(module, nn.Linear) and name.split(".")[-1] in PROJ:
            if name in ranks:
                assert int(torch.linalg.matrix_rank(module.weight.double(), rtol=1e-5)) == ranks[name]
            else:  # an N-LRC matrix is untouched, bit for bit
                assert torch.equal(module.weight, source.get_submodule(name).weight)


def test_uniform_baseline_prunes_every_matrix_by_the_same_fraction(tiny_model_dir):
    outcome = compresskit.prune(str(tiny_model_dir("llama")), "welore", device="cpu",
                                method_options={"rank_reduction": 0.6, "uniform": True})
    details = outcome.manifest.method_details
    assert details["method"] == "uniform" and details["tau"] is None
    # q/o/gate/up/down have min(m, n) = 64: round(0.6 · 64) = 38 pruned, k = 26; k/v are 32 x 64:
    # round(0.6 · 32) = 19 pruned, k = 13. Every matrix is below its break-even, so all 14 qualify.
    expected = {m["name"]: 13 if m["full_rank"] == 32 else 26 for m in details["matrices"]}
    assert {m["name"]: m["planned_rank"] for m in details["matrices"]} == expected
    assert details["rank_map"] == expected and len(expected) == 14
    assert sum(v == 13 for v in expected.values()) == 4  # k_proj, v_proj in 2 blocks


@pytest.mark.parametrize(
    "args,message",
    [
        (["--rank-reduction", "1.0"], "--rank-reduction must be in (0, 1)"),
        (["--rank-reduction", "0"], "--rank-reduction must be in (0, 1)"),
        ([], "needs --rank-reduction"),
        (["--rank-reduction", "0.05", "--min-ratio", "0.9"], "no matrix qualifies"),
        (["--rank-reduction", "0.5", "--min-ratio", "1.5"], "--min-ratio must be less than 1 (got 1.5)"),
        (["--rank-reduction", "0.5", "--sparsity", "0.5"], "do not apply to --method welore"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(cli, tiny_model_dir, tmp_path, args, message):
    out = tmp_path / "never"
    res = cli("prune", "--model", tiny_model_dir("llama"), "--method", "welore", *args, "--out", out, *CPU)
    assert res.exit_code == 2
    lines = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], res.stderr
    assert not out.exists() and not list(tmp_path.glob(".never*"))


def test_analyze_spectrum_json_equals_a_direct_svd(cli, tiny_model_dir, tmp_path):
    src = tiny_model_dir("llama")
    png = tmp_path / "spectra.png"
    res = cli("analyze", "--model", src, "--metric", "spectrum", "--rank-reduction", "0.3", "--min-ratio", "0.2",
              "--device", "cpu", "--json", "--plot", png)
    assert res.exit_code == 0, res.stderr
    report = json.loads(res.stdout)
    spectra, shapes = _source_spectra(src)
    tau = find_global_tau(spectra, 0.3)
    assert report["tau"] == pytest.approx(tau, abs=1e-12)
    assert set(report["per_matrix"]) == set(spectra)
    kept_by_block = [[0, 0], [0, 0]]
    for name, entry in report["per_matrix"].items():
        sigma, (m, n) = spectra[name], shapes[name]
        full = min(m, n)
        assert entry["sigma_max"] == pytest.approx(float(sigma[0]), rel=1e-5)
        assert entry["sigma_min"] == pytest.approx(float(sigma[-1]), rel=1e-4)
        assert entry["profile_rank"][0] == 0 and entry["profile_rank"][-1] == full - 1
        assert entry["profile_rank"] == sorted(set(entry["profile_rank"])) and len(entry["profile_rank"]) == min(33, full)
        direct = normalised_spectrum(sigma)
        assert entry["profile"] == pytest.approx([float(direct[i]) for i in entry["profile_rank"]], abs=1e-5)
        p = int((direct < tau).sum())
        assert entry["pruned"] == p and entry["planned_rank"] == full - p
        lowrank = p / full > 0.2 and (full - p) * (m + n) < m * n
        assert entry["lowrank"] == lowrank
        assert entry["kept_rank"] == (full - p if lowrank else full)
        kept_by_block[entry["block"]][0] += entry["kept_rank"]
        kept_by_block[entry["block"]][1] += full
    assert report["per_block"]["kept_rank_fraction"] == pytest.approx([k / f for k, f in kept_by_block])
    assert png.stat().st_size > 10_000 and report["plot"] == str(png)


def test_real_deepseek_moe_keeps_fused_experts_dense_and_reloads_exactly(tmp_path):
    from compresskit.paths import shared_models_dir

    src = shared_models_dir() / "deepseek-v2-moe-25m"
    if not (src / "config.json").exists():
        pytest.skip(f"shared model missing: {src}")
    out = tmp_path / "ds"
    outcome = compresskit.prune(str(src), "welore", out=out, device="cpu",
                                method_options={"rank_reduction": 0.4, "min_ratio": 0.3})
    details = outcome.manifest.method_details
    assert details["fused_expert_blocks_kept_dense"] == list(range(1, 8))  # first_k_dense_replace = 1
    names = [m["name"] for m in details["matrices"]]
    assert not any(".experts." in n for n in names)
    assert any("shared_experts" in n for n in names) and any("kv_b_proj" in n for n in names)
    # A trained model's spectra are not alike: the same τ leaves different ranks per kind.
    kept = {m["name"].rsplit(".", 1)[-1]: m["planned_rank"] / m["full_rank"] for m in details["matrices"]}
    assert max(kept.values()) - min(kept.values()) > 0.1
    loaded = compresskit.load(out)
    assert {n: m.rank for n, m in loaded.named_modules() if isinstance(m, LowRankLinear)} == details["rank_map"]
    assert loaded.dtype == torch.bfloat16
    adapter = get_adapter(loaded)
    assert adapter.moe(1).fused
    torch.testing.assert_close(_logits(loaded), _logits(outcome.model), rtol=0, atol=0)


def test_welore_after_wanda_keeps_the_zeros_of_dense_matrices_and_factorises_the_pruned_weights(
        cli, tiny_model_dir, sotu_jsonl, tmp_path):
    src = tiny_model_dir("llama")
    sparse, both = tmp_path / "wanda", tmp_path / "wanda-welore"
    assert cli("prune", "--model", src, "--method", "wanda", "--sparsity", "0.5", "--calib", f"file:{sotu_jsonl}",
               "--nsamples", "4", "--seqlen", "32", "--out", sparse, *CPU).exit_code == 0
    res = cli("prune", "--model", sparse, "--method", "welore", "--rank-reduction", "0.5", "--min-ratio", "0.4",
              "--out", both, *CPU)
    assert res.exit_code == 0, res.stderr
    manifest = json.loads((both / MANIFEST_NAME).read_text())
    assert [s["method"] for s in manifest["stages"]] == ["wanda"] and manifest["method"] == "welore"
    ranks = manifest["structure"][0]["ranks"]
    # The plan is made from the *pruned* weights' spectra.
    spectra, shapes = _source_spectra(sparse)
    assert ranks == plan_ranks(spectra, shapes, 0.5, min_ratio=0.4).rank_map
    pruned, model = compresskit.load(sparse), compresskit.load(both)
    for name in spectra:
        module = model.get_submodule(name)
        if name in ranks:  # rank-k approximation of the sparse weight: dense factors
            assert isinstance(module, LowRankLinear) and int((module.merged_weight() == 0).sum()) == 0
            w = pruned.get_submodule(name).weight.double()
            u, s, vh = torch.linalg.svd(w)
            k = ranks[name]
            torch.testing.assert_close(module.merged_weight().double(), (u[:, :k] * s[:k]) @ vh[:k], rtol=0, atol=1e-5)
        else:  # N-LRC: wanda's zeros (half of every row) are still there
            assert torch.equal(module.weight, pruned.get_submodule(name).weight)
            assert torch.all((module.weight == 0).sum(dim=1) == module.in_features // 2)
