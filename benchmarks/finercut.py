"""FinerCut on real small models (CPU): sublayer removal vs whole-block removal at equal parameters.

For SmolLM2-135M and the two shared MoE fixtures (deepseek-v2-moe-25m, qwen2-moe-26m):

* one greedy sublayer search (JS, code form, float32) to the largest ratio; because the greedy
  order is re-scored after each removal, the first int(2L·r) removals are the result at every
  smaller ratio r, so one search gives every row;
* one greedy block search (``--level block``) to the parameter fraction of the largest ratio;
  for each ratio the block model removes blocks until it has removed at least as many
  parameters as the sublayer model;
* held-out perplexity (SmolLM2: local WikiText-2 test, the perplexity module's protocol; MoE
  fixtures: their README's validation text — last 10 State of the Union addresses, last 5% of
  Moby Dick, last 300 GSM8K train items — tokenized with their own tokenizer) and local PIQA
  accuracy (compresskit/evaluation/tasks/piqa_local.yaml, first ``--piqa-limit`` items);
* time per greedy step with and without the prefix cache (one step each), decode tokens/s of the
  dense and the 25% model on CPU (``evaluation.efficiency.measure_throughput``).

Settings are reduced for a shared 2-core CPU and printed with the table; see --help.

    python benchmarks/finercut.py [--models smollm2-135m,deepseek-v2-moe-25m,qwen2-moe-26m]
    python benchmarks/finercut.py --models smollm2-135m --protocols cross,sotu,wikitext   # issue 21's rows

``--protocols`` picks the calibration -> evaluation domains (``PROTOCOLS``): ``cross`` (the original
row: speeches -> WikiText-2 / the fixtures' mixed held-out text), ``sotu`` (addresses up to 2011 ->
the held-out 2012-2021 addresses) and ``wikitext`` (the first half of WikiText-2 test -> its second
half; WikiText-2 train is not available offline). Every record states its protocol and the hash of
its calibration samples (``settings.calib_hash``, the one prune's manifest records).

``--reuse-search FILE`` takes the sublayer and block orders of the same model from an earlier results
file instead of searching again, only when that record's calibration samples are identical to this
protocol's (same hash at the same nsamples x seqlen; otherwise it stops with an error): the greedy
search is deterministic given the model and its calibration ids, so the orders are the ones a new
search would give. With FinerCut's prefix calibration at 4 x 128 tokens, ``cross`` and ``sotu`` both
take the first 512 tokens of the 1790 address, so the ``sotu`` rows can reuse a ``cross`` search:

    python benchmarks/finercut.py --models smollm2-135m --protocols sotu \
        --reuse-search benchmarks/results/finercut_smollm2.json --out benchmarks/results/finercut_smollm2_sotu.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from compresskit.api import prune
from compresskit.depth.blocks import delete_blocks
from compresskit.depth.candidates import build_candidates
from compresskit.depth.removal import remove_sublayer
from compresskit.evaluation.efficiency import measure_throughput
from compresskit.evaluation.perplexity import perplexity, windowed_perplexity
from compresskit.evaluation.task_sets import tasks_dir
from compresskit.models import get_adapter, load_model
from compresskit.paths import shared_data_dir, shared_models_dir

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "finercut.json"
#: where models are loaded, searched and evaluated (--device; cpu unless a record's settings say otherwise)
DEVICE = "cpu"


def model_path(name: str) -> str:
    return name if name == "smollm2-135m" else str(shared_models_dir() / name)


def fixture_validation_ids(tokenizer) -> torch.Tensor:
    """The MoE fixtures' held-out text (models/README.md), joined by blank lines."""
    data = shared_data_dir()
    sotu = [json.loads(line)["text"] for line in (data / "corpora" / "sotu.jsonl").read_text().splitlines() if line.strip()]
    moby = (data / "corpora" / "moby_dick.txt").read_text()
    gsm = [json.loads(line) for line in (data / "gsm8k" / "train.jsonl").read_text().splitlines() if line.strip()]
    parts = sotu[-10:] + [moby[int(len(moby) * 0.95):]] + [f"{g['question']}\n{g['answer']}" for g in gsm[-300:]]
    return tokenizer("\n\n".join(parts), return_tensors="pt").input_ids


