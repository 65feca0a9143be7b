"""Data-parallel calibration on CPU: wall time of 1 vs 2 gloo processes (torchrun) on a small model.

A random Llama-shaped model (bf16 weights drawn from a fixed seed, so every rank builds the same
one) is pruned with Wanda, SparseGPT and OWL on random calibration tokens, once by one process
and once by ``torchrun --nproc-per-node 2``. The CPU threads are split between the processes
(``OMP_NUM_THREADS = cores / processes``) so both runs use the same cores. Reported per method:
wall time of the method (model build and process start excluded), the speed-up, and the share of
mask entries identical to the single-process run.

    python benchmarks/distributed_cpu.py                      # prints the table, writes results/distributed_cpu.json
    python benchmarks/distributed_cpu.py --layers 8 --hidden 1024 --intermediate 2752 --nsamples 64
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
RESULTS = HERE / "results"
METHODS = ("wanda", "sparsegpt", "owl")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1376)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--processes", default="1,2")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads shared by the processes")
    ap.add_argument("--out", default=str(RESULTS / "distributed_cpu.json"))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: rank's result directory
    return ap.parse_args(argv)


def worker(args) -> None:
    """One rank: build the model, prune it with every method, record times and masks (rank 0)."""
    sys.path.insert(0, str(HERE))
    from speed_llama7b import random_llama

    from compresskit.api import build_job
    from compresskit.calibration import CalibrationData, CalibrationSpec
    from compresskit.engine import distributed
    from compresskit.methods import get_method

    distributed.init_from_env("cpu")
    args.device = "cpu"
    model = random_llama(args)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 32000, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))
    spec = CalibrationSpec(source="random", nsamples=args.nsamples, seqlen=args.seqlen)
    calib = CalibrationData(input_ids=ids, attention_mask=None, spec=spec, hash="random", source_info={})
    out = Path(args.worker)
    times = {}
    for method in METHODS:
        model.load_state_dict(state)
        job = build_job(model, device="cpu", sparsity=0.5, pruner="sparsegpt" if method == "sparsegpt" else "wanda",
                        batch_size=args.batch_size)
        job._calibration_data = calib
        entry = get_method(method)
        distributed.barrier()
        t0 = time.perf_counter()
        entry.run(job, entry.config_cls())
        distributed.barrier()
        times[method] = time.perf_counter() - t0
        if distributed.is_writer():
            masks = {n: (p == 0) for n, p in model.named_parameters() if p.dim() == 2 and ".layers." in n}
            torch.save(masks, out / f"masks_{method}.pt")
    if distributed.is_writer():
        (out / "times.json").write_text(json.dumps(times))
    distributed.shutdown()


def launch(args, processes: int, out: Path) -> dict:
    threads = max(1, args.threads // processes)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    forwarded = ["--layers", args.layers, "--hidden", args.hidden, "--intermediate", args.intermediate,
                 "--heads", args.heads, "--nsamples", args.nsamples, "--seqlen", args.seqlen,
                 "--batch-size", args.batch_size, "--worker", out]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
           str(Path(__file__).resolve()), *map(str, forwarded)]
    subprocess.run(cmd, env=env, check=True)
    return {"threads_per_process": threads, "times": json.loads((out / "times.json").read_text())}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    counts = [int(p) for p in args.processes.split(",")]
    runs, dirs = {}, {}
    with tempfile.TemporaryDirectory(prefix="dp-bench-") as tmp:
        for n in counts:
            dirs[n] = Path(tmp) / f"p{n}"
            dirs[n].mkdir()
            runs[n] = launch(args, n, dirs[n])
        base = counts[0]
        rows = []
        for method in METHODS:
            ref = torch.load(dirs[base] / f"masks_{method}.pt")
            row = {"method": method}
            for n in counts:
                masks = torch.load(dirs[n] / f"masks_{method}.pt")
                same = sum(int((masks[k] == ref[k]).sum()) for k in ref) / sum(v.numel() for v in ref.values())
                row[f"seconds_{n}"] = runs[n]["times"][method]
                row[f"mask_agreement_{n}"] = same
            rows.append(row)
    header = f"{'method':10s}" + "".join(f" {f'{n} proc s':>10s}" for n in counts)
    header += "".join(f" {f'x{n} speed-up':>12s} {f'{n}p masks =':>11s}" for n in counts[1:])
    print(header)
    for r in rows:
        line = f"{r['method']:10s}" + "".join(f" {r[f'seconds_{n}']:10.2f}" for n in counts)
        line += "".join(f" {r[f'seconds_{base}'] / r[f'seconds_{n}']:12.2f} {r[f'mask_agreement_{n}']:11.4%}"
                        for n in counts[1:])
        print(line)
    info = {"args": {k: v for k, v in vars(args).items() if k != "worker"}, "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "threads_per_process": {n: runs[n]["threads_per_process"] for n in counts},
            "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(info, indent=2))
    print(f"JSON: {args.out}")
    return info


if __name__ == "__main__":
    main()
