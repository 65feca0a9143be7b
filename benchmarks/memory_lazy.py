"""Peak host RSS and wall time of ``compresskit prune`` against model depth: lazy vs in-memory loading.

Random Llama-shaped models with one block shape and 4 depths are written as safetensors into a
temporary directory (default: hidden 1024, intermediate 2816, fp32, vocab 8192 — one block is
51.4 MB, the embeddings + head 64 MB). Each run is the real CLI, ``compresskit prune --method M
--sparsity 0.5 --load lazy|in-memory`` (tiny calibration file, CPU), in a fresh wrapper process
that reports its child's peak RSS from the kernel (``getrusage(RUSAGE_CHILDREN).ru_maxrss``: the
high-water mark, no sampling gaps, the wrapper's own memory not included).

    python benchmarks/memory_lazy.py [--blocks 4 8 12 16] [--hidden 1024] [--methods wanda sparsegpt]

Prints a table and writes ``benchmarks/results/memory_lazy.json``. The lazy figure stays flat in
depth (interpreter + embeddings/head + about two blocks: the block being worked on and the
pristine read kept since materialise, which ``release`` compares it with), the in-memory one grows by the size of every added block.
Peak RSS does not depend on machine load; wall time does (the figures say how loaded it was).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs argv[1:] as a child and prints the child's peak RSS in KiB (Linux reports ru_maxrss in KiB).
WRAPPER = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")


def make_model(directory: Path, blocks: int, hidden: int = 1024, intermediate: int = 2816,
               dtype: str = "float32", vocab: int = 8192) -> float:
    """A random Llama of ``blocks`` blocks saved in ``directory``; returns one block's size in MB."""
    import torch
    import transformers

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import tiny_tokenizer

    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                                      num_hidden_layers=blocks, num_attention_heads=hidden // 64,
                                      num_key_value_heads=hidden // 64, max_position_embeddings=256,
                                      pad_token_id=0, bos_token_id=0, eos_token_id=0, tie_word_embeddings=False,
                                      dtype=dtype)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(getattr(torch, dtype))
    generator = torch.Generator().manual_seed(blocks)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=generator)
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    block = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    del model
    return block / 1e6


def disk_mb(directory: Path) -> float:
    return sum(f.stat().st_size for f in directory.glob("*.safetensors")) / 1e6


def write_calibration(path: Path) -> Path:
    path.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog, "
                                f"counting {i * 13} sheep, again and again." * 4 for i in range(8)))
    return path


def run(model_dir: Path, out: Path, calib: Path, load: str, method: str = "wanda",
        extra_env: dict | None = None) -> dict:
    """One ``compresskit prune`` in a fresh process: peak RSS (MB), wall time, the manifest's facts."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), TQDM_DISABLE="1", **(extra_env or {}))
    cli = [sys.executable, "-m", "compresskit", "prune", "--model", str(model_dir), "--method", method,
           "--sparsity", "0.5", "--calib", f"file:{calib}", "--nsamples", "2", "--seqlen", "32",
           "--device", "cpu", "--load", load, "--out", str(out), "--force", "--quiet"]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *cli], capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{load} {method} run failed:\n{proc.stderr[-3000:]}")
    manifest = json.loads((out / "compresskit.json").read_text())
    return {"peak_rss_mb": int(proc.stdout.strip().splitlines()[-1]) * 1024 / 1e6, "wall_s": round(wall, 1),
            "loading": manifest["hyperparameters"]["loading"], "sparsity": manifest["sparsity"]["overall"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, nargs="+", default=[4, 8, 12, 16])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"])
    parser.add_argument("--tmp", default=None, help="where the models are written (default: TMPDIR)")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "memory_lazy.json"))
    args = parser.parse_args()
    rows = []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="ck-memory-", dir=args.tmp) as tmp:
        tmp = Path(tmp)
        calib = write_calibration(tmp / "calib.txt")
        for blocks in args.blocks:
            model_dir = tmp / f"llama-{blocks}"
            block_mb = make_model(model_dir, blocks, args.hidden, args.intermediate, args.dtype)
            size = disk_mb(model_dir)
            for method in args.methods:
                for load in ("in-memory", "lazy"):
                    result = run(model_dir, tmp / f"out-{blocks}-{method}-{load}", calib, load, method)
                    rows.append({"blocks": blocks, "hidden": args.hidden, "intermediate": args.intermediate,
                                 "dtype": args.dtype, "block_mb": round(block_mb, 1), "model_mb": round(size, 1),
                                 "method": method, "load": load, **result})
                    print(f"{blocks:>3} blocks {size:7.1f} MB on disk  {method:<9} {load:<9}  "
                          f"peak RSS {result['peak_rss_mb']:7.1f} MB  wall {result['wall_s']:6.1f} s", flush=True)
            for out in tmp.glob(f"out-{blocks}-*"):
                shutil.rmtree(out)
            shutil.rmtree(model_dir)
    print()
    print("| method | blocks | model MB (disk) | block MB | in-memory peak RSS MB | lazy peak RSS MB | in-memory s | lazy s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for method in args.methods:
        for blocks in args.blocks:
            mem = next(r for r in rows if r["blocks"] == blocks and r["method"] == method and r["load"] == "in-memory")
            lazy = next(r for r in rows if r["blocks"] == blocks and r["method"] == method and r["load"] == "lazy")
            print(f"| {method} | {blocks} | {mem['model_mb']:.0f} | {mem['block_mb']:.1f} | {mem['peak_rss_mb']:.0f} | "
                  f"{lazy['peak_rss_mb']:.0f} | {mem['wall_s']:.1f} | {lazy['wall_s']:.1f} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    record = {"command": "python benchmarks/memory_lazy.py " + " ".join(sys.argv[1:]), "rows": rows,
              "cpu_count": os.cpu_count(), "load_average_before": load_before, "load_average_after": os.getloadavg()[0],
              "note": "peak RSS is the kernel's high-water mark of the prune process (MB = 1e6 bytes); it does not "
                      "depend on machine load, wall time does"}
    Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
