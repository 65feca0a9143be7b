"""One rank of the data-parallel tests (tests/test_distributed.py), started by ``torchrun``.

    torchrun --standalone --nproc-per-node 2 tests/distributed_worker.py MODEL_DIR MOE_DIR CALIB OUT_DIR

Prunes ``MODEL_DIR`` with Wanda, SparseGPT and OWL (in fp32 and in bf16) and ``MOE_DIR`` with SparseGPT through
``compresskit.api.prune`` (output ``OUT_DIR/<run>``), saves this rank's masks
(``masks_<run>_rank<R>.pt``), which checkpoints this rank wrote and how many calibration samples
its engine got (``rank<R>.json``), reduces hand-made statistics where the ranks saw different
linears (``stats_rank<R>.pt``), then runs the CLI once (``cli_rank<R>.txt``: what it printed).
"""

from __future__ import annotations

import io
import json
import os
import sys
from contextlib import redirect_stdout
from pathlib import Path

import torch

import compresskit.api as api
from compresskit import cli
from compresskit.engine import distributed

RUNS = {"wanda": "wanda", "sparsegpt": "sparsegpt", "owl": "owl", "moe_sparsegpt": "sparsegpt",
        "bf16_wanda": "wanda", "bf16_sparsegpt": "sparsegpt", "bf16_owl": "owl"}
CALIB = dict(nsamples=8, seqlen=32, seed=0, batch_size=2, device="cpu")


def run_dtype(run: str) -> str:
    """``bf16_*`` runs load the (fp32) tiny model in bfloat16: rounding differences matter most there."""
    return "bfloat16" if run.startswith("bf16") else "auto"


def decoder_masks(model) -> dict[str, torch.Tensor]:
    """Zero masks of every decoder-block weight (fused experts included), read through ``onload``
    so a lazily loaded model's blocks are materialised."""
    from compresskit.models import get_adapter
    from compresskit.models.placement import onload

    adapter = get_adapter(model)
    masks = {}
    for i in range(adapter.num_blocks):
        with onload(adapter.blocks[i], "cpu") as block:
            for name, p in block.named_parameters():
                if p.dim() >= 2:
                    masks[f"{adapter.block_name(i)}.{name}"] = (p == 0).clone()
    return masks


def reduce_uneven_statistics(rank: int) -> dict[str, torch.Tensor]:
    """q/k share an input on both ranks; ``expert`` is reached only on rank 0, ``never`` on none."""
    from compresskit.engine.collect import InputStatsCollector
    from compresskit.pruning import HessianStat

    gen = torch.Generator().manual_seed(rank)
    modules = {name: torch.nn.Linear(6, 3) for name in ("q", "k", "expert", "never")}
    collector = InputStatsCollector(modules, lambda n, device: HessianStat(n))
    with collector:
        for _ in range(rank + 1):
            collector.new_batch(None)
            x = torch.randn(2, 5, 6, generator=gen)
            modules["q"](x), modules["k"](x)
            if rank == 0:
                modules["expert"](torch.randn(7, 6, generator=gen))
    collector.all_reduce()
    assert collector.stats["q"] is collector.stats["k"] and "never" not in collector.stats
    return {n: s.value() for n, s in collector.stats.items()} | {
        f"samples_{n}": torch.tensor(c) for n, c in collector.samples.items()}


def main(model_dir: str, moe_dir: str, calib: str, out_dir: str) -> None:
    import compresskit.methods.sparsify as sparsify

    out = Path(out_dir)
    rank = int(os.environ["RANK"])
    written: list[str] = []
    engine_samples: list[int] = []
    save = api.save_checkpoint
    runner = sparsify.SequentialRunner

    def recording_runner(adapter, input_ids, *args, **kwargs):
        engine_samples.append(int(input_ids.shape[0]))
        return runner(adapter, input_ids, *args, **kwargs)

    sparsify.SequentialRunner = recording_runner

    def counting_save(model, tokenizer, path, *args, **kwargs):
        written.append(str(path))
        return save(model, tokenizer, path, *args, **kwargs)

    api.save_checkpoint = counting_save
    hyper = {}
    for run, method in RUNS.items():
        model = moe_dir if run.startswith("moe") else model_dir
        outcome = api.prune(model, method, sparsity=0.5, calib=calib, out=out / run, dtype=run_dtype(run), **CALIB)
        torch.save(decoder_masks(outcome.model), out / f"masks_{run}_rank{rank}.pt")
        hyper[run] = outcome.manifest.hyperparameters
    (out / f"rank{rank}.json").write_text(json.dumps(
        {"written": written, "hyperparameters": hyper, "engine_samples": engine_samples}))
    torch.save(reduce_uneven_statistics(rank), out / f"stats_rank{rank}.pt")

    printed = io.StringIO()
    sys.argv = ["compresskit", "prune", "--model", model_dir, "--method", "wanda", "--sparsity", "0.5",
                "--calib", calib, "--nsamples", "8", "--seqlen", "32", "--batch-size", "2", "--device", "cpu",
                "--out", str(out / "cli"), "--json"]
    with redirect_stdout(printed):
        try:
            cli.main()
        except SystemExit as exc:
            assert exc.code in (0, None), exc.code
    (out / f"cli_rank{rank}.txt").write_text(printed.getvalue())
    assert not distributed.is_active()  # the CLI left the process group


if __name__ == "__main__":
    main(*sys.argv[1:])