#: calibration -> evaluation domain of a run (issue 21: the domain decides FinerCut vs block removal)
PROTOCOLS = {
    "cross": "calibrate on the first nsamples x seqlen tokens of State of the Union addresses (prefix); evaluate "
             "SmolLM2 on WikiText-2 test (the perplexity module's protocol), the MoE fixtures on their held-out "
             "text (last 10 addresses, last 5% of Moby Dick, last 300 GSM8K items)",
    "sotu": "in domain: calibrate on State of the Union addresses except the last 10 (prefix, i.e. the earliest); "
            "evaluate on the held-out last 10 addresses (2012-2021), joined by blank lines",
    "wikitext": "in domain: calibrate on the first half of WikiText-2 test's lines (prefix: empty lines dropped, "
                "joined by spaces, the reference's form); evaluate on the disjoint second half ('' joined)",
}


def protocol_data(protocol: str, tmp: Path) -> tuple[str, str | None]:
    """(calibration source, held-out text or None for the cross-domain row's own evaluation)."""
    data = shared_data_dir()
    sotu_file = data / "corpora" / "sotu.jsonl"
    if protocol == "cross":
        return f"file:{sotu_file}", None
    if protocol == "sotu":
        lines = [line for line in sotu_file.read_text().splitlines() if line.strip()]
        calib = tmp / "sotu_train.jsonl"
        calib.write_text("\n".join(lines[:-10]) + "\n")
        return f"file:{calib}", "\n\n".join(json.loads(line)["text"] for line in lines[-10:])
    if protocol == "wikitext":
        rows = (data / "wikitext-2-raw" / "wiki.test.raw").read_text().splitlines(keepends=True)
        half = len(rows) // 2
        calib = tmp / "wikitext_first_half.jsonl"
        calib.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows[:half] if r.strip()))
        return f"file:{calib}", "".join(rows[half:])
    raise SystemExit(f"error: unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")


def held_out_ppl(model, tok, name: str, seqlen: int, windows: int, text: str | None = None) -> float:
    if text is not None:
        return windowed_perplexity(model, tok(text, return_tensors="pt").input_ids, seqlen, device=DEVICE,
                                   max_windows=windows)["value"]
    if name == "smollm2-135m":
        return perplexity(model, tok, "wikitext2", seqlen=seqlen, max_windows=windows, device=DEVICE)["value"]
    return windowed_perplexity(model, fixture_validation_ids(tok), seqlen, device=DEVICE, max_windows=windows)["value"]


def piqa(model, tok, limit: int) -> float | None:
    if limit <= 0:
        return None
    from compresskit.evaluate import evaluate

    result = evaluate(model, tokenizer=tok, tasks="piqa_local", task_files=[tasks_dir() / "piqa_local.yaml"],
                      limit=limit, batch_size=8, device=DEVICE)
    task = next(iter(result.tasks.values()))
    return task.metric_value("acc")


def fresh(name: str):
    model, tok = load_model(model_path(name), dtype="float32", device=DEVICE)
    model.eval()
    return model, tok


def apply_sublayers(model, order, count):
    adapter = get_adapter(model)
    for row in order[:count]:
        remove_sublayer(adapter, row["block"], "attn" if row["type"] == "attn" else "mlp")
    return model


def apply_blocks(model, order, min_params):
    removed, drop = 0, set()
    for row in order:
        if removed >= min_params:
            break
        drop.add(row["block"])
        removed += row["params"]
    delete_blocks(get_adapter(model), drop)
    return model, removed, len(drop)


