"""Data-parallel calibration (engine/distributed.py): 2 gloo ranks under torchrun vs 1 process.

One ``torchrun --nproc-per-node 2`` run of tests/distributed_worker.py (started once per session,
~30 s on 2 cores) prunes a tiny Llama with Wanda, SparseGPT and OWL, in fp32 and in bf16, and a
tiny Qwen2-MoE with SparseGPT; the masks must match the single-process run (≥ 99.9 % of entries;
measured: 100 %), be identical on both ranks, and only rank 0 may write. The ranks run with one
thread each, the single process here with the default thread count, as in real use.

bf16 is the sensitive case: an fp32 difference in SparseGPT's weight update flips a bf16 rounding,
which changes the next block's inputs. Statistics are therefore summed in float64 (per-rank
sums, then an fp64 all-reduce) and SparseGPT factorises in float64, each rounded to fp32 once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import compresskit.api as api
from compresskit.engine.collect import _merge_groups
from compresskit.engine.distributed import all_reduce_floats, all_reduce_mean, all_reduce_sum, assign_owners, batch_share, is_writer

TESTS = Path(__file__).parent
CALIB = dict(nsamples=8, seqlen=32, seed=0, batch_size=2, device="cpu")
RUNS = {"wanda": "wanda", "sparsegpt": "sparsegpt", "owl": "owl", "moe_sparsegpt": "sparsegpt",
        "bf16_wanda": "wanda", "bf16_sparsegpt": "sparsegpt", "bf16_owl": "owl"}


# --------------------------------------------------------------------------- pure parts
def test_batch_share_splits_whole_batches_contiguously():
    # 8 samples, batches of 2 -> 4 batches -> 2 per rank
    assert [batch_share(8, 2, 2, r) for r in range(2)] == [slice(0, 4), slice(4, 8)]
    # 7 samples, batches of 2 -> batches [0,2) [2,4) [4,6) [6,7) over 3 ranks: 2, 1, 1 batches
    assert [batch_share(7, 2, 3, r) for r in range(3)] == [slice(0, 4), slice(4, 6), slice(6, 7)]
    # more ranks than batches: the last rank holds nothing but still exists
    assert [batch_share(3, 2, 3, r) for r in range(3)] == [slice(0, 2), slice(2, 3), slice(3, 3)]
    # a single process keeps everything
    assert batch_share(5, 8, 1, 0) == slice(0, 5)
    for n, b, w in [(128, 8, 4), (10, 3, 4), (1, 1, 2)]:
        covered = [i for r in range(w) for i in range(n)[batch_share(n, b, w, r)]]
        assert covered == list(range(n))


def test_assign_owners_balances_and_is_deterministic():
    costs = [10, 1, 1, 1, 7, 3]
    owners = assign_owners(costs, 2)
    assert owners == assign_owners(costs, 2)
    load = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(2)]
    assert sorted(load) == [11, 12]
    assert assign_owners(costs, 1) == [0] * 6


def test_merge_groups_unions_sharing_seen_on_any_rank():
    names = ["q", "k", "v", "o", "e0.gate", "e0.up"]
    rank0 = [["q", "k", "v"], ["o"]]  # expert 0 got no token here
    rank1 = [["q", "k", "v"], ["o"], ["e0.gate", "e0.up"]]
    assert _merge_groups(names, [rank0, rank1]) == [["q", "k", "v"], ["o"], ["e0.gate", "e0.up"]]


def test_single_process_helpers_are_identities():
    x = torch.tensor([1.0, 2.0])
    assert all_reduce_sum(x) is x and x.tolist() == [1.0, 2.0]
    assert all_reduce_mean(torch.tensor(3.0), 5).item() == 3.0
    assert all_reduce_floats(0.1, 3) == (0.1, 3)  # the same values, untouched: single-process scores unchanged
    assert is_writer()


# --------------------------------------------------------------------------- 2 ranks vs 1
def torchrun_two_ranks(worker: str, *args) -> Path:
    """Run tests/<worker> under ``torchrun --standalone --nproc-per-node 2`` (gloo, one thread per
    rank); the worker writes its results into the last argument, which is returned."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(TESTS))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(TESTS / worker), *map(str, args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Path(args[-1])


