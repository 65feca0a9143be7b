"""Pruning speed and peak GPU memory at Llama-2-7B shape (random weights, bf16), ours and the references'.

Targets (issue 11; one H100-class GPU, 128×2048 calibration tokens, excluding model load):
Wanda ≤ 20 s, OWL+Wanda ≤ 30 s, SparseGPT ≤ 60 s, AlphaPruning spectra of all 224 matrices ≤ 30 s,
WeLore SVDs ≤ 60 s, peak GPU memory ≤ 8 GB beyond the calibration activations. In the same run
the script times one plain dense forward of every block over all calibration tokens (the floor a
method that runs each block twice cannot beat by much) and the reference code on the same model
and tokens (locuslab/wanda ``prune_wanda``, luuyin/OWL ``prune_wanda_outlier``; fetch them as
benchmarks/reference_code.py says), and reports every method as a ratio of both. Our methods
keep the model on the CPU and move one block at a time to the GPU; the references need the whole
model on the GPU, which is counted in their peak.

    python benchmarks/speed_llama7b.py --reference-dir refs        # the whole table, < 10 min on one H100/H200
    python benchmarks/speed_llama7b.py --tiny                       # a smoke run anywhere (CPU shapes)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import os
import sys
import tempfile

from compresskit.api import build_job
from compresskit.calibration import CalibrationData, CalibrationSpec
from compresskit.engine.memory_plan import activation_bytes
from compresskit.methods import get_method

sys.path.insert(0, str(Path(__file__).parent))
import reference_code  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def random_llama(args) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=32000,
        max_position_embeddings=4096, torch_dtype="bfloat16",
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    where = torch.device(args.device)  # draw on the GPU when there is one: 7B normals take a minute on CPU
    gen = torch.Generator(device=where).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32, device=where).mul_(0.02).to(p.dtype))
            else:
                p.fill_(1.0)
        for name, buf in model.named_buffers():  # rotary inv_freq lives in a non-persistent buffer
            if "inv_freq" in name:
                dim = buf.numel() * 2
                buf.copy_(1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)))
    model.config.use_cache = False
    return model.eval()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_reset(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


TARGETS_S = {"wanda": 20, "owl": 30, "sparsegpt": 60, "alpha_spectra": 30, "welore": 60}
PEAK_TARGET_GB = 8.0  # beyond the activations, GB = 1e9 bytes
REFERENCE_OF = {"wanda": "ref_wanda", "owl": "ref_owl"}
OURS = ("forward", "wanda", "owl", "sparsegpt", "alpha_spectra", "welore")
TINY = dict(layers=2, hidden=64, intermediate=128, heads=4, nsamples=4, seqlen=32, batch_size=2)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    ap.add_argument("--methods", default=",".join([*OURS, "ref_wanda", "ref_owl"]))
    ap.add_argument("--reference-dir", default=None,
                    help="directory holding checkouts wanda/ and OWL/ (see benchmarks/reference_code.py)")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on CPU: checks the script, not a measurement")
    ap.add_argument("--out", default=None, help="JSON path [benchmarks/results/speed_llama7b(_tiny).json]")
    args = ap.parse_args(argv)
    if args.tiny:
        for key, value in TINY.items():
            setattr(args, key, value)
        args.device = args.device or "cpu"
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.out = args.out or str(RESULTS / ("speed_llama7b_tiny.json" if args.tiny else "speed_llama7b.json"))
    return args


def run_ours(name: str, job, ids, device, batch_size: int) -> None:
    if name == "forward":
        from compresskit.engine import SequentialRunner

        runner = SequentialRunner(job.adapter, ids, None, device=device, batch_size=batch_size)
        runner.run(lambda ctx: True)
        runner.release()
    elif name in ("wanda", "sparsegpt", "owl"):
        entry = get_method(name)
        entry.run(job, entry.config_cls())
    elif name == "alpha_spectra":  # singular values of every matrix + the Hill estimator per matrix
        from compresskit.methods.alphapruning import matrix_alphas

        matrix_alphas(job, "alpha_peak")
    elif name == "welore":  # singular values, the global-τ plan, and the rank-k SVD of every factorised matrix
        entry = get_method("welore")
        entry.run(job, entry.config_cls(rank_reduction=0.5, merge=True))
    else:
        raise ValueError(f"unknown method {name!r}; choose among {', '.join(OURS)}, ref_wanda, ref_owl")


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    t0 = time.perf_counter()
    model = random_llama(args)
    build_s = time.perf_counter() - t0
    ids = torch.randint(0, 32000, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))
    spec = CalibrationSpec(source="random", nsamples=args.nsamples, seqlen=args.seqlen)
    calib = CalibrationData(input_ids=ids, attention_mask=None, spec=spec, hash="random", source_info={})
    state = {k: v.clone() for k, v in model.state_dict().items()}
    activations = activation_bytes(args.nsamples, args.seqlen, args.hidden, 2)
    methods = [m for m in args.methods.split(",") if m]
    reference_note = reference_code.missing(args.reference_dir) if any(m.startswith("ref_") for m in methods) else None
    rows = []

    def job_for(name: str):
        job = build_job(model, tokenizer=None, device=device, sparsity=0.5,
                        pruner="sparsegpt" if name == "sparsegpt" else "wanda", batch_size=args.batch_size)
        job._calibration_data = calib
        return job

    for name in methods:
        if name.startswith("ref_") and reference_note:
            continue
        model.load_state_dict(state)
        if name.startswith("ref_"):
            model.to(device)  # the references keep the whole model on the GPU (not timed)
        else:
            model.to("cpu")
        peak_reset(device)
        os.environ["COMPRESSKIT_CACHE_DIR"] = tempfile.mkdtemp(prefix="speed-cache-")  # no spectra cache hits
        sync(device)
        t0 = time.perf_counter()
        if name.startswith("ref_"):
            reference_code.run_reference(args.reference_dir, name.removeprefix("ref_"), model, ids, device, 0.5)
        else:
            run_ours(name, job_for(name), ids, device, args.batch_size)
        sync(device)
        seconds = time.perf_counter() - t0
        peak_gib = peak(device)
        uses_activations = name not in ("alpha_spectra", "welore")
        beyond = None if peak_gib is None else peak_gib * 2**30 / 1e9 - (activations / 1e9 if uses_activations else 0)
        rows.append({"method": name, "seconds": seconds, "peak_gpu_gib": peak_gib, "peak_beyond_activations_gb": beyond,
                     "target_s": TARGETS_S.get(name)})
        print(f"{name:14s} {seconds:8.2f} s   peak GPU {peak_gib or 0:6.2f} GiB", flush=True)
    model.to("cpu")

    by_name = {r["method"]: r for r in rows}
    forward_s = by_name.get("forward", {}).get("seconds")
    for r in rows:
        r["x_forward"] = r["seconds"] / forward_s if forward_s else None
        ref = by_name.get(REFERENCE_OF.get(r["method"], ""))
        r["x_reference"] = r["seconds"] / ref["seconds"] if ref else None
        r["meets_target"] = None if r["target_s"] is None or device.type != "cuda" else r["seconds"] <= r["target_s"]
        if r["peak_beyond_activations_gb"] is not None and not r["method"].startswith("ref_"):
            r["meets_memory_target"] = r["peak_beyond_activations_gb"] <= PEAK_TARGET_GB
    print_table(rows)
    if reference_note:
        print(f"note: {reference_note}")
    info = {"args": vars(args), "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "model_build_s": build_s, "activation_bytes": activations,
            "reference_note": reference_note, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(info, indent=2))
    print(f"JSON: {args.out}")
    return info


def print_table(rows: list[dict]) -> None:
    def fmt(v, spec):
        return format(v, spec) if v is not None else "-".rjust(int(spec.rstrip("dfs").split(".")[0]))

    print(f"\n{'method':14s} {'seconds':>8s} {'target':>7s} {'x forward':>10s} {'x reference':>12s} "
          f"{'peak GiB':>9s} {'beyond act. GB':>15s}")
    for r in rows:
        print(f"{r['method']:14s} {r['seconds']:8.2f} {fmt(r['target_s'], '7d')} {fmt(r['x_forward'], '10.2f')} "
              f"{fmt(r['x_reference'], '12.2f')} {fmt(r['peak_gpu_gib'], '9.2f')} "
              f"{fmt(r['peak_beyond_activations_gb'], '15.2f')}")


if __name__ == "__main__":
    main()
