"""WeLore on the real SmolLM2-135M: quality and size at 10-50 % rank reduction, then LRC-only fine-tuning.

Three parts, each row written to the JSON as soon as it is measured:

1. truncated   every targeted matrix replaced by its rank-k SVD truncation at the *planned* rank
               (WeLore's global τ vs the same fraction removed from every matrix): the paper's
               Table-1 comparison (the reference's rank-reduction script, --min_ratio 0). Shows which
               allocation keeps quality; it saves no memory by itself.
2. shipped     ``compresskit.prune(--method welore [--welore-uniform] --min-ratio R)``: only matrices
               losing more than R of their rank *and* below the parameter break-even k(m+n) < mn are
               factorised. Reports applied rank / parameter reduction, tensor bytes, and ppl. A uniform
               reduction of at most 50 % never passes the break-even on square matrices, so the uniform
               baseline often has nothing to factorise there: recorded as such.
3. finetune    the shipped WeLore checkpoint at --ft-reduction fine-tuned on SOTU + Moby Dick (not on
               WikiText) with only the low-rank factors trainable; WikiText-2 ppl before/after, trainable
               parameters and peak memory, and a full fine-tune (every parameter) of the dense model for
               the same steps, data and learning rate, for memory, time and ppl.

Perplexity: WikiText-2 test, non-overlapping windows of --eval-seqlen tokens, first --eval-windows windows
only (a CPU is slow); the count is recorded. Peak memory on CPU is the resident-set high-water mark reset
before each training run (``increase`` = peak − RSS at the start of training).

    python benchmarks/welore_smollm2.py --eval-windows 4 --ft-steps 30 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path

import torch

import compresskit
from compresskit.analysis.spectra import model_singular_values, weights_fingerprint
from compresskit.errors import InputError
from compresskit.evaluation.sparsity import count_parameters
from compresskit.evaluation.perplexity import perplexity_tokens, windowed_perplexity
from compresskit.heal.finetune import FinetuneSettings, finetune, train_loop, training_windows
from compresskit.lowrank import LowRankLinear, find_global_tau, ranks_pruned
from compresskit.lowrank.plan import uniform_pruned
from compresskit.models import get_adapter, load_model
from compresskit.paths import shared_data_dir
from compresskit.heal.state import PeakMemory, training_memory_bytes

RESULTS = Path(__file__).parent / "results"


def _fmt(value, spec: str) -> str:
    width = int(spec.split(".")[0].split(",")[0])
    return " " * width if value is None else format(value, spec)


def _mib(n: int) -> float:
    return n / 2**20


def tensor_bytes(model) -> int:
    """Bytes of every distinct parameter and persistent buffer (what safetensors stores, tied once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def decoder_linears(model) -> dict[str, torch.nn.Linear]:
    adapter = get_adapter(model)
    return {f"{adapter.block_name(i)}.{local}": m for i in range(adapter.num_blocks)
            for local, m in adapter.prunable_linears(i).items()}


@torch.no_grad()
def truncate_all(model, rank_reduction: float, uniform: bool) -> dict:
    """Every decoder linear ← its rank-k truncation at the planned rank (no LRC rule, no saving)."""
    linears = decoder_linears(model)
    named = [(n, m.weight.detach()) for n, m in linears.items()]
    spectra = model_singular_values(named, cache_key=weights_fingerprint(named), progress=False)
    tau = None if uniform else find_global_tau(spectra, rank_reduction)
    pruned_total = 0
    for name, linear in linears.items():
        full = min(linear.weight.shape)
        pruned = uniform_pruned(full, rank_reduction) if uniform else ranks_pruned(spectra[name], tau)
        pruned_total += pruned
        if pruned:
            linear.weight.copy_(LowRankLinear.from_linear(linear, full - pruned).merged_weight())
    return {"tau": tau, "planned_rank_reduction": pruned_total / sum(min(m.weight.shape) for m in linears.values())}


def ppl(model, ids, args) -> dict:
    model.eval()
    r = windowed_perplexity(model, ids, args.eval_seqlen, max_windows=args.eval_windows, device="cpu")
    return {"ppl": r["value"], "eval_windows": r["n_windows"], "eval_tokens": r["tokens"], "eval_s": r["seconds"]}


def full_finetune_dense(dense, tok, settings: FinetuneSettings) -> dict:
    """Every parameter of the dense model trainable, same data / schedule / precision as finetune()."""
    model = copy.deepcopy(dense).float()
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    model.config.use_cache = False
    model.train()
    ids, mask, _ = training_windows(settings, tok)
    memory = PeakMemory(torch.device("cpu"))
    memory.start()
    t0 = time.perf_counter()
    _, losses = train_loop(model, params, ids, mask, settings, torch.device("cpu"))
    seconds = time.perf_counter() - t0
    peak = memory.stop()
    n = sum(p.numel() for p in params)
    for p in params:
        p.requires_grad_(False)
    return {"model": model, "trainable_params": n, "peak_memory": peak, "seconds_per_step": seconds / settings.steps,
            "losses": losses, "memory_estimate_bytes": training_memory_bytes(n)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--reductions", default="0.1,0.2,0.3,0.4,0.5")
    ap.add_argument("--min-ratio", type=float, default=0.5)
    ap.add_argument("--eval-seqlen", type=int, default=2048)
    ap.add_argument("--eval-windows", type=int, default=8, help="first K windows of WikiText-2 test")
    ap.add_argument("--ft-reduction", type=float, default=0.5)
    ap.add_argument("--ft-steps", type=int, default=30)
    ap.add_argument("--ft-batch", type=int, default=2)
    ap.add_argument("--ft-seqlen", type=int, default=256)
    ap.add_argument("--ft-lr", type=float, default=2e-4)
    ap.add_argument("--ft-warmup", type=int, default=3)
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: truncated,shipped,finetune,full")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--out", default=str(RESULTS / "welore_smollm2.json"))
    ap.add_argument("--fresh", action="store_true", help="discard rows of an earlier run in --out")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    corpora = shared_data_dir() / "corpora"
    data = (f"file:{corpora / 'sotu.jsonl'}", f"file:{corpora / 'moby_dick.txt'}")
    record = {"model": args.model, "args": vars(args), "torch_threads": torch.get_num_threads(),
              "cpu_count": os.cpu_count(), "rows": []}
    if out.exists() and not args.fresh:  # rows already measured (same --eval-windows) are kept, not redone
        previous = json.loads(out.read_text())
        record["rows"] = [r for r in previous["rows"] if r.get("eval_windows") in (None, args.eval_windows)]
    done = {r["label"] for r in record["rows"]}

    def write(row: dict) -> None:
        row["run_args"] = dict(vars(args))
        record["rows"].append(row)
        out.write_text(json.dumps(record, indent=2, default=str))
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                 if k in ("part", "label", "ppl", "planned_rank_reduction", "applied_rank_reduction",
                          "applied_param_reduction", "params", "tensor_mib", "note")}
        print(json.dumps(shown), flush=True)

    dense, tok = load_model(args.model, dtype="float32")
    dense.eval()
    ids, info = perplexity_tokens(tok, "wikitext2", args.eval_seqlen)
    record["wikitext2"] = info
    dense_params = count_parameters(dense)
    dense_bytes = tensor_bytes(dense)
    if "dense" in done:
        base = next(r for r in record["rows"] if r["label"] == "dense")
    else:
        base = ppl(dense, ids, args)
        write({"part": "dense", "label": "dense", **base, "params": dense_params, "tensor_mib": _mib(dense_bytes)})
    reductions = [float(r) for r in args.reductions.split(",")]

    if "truncated" not in skip:
        for r in reductions:
            for uniform in (False, True):
                label = f"{'uniform' if uniform else 'welore'} {r:.0%} (all truncated)"
                if label in done:
                    continue
                model = copy.deepcopy(dense)
                plan = truncate_all(model, r, uniform)
                write({"part": "truncated", "label": label, "rank_reduction": r, **plan, **ppl(model, ids, args)})
                del model

    if "shipped" not in skip:
        for r in reductions:
            for uniform in (False, True):
                label = f"{'uniform' if uniform else 'welore'} {r:.0%} (min-ratio {args.min_ratio:g})"
                if label in done:
                    continue
                model = copy.deepcopy(dense)
                try:
                    outcome = compresskit.prune(model, "welore", tokenizer=tok, device="cpu", method_options={
                        "rank_reduction": r, "min_ratio": args.min_ratio, "uniform": uniform})
                except InputError as exc:
                    write({"part": "shipped", "label": label, "rank_reduction": r, "note": str(exc)})
                    continue
                d = outcome.manifest.method_details
                write({"part": "shipped", "label": label, "rank_reduction": r, "tau": d["tau"],
                       "planned_rank_reduction": d["planned_rank_reduction"],
                       "applied_rank_reduction": d["applied_rank_reduction"],
                       "applied_param_reduction": d["applied_param_reduction"],
                       "lowrank_matrices": len(d["rank_map"]), "params": outcome.manifest.parameters["total_after"],
                       "model_param_reduction": 1 - outcome.manifest.parameters["total_after"] / dense_params,
                       "tensor_mib": _mib(tensor_bytes(model)),
                       "tensor_reduction": 1 - tensor_bytes(model) / dense_bytes, **ppl(model, ids, args)})
                del model, outcome

    ft_label = f"welore {args.ft_reduction:.0%} LRC-only fine-tune ({args.ft_steps} steps, lr {args.ft_lr:g})"
    if "finetune" not in skip and ft_label not in done:
        settings = FinetuneSettings(data=data, steps=args.ft_steps, lr=args.ft_lr, batch_size=args.ft_batch,
                                    seqlen=args.ft_seqlen, warmup=args.ft_warmup, save_every=max(1, args.ft_steps))
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            tmp = Path(tmp)
            dense.save_pretrained(tmp / "dense")
            compresskit.prune(copy.deepcopy(dense), "welore", tokenizer=tok, device="cpu", out=tmp / "welore",
                              method_options={"rank_reduction": args.ft_reduction, "min_ratio": args.min_ratio})
            before = ppl(compresskit.load(tmp / "welore"), ids, args)
            write({"part": "finetune", "label": f"welore {args.ft_reduction:.0%} before fine-tune ({args.ft_steps} steps)", **before,
                   "disk_mib": _mib(dir_bytes(tmp / "welore")), "dense_disk_mib": _mib(dir_bytes(tmp / "dense"))})
            outcome = finetune(tmp / "welore", tmp / "welore-ft", settings, device="cpu", compare_full=True,
                               compare_steps=min(3, args.ft_steps))
            d = outcome.manifest.method_details
            after = ppl(compresskit.load(tmp / "welore-ft", dtype=torch.float32), ids, args)
            write({"part": "finetune", "label": ft_label, **after,
                   "steps": args.ft_steps, "trainable_params": d["trainable_params"], "total_params": d["total_params"],
                   "peak_memory": d["peak_memory"], "seconds_per_step": d["seconds_per_step"],
                   "memory_estimate_bytes": d["memory_estimate_bytes"], "losses": d["losses"],
                   "full_finetune_of_compressed": d["full_finetune_comparison"],
                   "training_data": [str(s) for s in data]})
        if "full" not in skip:
            full = full_finetune_dense(dense, tok, settings)
            write({"part": "finetune", "label": f"dense full fine-tune ({args.ft_steps} steps, lr {args.ft_lr:g})",
                   **ppl(full.pop("model"), ids, args),
                   "steps": args.ft_steps, **full})

    print()
    print(f"{'config':42s} {'ppl':>9s} {'rank red.':>9s} {'param red.':>10s} {'tensors MiB':>11s}")
    for r in record["rows"]:
        if r["part"] == "finetune":
            continue
        rank_red = r.get("applied_rank_reduction", r.get("planned_rank_reduction"))
        cells = [_fmt(r.get("ppl"), "9.2f"), _fmt(rank_red, "9.3f"), _fmt(r.get("model_param_reduction"), "10.3f"),
                 _fmt(r.get("tensor_mib"), "11.1f")]
        print(f"{r['label']:42s} " + " ".join(cells) + (f"  ({r['note']})" if r.get("note") else ""))
    ft = [r for r in record["rows"] if r["part"] == "finetune"]
    if ft:
        print(f"\n{'fine-tune':52s} {'ppl':>9s} {'trainable':>12s} {'peak RSS MiB':>12s} {'+RSS MiB':>9s} {'s/step':>7s}")
        for r in ft:
            peak = r.get("peak_memory") or {}
            mib = {k: _mib(peak[k]) if k in peak else None for k in ("peak_bytes", "increase_bytes")}
            print(f"{r['label']:52s} {r['ppl']:9.2f} {_fmt(r.get('trainable_params'), '12,d')} "
                  f"{_fmt(mib['peak_bytes'], '12.1f')} {_fmt(mib['increase_bytes'], '9.1f')} "
                  f"{_fmt(r.get('seconds_per_step'), '7.2f')}")
    print(f"\nppl: first {base['eval_windows']} windows × {args.eval_seqlen} tokens of WikiText-2 test ({info['join']}); "
          f"fine-tune data: SOTU + Moby Dick, {args.ft_steps} steps × {args.ft_batch} × {args.ft_seqlen} tokens, "
          f"lr {args.ft_lr:g}; JSON: {out}")


if __name__ == "__main__":
    main()
