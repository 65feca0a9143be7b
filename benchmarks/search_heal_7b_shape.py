"""EvoPress and healing at a 7B layer shape, for the speed figures (random weights: speed only).

A Llama-2-7B-shaped model (hidden 4096, MLP 11008, 32 heads, vocabulary 32000) with ``--layers``
decoder blocks (default 4: the per-block costs scale linearly with the depth, and a full 7B level
database, ~7e9 weights x 9 levels x 2 bytes ≈ 113 GB, does not fit a 64 GB disk — the reference's
README warns of 100–200 GB) is written as a safetensors checkpoint with random bf16 weights, then:

* ``compresskit prune --method evopress --pruner wanda --sparsity 0.7 --schedule paper
  --generations G``: the level database build and G generations of the paper's schedule (64
  offspring, survivors 8 → 2 → 1 on 2,048 → 16,384 → 65,536 tokens); the per-generation time is
  extrapolated to the paper's 400 generations and to 32 blocks;
* ``compresskit heal`` of a Wanda-50 % copy, KD from the dense model, ``--train auto`` (every pruned
  linear, masks kept) and ``--train lora``: seconds per optimizer step and tokens per second.

Prints a table and writes JSON (``--out``). Run on the GPU machine with ``--device cuda``; the
same script at ``--hidden 64 --intermediate 128 --heads 4 --vocab 512 --layers 2 --seqlen 64``
is its CPU dry run. The calibration / training text is the package's demo excerpt, re-sampled
into a long word stream (speed only: the text does not matter).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def sh(args: list[str], log) -> float:
    t0 = time.perf_counter()
    print("$ " + " ".join(args), file=log, flush=True)
    proc = subprocess.run(args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seconds = time.perf_counter() - t0
    print(f"# rc={proc.returncode} {seconds:.1f}s", file=log, flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed (rc {proc.returncode}): {' '.join(args)}; see the log")
    return seconds


def make_model(directory: Path, args) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT))
    from tests.tiny_models import tiny_tokenizer

    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, num_hidden_layers=args.layers, vocab_size=args.vocab,
                         max_position_embeddings=max(4096, args.seqlen), torch_dtype="bfloat16")
    torch.manual_seed(0)
    device = args.device if args.device != "cpu" else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory, safe_serialization=True)
    tiny_tokenizer().save_pretrained(directory)
    del model


def make_text(path: Path, words: int) -> None:
    from compresskit.demo_data import __file__ as demo

    source = (Path(demo).parent / "moby_dick_excerpt.txt").read_text().split()
    rng = random.Random(0)
    lines, line = [], []
    for _ in range(words):
        line.append(rng.choice(source))
        if len(line) == 200:
            lines.append(" ".join(line))
            line = []
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--generations", type=int, default=3)
    ap.add_argument("--tokens", default="2048,16384,65536", help="EvoPress stage tokens (the paper's).")
    ap.add_argument("--heal-steps", type=int, default=6)
    ap.add_argument("--work", default="/tmp/ck7b")
    ap.add_argument("--out", default=str(HERE / "results" / "search_heal_7b_shape.json"))
    ap.add_argument("--skip", default="", help="comma list: evopress, heal, lora")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = open(out.with_suffix(".log"), "w")
    os.environ["COMPRESSKIT_CACHE_DIR"] = str(work / "cache")
    ck = [sys.executable, "-m", "compresskit"]
    result: dict = {"shape": {k: getattr(args, k) for k in ("hidden", "intermediate", "heads", "vocab", "layers",
                                                           "seqlen")}, "device": args.device}
    try:
        import torch

        if args.device.startswith("cuda"):
            result["gpu"] = torch.cuda.get_device_name(0)
        result["torch"] = torch.__version__
    except Exception as exc:  # noqa: BLE001
        result["gpu"] = repr(exc)

    dense = work / "dense"
    t0 = time.perf_counter()
    if not (dense / "config.json").exists():
        make_model(dense, args)
    result["make_model_s"] = round(time.perf_counter() - t0, 1)
    stage_tokens = [int(t) for t in args.tokens.split(",")]
    nsamples = max(1, -(-max(stage_tokens) // args.seqlen))
    text = work / "text.txt"
    make_text(text, words=int(max(stage_tokens) * 2.5 + args.heal_steps * 4 * args.seqlen * 3))
    calib = ["--calib", f"file:{text}", "--nsamples", str(nsamples), "--seqlen", str(args.seqlen)]

    def manifest(path: Path) -> dict:
        return json.loads((path / "compresskit.json").read_text())

    if "evopress" not in skip:
        evo = work / "evo70"
        wall = sh([*ck, "prune", "--model", str(dense), "--method", "evopress", "--pruner", "wanda", "--sparsity", "0.7",
                   "--schedule", "paper", "--generations", str(args.generations), "--tokens", args.tokens,
                   *calib, "--device", args.device, "--out", str(evo), "--force", "--quiet"], log)
        m = manifest(evo)
        details = m.get("method_details") or {}
        hist = details.get("fitness_history")
        result["evopress"] = {"wall_s": round(wall, 1), "timings": m.get("timings", {}), "history": hist,
                              "database": details.get("database"), "schedule": details.get("schedule"),
                              "block_runs": details.get("block_runs")}
        per_gen = None
        if hist:
            secs = [h.get("seconds") for h in hist if h.get("seconds") is not None]
            if secs:
                per_gen = sum(secs) / len(secs)
        result["evopress"]["seconds_per_generation"] = per_gen
        if per_gen:
            scale = 32 / args.layers
            result["evopress"]["paper_400_generations_32_blocks_h"] = round(per_gen * 400 * scale / 3600, 2)
        out.write_text(json.dumps(result, indent=1, default=str))

    if not {"heal", "lora"} <= skip:
        sparse = work / "wanda50"
        sh([*ck, "prune", "--model", str(dense), "--method", "wanda", "--sparsity", "0.5", "--calib", f"file:{text}",
            "--nsamples", "8", "--seqlen", str(args.seqlen), "--device", args.device, "--out", str(sparse), "--force",
            "--quiet"], log)
        for name, extra in (("heal", ["--train", "auto"]), ("lora", ["--train", "lora", "--merge"])):
            if name in skip:
                continue
            healed = work / f"healed-{name}"
            wall = sh([*ck, "heal", str(sparse), "--data", f"file:{text}", "--steps", str(args.heal_steps),
                       "--batch-size", "4", "--seqlen", str(args.seqlen), "--loss", "kd", *extra,
                       "--device", args.device, "--teacher", str(dense), "--save-every", "1000",
                       "--eval-every", "1000", "--out", str(healed), "--force", "--quiet"], log)
            m = manifest(healed)
            heal = m.get("method_details") or {}
            sps = heal.get("seconds_per_step")
            result[name] = {"wall_s": round(wall, 1), "seconds_per_step": sps,
                            "tokens_per_s": round(4 * args.seqlen / sps, 1) if sps else None,
                            "peak_memory": heal.get("peak_memory"), "timings": m.get("timings")}
            out.write_text(json.dumps(result, indent=1, default=str))
    out.write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps({k: v for k, v in result.items() if k != "evopress"} | {
        "evopress": {k: v for k, v in (result.get("evopress") or {}).items() if k != "history"}}, indent=1, default=str))


if __name__ == "__main__":
    main()