def search(name, calib, nsamples, seqlen, **options):
    model, tok = fresh(name)
    out = prune(model, "finercut", tokenizer=tok, calib=calib, nsamples=nsamples, seqlen=seqlen, device=DEVICE,
                batch_size=nsamples, method_options=options)
    return dict(out.manifest.method_details, calib_hash=out.manifest.calibration["hash"])


def calibration_hash(calib: str, tok, nsamples: int, seqlen: int) -> str:
    """The hash of the samples FinerCut's default calibration (format prefix) builds from ``calib``
    (prune's manifest records the same hash; equal hashes mean identical greedy searches)."""
    from compresskit.calibration.loader import load_calibration
    from compresskit.calibration.spec import CalibrationSpec

    spec = CalibrationSpec(source=calib, format="prefix", nsamples=nsamples, seqlen=seqlen)
    return load_calibration(spec, tok, use_cache=False).hash


def reused_search(path: Path, name: str, protocol: str, calib_hash: str, tok, args, tmp: Path) -> dict:
    """The earlier record of ``name`` in ``path`` whose calibration samples equal this protocol's, or exit."""
    stored = json.loads(path.read_text())
    rec = next((r for r in (stored if isinstance(stored, list) else [stored])
                if r.get("model") == name and "sublayer_search" in r and "block_search" in r), None)
    if rec is None:
        raise SystemExit(f"error: {path} holds no sublayer and block search of {name}")
    settings = rec.get("settings", {})
    if (settings.get("nsamples"), settings.get("seqlen")) != (args.nsamples, args.seqlen):
        raise SystemExit(f"error: {path} searched {name} at nsamples x seqlen {settings.get('nsamples')} x "
                         f"{settings.get('seqlen')}, this run asks {args.nsamples} x {args.seqlen}")
    stored_protocol = rec.get("protocol", "cross")  # records before --protocols were the cross-domain row
    stored_hash = settings.get("calib_hash") or calibration_hash(protocol_data(stored_protocol, tmp)[0], tok,
                                                                  args.nsamples, args.seqlen)
    if stored_hash != calib_hash:
        raise SystemExit(f"error: {path}'s {name} search ({stored_protocol}) calibrated on other samples "
                         f"({stored_hash}) than protocol {protocol} ({calib_hash}); search again without --reuse-search")
    return {"record": rec, "protocol": stored_protocol, "calib_hash": stored_hash}


