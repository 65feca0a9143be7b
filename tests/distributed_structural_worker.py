"""One rank of the structural data-parallel tests (tests/test_distributed.py), started by ``torchrun``.

    torchrun --standalone --nproc-per-node 2 tests/distributed_structural_worker.py LLAMA_DIR MOE_DIR CALIB OUT_DIR

Runs CD-MoE on ``MOE_DIR`` and FinerCut on ``LLAMA_DIR`` through ``compresskit.api.prune`` (no
output written) and saves what each rank decided and how many calibration samples its passes got
(``structural_rank<R>.json``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import compresskit.api as api
from compresskit.engine import replay as replay_module
from compresskit.moe import stats as moe_stats

CALIB = dict(nsamples=8, seqlen=32, seed=0, batch_size=2, device="cpu")
CDMOE = dict(experts=4, layers=2)
FINERCUT = dict(remove=0.5)


def run_cdmoe(moe_dir: str, calib: str) -> dict:
    outcome = api.prune(moe_dir, "cdmoe", calib=calib, method_options=CDMOE, **CALIB)
    return outcome.manifest.method_details["orders"]


def run_finercut(llama_dir: str, calib: str) -> dict:
    outcome = api.prune(llama_dir, "finercut", calib=calib, method_options=FINERCUT, **CALIB)
    details = outcome.manifest.method_details
    order = [{k: v for k, v in step.items() if k != "seconds"} for step in details["order"]]
    return {"order": order, "removed": details["removed"], "final_distance": details["final_distance"]}


def main(llama_dir: str, moe_dir: str, calib: str, out_dir: str) -> None:
    rank = int(os.environ["RANK"])
    samples: dict[str, list[int]] = {"replay": [], "expert_stats": []}
    capture, collect = replay_module.BlockReplay.capture, moe_stats.collect_expert_stats

    def counting_capture(self):
        samples["replay"].append(int(self.input_ids.shape[0]))
        return capture(self)

    def counting_collect(adapter, input_ids, *args, **kwargs):
        from compresskit.engine.distributed import batch_share

        samples["expert_stats"].append(len(range(input_ids.shape[0])[batch_share(input_ids.shape[0],
                                                                                   kwargs["batch_size"])]))
        return collect(adapter, input_ids, *args, **kwargs)

    replay_module.BlockReplay.capture = counting_capture
    import compresskit.moe.pipeline as pipeline

    pipeline.collect_expert_stats = counting_collect
    result = {"cdmoe": run_cdmoe(moe_dir, calib), "finercut": run_finercut(llama_dir, calib), "samples": samples}
    (Path(out_dir) / f"structural_rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])