@pytest.fixture(scope="module")
def two_ranks(tiny_model_dir, sotu_jsonl, tmp_path_factory):
    llama, moe = tiny_model_dir("llama"), tiny_model_dir("qwen2_moe")
    out = torchrun_two_ranks("distributed_worker.py", llama, moe, f"file:{sotu_jsonl}", tmp_path_factory.mktemp("dp2"))
    return llama, moe, sotu_jsonl, out


def _agreement(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    same = sum(int((a[k] == b[k]).sum()) for k in a)
    return same / sum(a[k].numel() for k in a)


@pytest.mark.parametrize("run", list(RUNS))
def test_two_ranks_give_the_single_process_masks(two_ranks, run):
    from distributed_worker import decoder_masks, run_dtype

    llama, moe, sotu, out = two_ranks
    model = moe if run.startswith("moe") else llama
    single = api.prune(str(model), RUNS[run], sparsity=0.5, calib=f"file:{sotu}", dtype=run_dtype(run), **CALIB)
    expected = decoder_masks(single.model)
    rank0 = torch.load(out / f"masks_{run}_rank0.pt")
    rank1 = torch.load(out / f"masks_{run}_rank1.pt")
    assert _agreement(rank0, rank1) == 1.0  # every rank applied the same decision
    agreement = _agreement(rank0, expected)
    print(f"{run}: {agreement:.6%} of mask entries identical to one process")
    assert agreement >= 0.999
    assert 0.45 < sum(int(m.sum()) for m in rank0.values()) / sum(m.numel() for m in rank0.values()) < 0.55


def test_ranks_split_the_samples_and_only_rank_0_writes(two_ranks):
    _, _, _, out = two_ranks
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    # 8 samples in batches of 2: each rank's engine ran on 4 (OWL runs the engine twice), fp32 then bf16
    assert ranks[0]["engine_samples"] == ranks[1]["engine_samples"] == [4] * 9
    assert ranks[0]["written"] == [str(out / run) for run in RUNS]
    assert ranks[1]["written"] == []
    assert ranks[0]["hyperparameters"]["sparsegpt"]["data_parallel_ranks"] == 2
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted([*RUNS, "cli"])
    for run in RUNS:
        assert (out / run / "compresskit.json").is_file()
    # the CLI under torchrun: rank 0 prints the JSON summary, rank 1 prints nothing
    summary = json.loads((out / "cli_rank0.txt").read_text())
    assert summary["out"] == str(out / "cli") and summary["hyperparameters"]["data_parallel_ranks"] == 2
    assert (out / "cli_rank1.txt").read_text() == ""


def test_statistics_reduce_over_ranks_that_saw_different_linears(two_ranks):
    """Sums and counts are reduced, shared accumulators once, a linear seen by one rank only included."""
    from compresskit.pruning import HessianStat

    _, _, _, out = two_ranks
    got = [torch.load(out / f"stats_rank{r}.pt") for r in range(2)]
    shared, expert = HessianStat(6), HessianStat(6)
    for rank in range(2):  # what one process holding both ranks' batches accumulates
        gen = torch.Generator().manual_seed(rank)
        for _ in range(rank + 1):
            shared.add(torch.randn(2, 5, 6, generator=gen))
            if rank == 0:
                expert.add(torch.randn(7, 6, generator=gen))
    for values in got:
        torch.testing.assert_close(values["q"], shared.value(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(values["k"], shared.value(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(values["expert"], expert.value(), rtol=1e-6, atol=1e-6)
        assert "never" not in values
        assert int(values["samples_q"]) == 3 and int(values["samples_expert"]) == 1
        assert int(values["samples_never"]) == 0
    assert torch.equal(got[0]["q"], got[1]["q"])


def test_python_m_compresskit_runs_the_cli(monkeypatch, capsys):
    """``python -m compresskit`` / ``torchrun -m compresskit`` run ``compresskit/__main__.py``."""
    import runpy

    from compresskit import cli

    monkeypatch.setattr(sys, "argv", ["compresskit", "prune", "--help"])
    monkeypatch.setattr(cli.out_console, "file", sys.stdout)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("compresskit", run_name="__main__")
    assert exit_info.value.code in (0, None)
    assert "--max-gpu-memory" in capsys.readouterr().out


# --------------------------------------------------------------------------- structural searches, 2 ranks vs 1
@pytest.fixture(scope="module")
def two_ranks_structural(tiny_model_dir, sotu_jsonl, tmp_path_factory):
    llama, moe = tiny_model_dir("llama"), tiny_model_dir("qwen2_moe")
    out = torchrun_two_ranks("distributed_structural_worker.py", llama, moe, f"file:{sotu_jsonl}",
                             tmp_path_factory.mktemp("dp2-structural"))
    ranks = [json.loads((out / f"structural_rank{r}.json").read_text()) for r in range(2)]
    return llama, moe, sotu_jsonl, ranks


def test_cdmoe_orders_with_two_ranks_equal_one_process(two_ranks_structural):
    """Each rank scores its half of the samples; distance sums, token counts, routing statistics and
    the shared-gate mean are all-reduced before every argmin, so both ranks and one process agree."""
    from distributed_structural_worker import CALIB, CDMOE, run_cdmoe

    _, moe, sotu, ranks = two_ranks_structural
    single = run_cdmoe(str(moe), f"file:{sotu}")
    assert ranks[0]["samples"]["expert_stats"] == ranks[1]["samples"]["expert_stats"] == [4]  # 8 samples, halved
    assert ranks[0]["samples"]["replay"][:1] == ranks[1]["samples"]["replay"][:1] == [4]
    for got in (r["cdmoe"] for r in ranks):
        assert got["expert_order"] == single["expert_order"]
        assert got["layer_order"] == single["layer_order"]
        assert len(got["layer_order"]) == CDMOE["layers"] and all(len(o) == CDMOE["experts"]
                                                                  for o in got["expert_order"].values())
        for key in single["expert_order"]:
            assert got["expert_stats"][key]["count"] == single["expert_stats"][key]["count"]
            assert got["expert_stats"][key]["tokens"] == single["expert_stats"][key]["tokens"]
            assert got["avg_w"][key] == pytest.approx(single["avg_w"][key], rel=1e-12)
            assert got["shared_gate_mean"][key] == pytest.approx(single["shared_gate_mean"][key], rel=1e-12)
            assert got["expert_distances"][key] == pytest.approx(single["expert_distances"][key], rel=1e-9)
        assert got["layer_distances"] == pytest.approx(single["layer_distances"], rel=1e-9)
    assert ranks[0]["cdmoe"]["expert_distances"] == ranks[1]["cdmoe"]["expert_distances"]  # the same bits
    assert CALIB["nsamples"] == 8


def test_finercut_removal_order_with_two_ranks_equals_one_process(two_ranks_structural):
    from distributed_structural_worker import run_finercut

    llama, _, sotu, ranks = two_ranks_structural
    single = run_finercut(str(llama), f"file:{sotu}")
    assert ranks[0]["samples"]["replay"][-1] == ranks[1]["samples"]["replay"][-1] == 4
    assert single["removed"] >= 2
    names = [(s["step"], s["name"]) for s in single["order"]]
    for got in (r["finercut"] for r in ranks):
        assert [(s["step"], s["name"]) for s in got["order"]] == names and got["removed"] == single["removed"]
        assert [s["distance"] for s in got["order"]] == pytest.approx([s["distance"] for s in single["order"]],
                                                                    rel=1e-9)
        assert got["final_distance"] == pytest.approx(single["final_distance"], rel=1e-9)
    assert ranks[0]["finercut"] == ranks[1]["finercut"]  # the same bits on every rank
