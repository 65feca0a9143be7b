"""Peak host RSS and wall time of ``compresskit prune`` against model size: lazy vs in-memory loading.

Random Llama-shaped models of 4 sizes (same block shape, more blocks) are written as safetensors
into a temporary directory; each run is a fresh subprocess that prunes with Wanda 50 % (tiny
calibration set, CPU) and saves a checkpoint, and reports its own peak RSS (``ru_maxrss``):

* ``lazy``: ``compresskit.prune(path, ...)`` — blocks stay on disk, read through ``onload``;
* ``in-memory``: ``from_pretrained`` first, then ``compresskit.prune(model, ...)``.

    python benchmarks/memory_lazy.py [--blocks 4 8 16 32] [--hidden 768] [--json benchmarks/results/memory_lazy.json]

Prints a table and writes JSON. The lazy figure should stay flat (≈ one block + embeddings/head +
the interpreter), the in-memory one grows with the model.
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

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
import compresskit
path, out, calib, mode = sys.argv[1:5]
t0 = time.perf_counter()
if mode == "lazy":
    model, tok = path, None
else:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model, tok = AutoModelForCausalLM.from_pretrained(path, dtype="auto"), AutoTokenizer.from_pretrained(path)
outcome = compresskit.prune(model, "wanda", sparsity=0.5, calib="file:" + calib, nsamples=2, seqlen=32,
                            device="cpu", tokenizer=tok, out=out, force=True)
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "wall_s": time.perf_counter() - t0,
                  "loading": outcome.manifest.hyperparameters.get("loading"),
                  "sparsity": outcome.manifest.sparsity["overall"]}))
"""


def make_model(directory: Path, blocks: int, hidden: int, vocab: int = 8192) -> float:
    """A random Llama of ``blocks`` blocks saved in ``directory``; returns one block's size in MB."""
    import torch
    import transformers

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import tiny_tokenizer

    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden,
                                      num_hidden_layers=blocks, num_attention_heads=hidden // 64,
                                      num_key_value_heads=hidden // 64, max_position_embeddings=256,
                                      pad_token_id=0, bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(directory, max_shard_size="100MB")
    tiny_tokenizer().save_pretrained(directory)
    block = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    return block / 2**20


def write_calibration(path: Path) -> Path:
    path.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog, "
                                f"counting {i * 13} sheep, again and again." * 4 for i in range(8)))
    return path


def run(path: Path, out: Path, calib: Path, mode: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TQDM_DISABLE="1")
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path), str(out), str(calib), mode],
                          capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "memory_lazy.json"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="ck-memory-") as tmp:
        tmp = Path(tmp)
        calib = write_calibration(tmp / "calib.txt")
        for blocks in args.blocks:
            model_dir = tmp / f"llama-{blocks}"
            block_mb = make_model(model_dir, blocks, args.hidden)
            disk_mb = sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 2**20
            for mode in ("in-memory", "lazy"):
                t0 = time.perf_counter()
                result = run(model_dir, tmp / f"out-{blocks}-{mode}", calib, mode)
                rows.append({"blocks": blocks, "hidden": args.hidden, "block_mb": round(block_mb, 1),
                             "model_mb": round(disk_mb, 1), "mode": mode, **result,
                             "process_s": time.perf_counter() - t0})
                print(f"{blocks:>3} blocks  {disk_mb:7.1f} MB on disk  {mode:<9}  peak RSS {result['peak_rss_mb']:7.1f} MB"
                      f"  wall {result['wall_s']:6.1f} s", flush=True)
    print()
    print(f"| blocks | model MB | block MB | in-memory peak RSS MB | lazy peak RSS MB | in-memory s | lazy s |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for blocks in args.blocks:
        mem = next(r for r in rows if r["blocks"] == blocks and r["mode"] == "in-memory")
        lazy = next(r for r in rows if r["blocks"] == blocks and r["mode"] == "lazy")
        print(f"| {blocks} | {mem['model_mb']:.0f} | {mem['block_mb']:.1f} | {mem['peak_rss_mb']:.0f} | "
              f"{lazy['peak_rss_mb']:.0f} | {mem['wall_s']:.1f} | {lazy['wall_s']:.1f} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"rows": rows, "cpu_count": os.cpu_count()}, indent=2) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
