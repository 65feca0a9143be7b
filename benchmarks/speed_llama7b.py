"""Pruning speed and peak GPU memory at Llama-2-7B shape (random weights, bf16, model held on CPU).

Targets from the issues (an H100, 128×2048 calibration tokens, excluding model load):
Wanda ≤ 20 s, SparseGPT ≤ 60 s, OWL+Wanda ≤ 30 s, peak GPU memory ≤ 8 GB, AlphaPruning spectra of
all 224 matrices ≤ 30 s, WeLore spectra ≤ 60 s. As a same-run reference, the script also times one
plain dense forward of every block over all calibration tokens (the floor a sequential prune that
runs each block twice cannot beat by much) and reports every method as a ratio of it.

    python benchmarks/speed_llama7b.py                          # full 7B shape, needs a GPU
    python benchmarks/speed_llama7b.py --layers 2 --hidden 256 --intermediate 688 --heads 4 \\
        --nsamples 8 --seqlen 128 --device cpu                  # a smoke run anywhere
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from compresskit.api import build_job
from compresskit.calibration import CalibrationData, CalibrationSpec
from compresskit.methods import get_method

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
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(0.02).to(p.dtype))
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--methods", default="forward,wanda,sparsegpt,owl,alpha_spectra,welore_spectra")
    ap.add_argument("--out", default=str(RESULTS / "speed_llama7b.json"))
    args = ap.parse_args()
    device = torch.device(args.device)

    t0 = time.perf_counter()
    model = random_llama(args)
    load_s = time.perf_counter() - t0
    ids = torch.randint(0, 32000, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))
    spec = CalibrationSpec(source="random", nsamples=args.nsamples, seqlen=args.seqlen)
    calib = CalibrationData(input_ids=ids, attention_mask=None, spec=spec, hash="random", source_info={})
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rows = []

    def job_for(method_pruner: str):
        job = build_job(model, tokenizer=None, device=device, sparsity=0.5 if method_pruner != "owl" else 0.7,
                        pruner="wanda" if method_pruner in ("wanda", "owl") else method_pruner,
                        batch_size=args.batch_size)
        job._calibration_data = calib
        return job

    for name in args.methods.split(","):
        model.load_state_dict(state)
        peak_reset(device)
        sync(device)
        t0 = time.perf_counter()
        if name == "forward":
            from compresskit.engine import SequentialRunner

            job = job_for("wanda")
            runner = SequentialRunner(job.adapter, ids, None, device=device, batch_size=args.batch_size)
            runner.run(lambda ctx: True)
            runner.release()
        elif name in ("wanda", "sparsegpt", "owl"):
            entry = get_method(name)
            entry.run(job_for(name), entry.config_cls())
        elif name in ("alpha_spectra", "welore_spectra"):
            from compresskit.analysis.spectra import model_singular_values
            from compresskit.methods.sparsify import target_linears

            job = job_for("wanda")
            named = [(f"{i}.{k}", m.weight) for i in range(job.adapter.num_blocks) for k, m in target_linears(job, i).items()]
            model_singular_values(named, cache_key=None, device=device, progress=False)
        sync(device)
        seconds = time.perf_counter() - t0
        rows.append({"method": name, "seconds": seconds, "peak_gpu_gib": peak(device)})
        print(f"{name:16s} {seconds:8.2f} s   peak GPU {rows[-1]['peak_gpu_gib'] or 0:6.2f} GiB", flush=True)

    ref = next((r["seconds"] for r in rows if r["method"] == "forward"), None)
    print(f"\n{'method':16s} {'seconds':>9s} {'× forward':>10s} {'peak GiB':>9s}")
    for r in rows:
        ratio = f"{r['seconds'] / ref:10.2f}" if ref else " " * 10
        print(f"{r['method']:16s} {r['seconds']:9.2f} {ratio} {r['peak_gpu_gib'] or 0:9.2f}")
    info = {"args": vars(args), "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "model_build_s": load_s, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(info, indent=2))
    print(f"JSON: {args.out}")


if __name__ == "__main__":
    main()