def run_model(name: str, args, protocol: str = "cross") -> dict:
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="finercut-bench-"))
    calib, text = protocol_data(protocol, tmp)
    ratios = [float(r) for r in args.ratios.split(",")]
    record: dict = {"model": name, "protocol": protocol,
                    "settings": {"protocol": PROTOCOLS[protocol], "calib": calib.rpartition("/")[2],
                                 "calib_format": "prefix (FinerCut's default: the first nsamples x seqlen tokens)",
                                 "nsamples": args.nsamples, "seqlen": args.seqlen, "ppl_seqlen": args.ppl_seqlen,
                                 "ppl_windows": args.ppl_windows, "piqa_limit": args.piqa_limit,
                                 "device": DEVICE, "torch": torch.__version__}}
    dense, tok = fresh(name)
    params_total = sum(p.numel() for p in dense.parameters())
    record["settings"]["calib_hash"] = calibration_hash(calib, tok, args.nsamples, args.seqlen)
    reuse = (reused_search(args.reuse_search, name, protocol, record["settings"]["calib_hash"], tok, args, tmp)
             if args.reuse_search else None)
    record["dense"] = {"ppl": held_out_ppl(dense, tok, name, args.ppl_seqlen, args.ppl_windows, text),
                       "piqa": piqa(dense, tok, args.piqa_limit),
                       "decode_tok_s": measure_throughput(dense, tok, prompt_len=64, new_tokens=32)["decode_tokens_per_s"],
                       "params": params_total}
    del dense
    print(name, protocol, "dense", record["dense"], flush=True)

    t = {}
    for cache in ((True, False) if args.step_timing and reuse is None else ()):
        d = search(name, calib, args.nsamples, args.seqlen, remove_params=1e-9, prefix_cache=cache)
        t["with_prefix_cache" if cache else "without_prefix_cache"] = {
            "first_step_s": d["order"][0]["seconds"], "block_runs": d["search"]["block_runs"]}
    record["step_timing"] = t
    print(name, "timing", t, flush=True)

    if reuse is None:
        d = search(name, calib, args.nsamples, args.seqlen, remove=max(ratios))
        check_hash(d, record)
        order = d["order"]
        record["sublayer_search"] = {"seconds": d["search"]["seconds"],
                                     "order": [(r["type"], r["block"]) for r in order],
                                     "distances": [r["distance"] for r in order]}
        num_blocks = d["num_blocks"]
        block_params = d["removed_params"] / d["param_fraction_blocks"] if d["param_fraction_blocks"] else 0
        max_params = d["removed_params"]
        # one block beyond the sublayer model's removal: the stop rule takes the nearest count, and
        # apply_blocks needs an order that reaches at least as many parameters
        b = search(name, calib, args.nsamples, args.seqlen, level="block",
                   remove_params=min(0.99, (max_params + block_params / num_blocks) / block_params + 1e-6))
        check_hash(b, record)
        block_order = b["order"]
        record["block_search"] = {"seconds": b["search"]["seconds"], "order": [r["block"] for r in block_order]}
    else:  # the earlier orders, with each removal's parameters counted on this model as the search counts them
        old = reuse["record"]
        adapter = get_adapter(fresh(name)[0])
        num_blocks = adapter.num_blocks
        sub = {(c.kind, c.block): c.params for c in build_candidates(adapter, "sublayer")}
        blk = {c.block: c.params for c in build_candidates(adapter, "block")}
        del adapter
        order = [{"type": kind, "block": i, "params": sub[(kind, i)]} for kind, i in old["sublayer_search"]["order"]]
        block_order = [{"block": i, "params": blk[i]} for i in old["block_search"]["order"]]
        if len(order) < int(2 * num_blocks * max(ratios) + 1e-9):
            raise SystemExit(f"error: the reused search removed {len(order)} sublayers; ratio {max(ratios)} needs "
                             f"{int(2 * num_blocks * max(ratios) + 1e-9)}")
        note = (f"reused from {args.reuse_search.name} (protocol {reuse['protocol']}): identical calibration "
                f"samples {reuse['calib_hash']}, so a new search gives the same order")
        record["sublayer_search"] = dict(old["sublayer_search"], reused=note)
        record["block_search"] = dict(old["block_search"], reused=note)
    rows = []
    for r in ratios:
        count = int(2 * num_blocks * r + 1e-9)
        m, _ = fresh(name)
        apply_sublayers(m, order, count)
        removed = sum(row["params"] for row in order[:count])
        row = {"ratio": r, "sublayers": count, "attn": sum(1 for x in order[:count] if x["type"] == "attn"),
               "params_removed_frac": removed / params_total,
               "ppl": held_out_ppl(m, tok, name, args.ppl_seqlen, args.ppl_windows, text),
               "piqa": piqa(m, tok, args.piqa_limit)}
        if abs(r - 0.25) < 1e-9:
            row["decode_tok_s"] = measure_throughput(m, tok, prompt_len=64, new_tokens=32)["decode_tokens_per_s"]
        del m
        m, _ = fresh(name)
        m, blk_removed, nblk = apply_blocks(m, block_order, removed)
        if blk_removed < removed:
            raise SystemExit(f"error: the block order {[r['block'] for r in block_order]} removes {blk_removed} "
                             f"parameters, fewer than the {removed} of the sublayer model at ratio {r}")
        row.update({"block_blocks": nblk, "block_params_removed_frac": blk_removed / params_total,
                    "block_ppl": held_out_ppl(m, tok, name, args.ppl_seqlen, args.ppl_windows, text),
                    "block_piqa": piqa(m, tok, args.piqa_limit)})
        del m
        rows.append(row)
        print(name, protocol, row, flush=True)
    record["rows"] = rows
    return record


