"""CPU decode tokens/s of the structural methods' outputs against the dense model, interleaved.

Decode speed on a shared CPU drifts with everything else the machine runs, so the dense and the
compressed models are measured in the same process, round-robin (dense, A, B, dense, A, B, ...),
and each is reported as the median over rounds and as a ratio to the dense median. Speed depends
on the shape of the result, not on which experts or sublayers were chosen:

* FinerCut: the greedy orders recorded by ``benchmarks/finercut.py`` (results/finercut*.json),
  applied in memory (``depth.removal.remove_sublayer``: the removed sublayer is gone, as in the
  checkpoint ``compresskit.load`` rebuilds); whole-block removal via ``depth.blocks.delete_blocks``.
* CD-MoE E(S+k) at L layers and REAP: a prune with a small calibration (4 × 64 SOTU tokens; the
  search only decides *which* experts, not how many), saved and reloaded with ``compresskit.load``.

    python benchmarks/decode_cpu.py                       # writes results/decode_cpu.json
    python benchmarks/decode_cpu.py --rounds 2 --new-tokens 8 --models deepseek-v2-moe-25m
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))

from compresskit import api  # noqa: E402
from compresskit.depth.blocks import delete_blocks  # noqa: E402
from compresskit.depth.removal import remove_sublayer  # noqa: E402
from compresskit.evaluation.efficiency import measure_throughput  # noqa: E402
from compresskit.models import get_adapter, load_model  # noqa: E402
from compresskit.paths import shared_data_dir, shared_models_dir  # noqa: E402

MOE = ("deepseek-v2-moe-25m", "qwen2-moe-26m")


def _path(name: str) -> str:
    return name if name == "smollm2-135m" else str(shared_models_dir() / name)


def _fresh(name: str):
    model, tok = load_model(_path(name), dtype="float32", device="cpu")
    return model.eval(), tok


def _finercut_record(name: str) -> dict | None:
    for f in (HERE / "results" / "finercut.json", HERE / "results" / "finercut_smollm2.json"):
        if f.is_file():
            for rec in json.loads(f.read_text()):
                if rec["model"] == name:
                    return rec
    return None


def _variants(name: str, args, tmp: str) -> dict:
    variants = {"dense": _fresh(name)[0]}
    rec = _finercut_record(name)
    if rec is not None:
        order = rec["sublayer_search"]["order"]
        row = max(rec["rows"], key=lambda r: r["ratio"])
        m, _ = _fresh(name)
        adapter = get_adapter(m)
        for kind, block in order[: row["sublayers"]]:
            remove_sublayer(adapter, block, "attn" if kind == "attn" else "mlp")
        variants[f"finercut {row['ratio']:.0%} ({row['sublayers']} sublayers)"] = m
        m, _ = _fresh(name)
        delete_blocks(get_adapter(m), set(rec["block_search"]["order"][: row["block_blocks"]]))
        variants[f"block removal ({row['block_blocks']} blocks)"] = m
    if name in MOE:
        calib = f"file:{shared_data_dir() / 'corpora' / 'sotu.jsonl'}"
        for label, method, options in (
            (f"cdmoe E(S+{args.experts}) L={args.layers}", "cdmoe", {"experts": args.experts, "layers": args.layers}),
            ("reap -25% experts", "reap", {"remove_experts": 0.25}),
        ):
            out = Path(tmp) / f"{name}-{method}"
            api.prune(_path(name), method, calib=calib, nsamples=4, seqlen=64, device="cpu", out=out,
                      method_options=options)
            variants[label] = api.load(out, dtype=torch.float32).eval()  # the dense rows are float32 too
    return variants


def run(name: str, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        variants = _variants(name, args, tmp)
        _, tok = _fresh(name)
        samples: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(args.rounds):
            for label, model in variants.items():
                r = measure_throughput(model, tok, prompt_len=args.prompt_len, new_tokens=args.new_tokens)
                samples[label].append(r["decode_tokens_per_s"])
        dense = statistics.median(samples["dense"])
        rows = [{"variant": k, "decode_tok_s_median": statistics.median(v), "ratio_to_dense": statistics.median(v) / dense,
                 "samples": v, "params": sum(p.numel() for p in variants[k].parameters())} for k, v in samples.items()]
    for r in rows:
        print(f"{name:<22} {r['variant']:<34} {r['params']:>12,} params  {r['decode_tok_s_median']:7.1f} tok/s  "
              f"x{r['ratio_to_dense']:.2f}", flush=True)
    return {"model": name, "rows": rows}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=[*MOE, "smollm2-135m"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "decode_cpu.json")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    result = {"settings": {k: str(v) for k, v in vars(args).items()}, "torch_threads": torch.get_num_threads(),
              "load_average_start": list(os.getloadavg()), "models": []}
    for name in args.models:
        result["models"].append(run(name, args))
    result["load_average_end"] = list(os.getloadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
