"""EvoPress under torchrun: 2 gloo ranks split the offspring and take the single process's decisions.

The test starts this file as the worker (``torchrun --nproc-per-node 2 tests/test_evopress_distributed.py ...``);
each rank runs the search (no output written), counts the candidates it scored itself and saves its
decisions; the test compares them with one process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

OPTIONS = {"generations": 3, "offspring": 5, "tokens": "32,128", "survivors": "2,1", "seed_from": "uniform,owl"}
CALIB = dict(nsamples=8, seqlen=32, seed=0, batch_size=2, device="cpu")


def run_search(model_dir: str, calib: str) -> tuple[dict, int]:
    import compresskit.api as api
    from compresskit.search import fitness as fitness_module

    scored = [0]
    original = fitness_module.KLFitness._score_all

    def counting(self, batch, candidates, mine, parent):
        scored[0] += len(mine)  # the candidates this rank scores itself
        return original(self, batch, candidates, mine, parent)

    fitness_module.KLFitness._score_all = counting
    try:
        outcome = api.prune(model_dir, "evopress", sparsity=0.5, pruner="wanda", calib=calib,
                            method_options=OPTIONS, **CALIB)
    finally:
        fitness_module.KLFitness._score_all = original
    d = outcome.manifest.method_details
    record = {"levels": d["levels_per_matrix"], "history": [h["best_fitness"] for h in d["fitness_history"]],
              "seed_fitness": d["seed_fitness"], "pool_fitness": d["pool_fitness"], "choice": d["final_choice"],
              "database": d["database"]["key"]}
    return record, scored[0]


def test_two_ranks_split_offspring_and_agree_with_one_process(tiny_model_dir, sotu_jsonl, tmp_path):
    import torch

    llama = tiny_model_dir("llama")
    calib = f"file:{sotu_jsonl}"
    out = tmp_path / "ranks"
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), *sys.path]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__,
           str(llama), calib, str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single, scored_single = run_search(str(llama), calib)
    finally:
        torch.set_num_threads(threads)
    for r in ranks:
        assert r["record"] == single  # the same decisions, fitness values and database on every rank
    # every candidate was scored by exactly one rank, and both ranks had work
    assert ranks[0]["scored"] + ranks[1]["scored"] == scored_single
    assert ranks[0]["scored"] > 0 and ranks[1]["scored"] > 0


if __name__ == "__main__":
    from compresskit.engine import distributed

    model_dir, calib, out_dir = sys.argv[1:4]
    record, scored = run_search(model_dir, calib)
    rank = distributed.rank()
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps({"record": record, "scored": scored}))
    distributed.shutdown()