def check_hash(details: dict, record: dict) -> None:
    """calibration_hash mirrors what prune used (else --reuse-search's identity check would mean nothing)."""
    if details["calib_hash"] != record["settings"]["calib_hash"]:
        raise SystemExit(f"error: prune calibrated on samples {details['calib_hash']}, "
                         f"calibration_hash() gave {record['settings']['calib_hash']}")


def table(records: list[dict]) -> str:
    lines = ["| model | protocol | removed (sublayers) | attn/mlp | params removed | ppl | PIQA | block: blocks | params "
             "| ppl | PIQA |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for rec in records:
        dn = rec["dense"]
        proto = rec.get("protocol", "cross")
        lines.append(f"| {rec['model']} | {proto} | dense | - | 0 | {dn['ppl']:.2f} | {fmt(dn['piqa'])} | - | - | - | - |")
        for r in rec["rows"]:
            lines.append(f"| | | {r['ratio']:.0%} ({r['sublayers']}) | {r['attn']}/{r['sublayers'] - r['attn']} | "
                         f"{r['params_removed_frac']:.1%} | {r['ppl']:.2f} | {fmt(r['piqa'])} | {r['block_blocks']} | "
                         f"{r['block_params_removed_frac']:.1%} | {r['block_ppl']:.2f} | {fmt(r['block_piqa'])} |")
    return "\n".join(lines)


def fmt(v):
    return "-" if v is None else f"{v:.3f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="deepseek-v2-moe-25m,qwen2-moe-26m,smollm2-135m")
    ap.add_argument("--ratios", default="0.10,0.20,0.25,0.30")
    ap.add_argument("--protocols", default="cross",
                    help="Comma-separated calibration -> evaluation domains: " +
                         "; ".join(f"{k}: {v}" for k, v in PROTOCOLS.items()))
    ap.add_argument("--nsamples", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--ppl-seqlen", type=int, default=512)
    ap.add_argument("--ppl-windows", type=int, default=8)
    ap.add_argument("--piqa-limit", type=int, default=100)
    ap.add_argument("--out", type=Path, default=RESULTS, help="JSON results file.")
    ap.add_argument("--reuse-search", type=Path, default=None, metavar="FILE",
                    help="Take each model's sublayer and block orders from this earlier results file when its "
                         "calibration samples are identical to the protocol's (checked by hash; else an error).")
    ap.add_argument("--device", default="cpu", help="Where models are searched and evaluated (cpu: every stored "
                    "result unless its settings say otherwise; on cuda decode tok/s and step times are the GPU's).")
    ap.add_argument("--no-step-timing", dest="step_timing", action="store_false",
                    help="Skip the one-step searches with and without the prefix cache (2 extra steps' time).")
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    torch.manual_seed(0)
    records = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    protocols = args.protocols.split(",")
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown:
        ap.error(f"unknown protocol {unknown[0]!r}; choose from {', '.join(PROTOCOLS)}")
    for name in args.models.split(","):
        for protocol in protocols:
            t0 = time.perf_counter()
            rec = run_model(name, args, protocol)
            rec["wall_s"] = time.perf_counter() - t0
            records.append(rec)
            args.out.write_text(json.dumps(records, indent=1))
    print(table(records))
    for rec in records:
        print(rec["model"], rec.get("protocol", "cross"), "order:", " ".join(f"{t}{b}" for t, b in rec["sublayer_search"]["order"]),
              "| blocks:", rec["block_search"]["order"], "| step timing:", rec.get("step_timing"),
              "| decode tok/s dense", round(rec["dense"]["decode_tok_s"], 1), "25%",
              round(next((r for r in rec["rows"] if abs(r["ratio"] - 0.25) < 1e-9), {}).get("decode_tok_s", 0), 1))


if __name__ == "__main__":
    main()
