"""Memory controls (engine/memory_plan.py): size parsing, the estimate, and the placement decision.

The estimate is a pure function of shapes, so it is checked here against hand-computed values at
Llama-2-7B shape; the decision is checked end to end on CPU with a tiny --max-gpu-memory (the plan
applies to whatever the compute device is once a budget is given).
"""

from __future__ import annotations

import pytest
import torch

import compresskit.api as api
from compresskit.engine.memory_plan import (
    activation_bytes,
    batch_working_bytes,
    format_size,
    parse_size,
    plan_memory,
    statistic_bytes,
)
from compresskit.errors import InputError

GiB, MiB = 2**30, 2**20
LLAMA7B_BLOCK = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]  # q k v o gate up down


@pytest.mark.parametrize(
    "text, expected",
    [("20GiB", 20 * GiB), ("20gib", 20 * GiB), ("512MB", 512 * 10**6), ("1.5G", int(1.5 * GiB)),
     ("64 MiB", 64 * MiB), ("4096", 4096), ("2TB", 2 * 10**12), (".5KiB", 512), (1024, 1024)],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "20XB", "-1GiB", "0", "0GiB", "twenty", "1e9", "20 GiB extra", True])
def test_parse_size_rejects_bad_input_in_one_line(text):
    with pytest.raises(InputError) as info:
        parse_size(text)
    assert "--max-gpu-memory" in str(info.value) and "\n" not in str(info.value)


def test_format_size():
    assert format_size(20 * GiB) == "20 GiB"
    assert format_size(1536 * MiB) == "1.5 GiB"
    assert format_size(100) == "100 B"


def test_activation_estimate_at_llama7b_shape():
    # 128 x 2048 tokens x 4096 x 2 bytes (bf16) = 2 GiB per copy; inputs + outputs = 4 GiB
    assert activation_bytes(128, 2048, 4096, 2) == 4 * GiB
    # one batch of 8: 8·2048·(4·4096 + 3·11008)·2 bytes
    assert batch_working_bytes(8, 2048, 4096, 11008, 2) == 8 * 2048 * (4 * 4096 + 3 * 11008) * 2


def test_statistic_estimate_at_llama7b_shape():
    hessians = (8 + 4) * (6 * 4096**2 + 11008**2)  # at most one fp64 [in, in] sum + fp32 value per linear
    solve = 8 * 3 * 11008**2 + 5 * 4096 * 11008  # down_proj: fp64 damped copy, inverse, factor; W fp32 + mask
    assert statistic_bytes(LLAMA7B_BLOCK, "hessian") == hessians + solve
    assert statistic_bytes(LLAMA7B_BLOCK, "sq_norm") == (8 + 4) * (6 * 4096 + 11008) + 4 * 4096 * 11008
    assert statistic_bytes(LLAMA7B_BLOCK, "none") == 4 * 4096 * 11008
    assert statistic_bytes([], "hessian") == 0


def test_plan_keeps_activations_on_the_device_when_they_fit():
    plan = plan_memory(budget=10 * GiB, parameter_bytes=GiB, batch_bytes=GiB, stat_bytes=GiB, activations=4 * GiB)
    assert not plan.offload_activations and plan.block_bytes == 3 * GiB
    assert plan.record()["activations"] == "device" and plan.record()["max_gpu_memory"] == "10 GiB"


def test_plan_offloads_automatically_when_activations_do_not_fit_beside_a_block():
    plan = plan_memory(budget=6 * GiB, parameter_bytes=GiB, batch_bytes=GiB, stat_bytes=GiB, activations=4 * GiB)
    assert plan.offload_activations and plan.reason.startswith("auto")
    assert plan.record()["activations"] == "offloaded"


def test_plan_forced_offload_and_no_budget():
    forced = plan_memory(budget=None, parameter_bytes=1, batch_bytes=1, stat_bytes=1, activations=1, force_offload=True)
    assert forced.offload_activations and "forced" in forced.reason
    free = plan_memory(budget=None, parameter_bytes=1, batch_bytes=1, stat_bytes=1, activations=10**15)
    assert not free.offload_activations


def test_plan_refuses_a_block_that_cannot_fit_naming_the_memory_needed():
    with pytest.raises(InputError) as info:
        plan_memory(budget=GiB, parameter_bytes=GiB, batch_bytes=MiB, stat_bytes=MiB, activations=0,
                    budget_name="--max-gpu-memory 1GiB")
    message = str(info.value)
    assert "one block needs 1 GiB" in message and "--max-gpu-memory 1GiB" in message and "\n" not in message


# --------------------------------------------------------------------------- end to end (CPU)
CALIB = ["--nsamples", "8", "--seqlen", "32", "--batch-size", "2", "--device", "cpu", "--quiet"]


def _tiny_plan(model_dir, sotu, pruner="wanda"):
    from compresskit.methods.sparsify import plan_activation_memory

    job = api.build_job(str(model_dir), device="cpu", pruner=pruner, calib=f"file:{sotu}", nsamples=8, seqlen=32,
                        batch_size=2)
    return plan_activation_memory(job, None, "hessian" if pruner == "sparsegpt" else "sq_norm")


def test_cli_too_small_budget_fails_in_one_line_naming_the_memory(cli, tiny_model_dir, sotu_jsonl, tmp_path):
    src = tiny_model_dir("llama")
    needed = _tiny_plan(src, sotu_jsonl, "sparsegpt").block_bytes
    out = tmp_path / "out"
    res = cli("prune", "--model", src, "--method", "sparsegpt", "--sparsity", "0.5", "--calib", f"file:{sotu_jsonl}",
              *CALIB, "--max-gpu-memory", "64KiB", "--out", out)
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: one block needs ")
    assert format_size(needed) in lines[0] and "--max-gpu-memory 64KiB" in lines[0]
    assert not out.exists()


def test_cli_bad_size_is_one_line_before_loading(cli, tmp_path):
    res = cli("prune", "--model", "/nonexistent/model", "--method", "wanda", "--sparsity", "0.5",
              "--max-gpu-memory", "lots", "--out", tmp_path / "o")
    assert res.exit_code == 2 and res.stderr.strip().splitlines() == [
        "error: --max-gpu-memory: expected a size like 20GiB, 512MB or 1.5G, got 'lots'"]


def test_budget_between_block_and_activations_offloads_with_the_same_result(tiny_model_dir, sotu_jsonl, tmp_path):
    src = tiny_model_dir("llama")
    plan = _tiny_plan(src, sotu_jsonl)
    budget = plan.block_bytes + plan.activation_bytes // 2  # a block fits, all activations do not
    common = dict(sparsity=0.5, calib=f"file:{sotu_jsonl}", nsamples=8, seqlen=32, batch_size=2, device="cpu")
    offloaded = api.prune(str(src), "wanda", max_gpu_memory=str(budget), out=tmp_path / "off", **common)
    hyper = offloaded.manifest.hyperparameters
    assert hyper["activations"] == "offloaded" and hyper["placement_reason"].startswith("auto")
    assert api.inspect(tmp_path / "off").hyperparameters["activations"] == "offloaded"
    roomy = api.prune(str(src), "wanda", max_gpu_memory="1GiB", **common)
    assert roomy.manifest.hyperparameters["activations"] == "device"
    forced = api.prune(str(src), "wanda", max_gpu_memory="1GiB", offload_activations=True, **common)
    assert forced.manifest.hyperparameters["placement_reason"] == "forced by --offload-activations"
    from distributed_worker import decoder_masks

    a, b = decoder_masks(offloaded.model), decoder_masks(roomy.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
