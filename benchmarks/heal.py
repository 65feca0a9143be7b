"""Healing compressed checkpoints: held-out perplexity and local PIQA before healing, after CE-only,
after KD and after KD with LoRA, at the same token budget for every row (issue 19).

Rows (all on CPU, float32):

* ``wanda70`` / ``owl70``: ``compresskit.prune`` (Wanda 70 %; OWL + Wanda 70 %, M = 5, λ = 0.08) with
  SOTU calibration (``--calib-samples`` × ``--calib-seqlen``);
* ``finercut25`` / ``block25``: FinerCut's greedy order on this model (25 % of the 60 sublayers = 15
  removals; 7 of the 30 blocks at ``--level block``) **replayed** from
  ``benchmarks/results/finercut_smollm2.json`` (the searches took 53 and 19 CPU-minutes there) through
  the same ``depth`` functions FinerCut's run uses (``remove_sublayer``, ``finish_removal``), saved as
  a FinerCut checkpoint with the same ``per_layer`` record;
* ``reap25-qwen`` / ``reap25-deepseek``: ``compresskit.prune(<fixture>, "reap", remove_experts=0.25)``
  on the MoE fixtures of ``../shared/models`` (``qwen2-moe-26m``: 20 → 15 routed experts per MoE
  layer; ``deepseek-v2-moe-25m``: 16 → 12), SOTU calibration as above, saved in float32. These rows
  have their own dense model (the fixture, the manifest's ``base_model`` and so the KD teacher): its
  figures are stored in the row (``row["dense"]``) and the row's gap, table cell and plot line use
  them. Held-out text is WikiText-2 test through the fixture's own tokenizer. (The fixtures were
  trained on SOTU minus its last 10 addresses, so for them SOTU is in-distribution training text and
  WikiText-2 is out-of-distribution held-out text.)

Healing (``compresskit.heal.heal``, teacher = the dense model): training text = SOTU addresses
(``--data``), held-out text = WikiText-2 test (the local copy, first ``--ppl-windows`` windows of
``--ppl-seqlen`` tokens): they share nothing. Every variant trains ``--steps`` × ``--batch`` ×
``--seqlen`` tokens with the same data order; ``ce`` and ``kd`` train what ``--train auto`` picks
for the row's kind (Wanda / OWL: every pruned linear, masks kept; FinerCut / blocks: the blocks next
to the removals; REAP: the remaining experts and the routers), ``kd+lora`` trains peft LoRA adapters
(rank 16, peft's ``all-linear``: every ``nn.Linear`` but the head) with KD and merges them (sparse
rows: masks re-applied after the merge). On the MoE fixtures that is not the same set: on
``qwen2-moe-26m`` the attention projections, the dense MLP of layer 0, the shared experts and the
shared-expert gate (its router is not an ``nn.Linear`` and its fused 3-D routed experts are not
linears: neither gets an adapter); on ``deepseek-v2-moe-25m`` peft 0.21 maps the MLP names of
``all-linear`` (``gate_proj`` / ``up_proj`` / ``down_proj``) to ``target_parameters`` of this
architecture's fused experts, so the attention projections, the routers (``mlp.gate``) and the
fused routed-expert tensors (``gate_up_proj`` / ``down_proj``, peft's ``ParamWrapper``) are adapted
but the dense MLP of layer 0 and the shared experts are not (the row records ``lora_adapted``).

    nice -n 10 env OMP_NUM_THREADS=1 python benchmarks/heal.py            # writes results/heal_smollm2.{json,png}
    nice -n 10 env OMP_NUM_THREADS=1 python benchmarks/heal.py \
        --rows wanda70,owl70,finercut25,block25,reap25-qwen,reap25-deepseek --steps 32 --batch 2 --seqlen 256 \
        --eval-every 8 --piqa-limit 100 --out benchmarks/results/heal_equal_budget.json

Results are written after every variant; a rerun skips what the JSON already holds (``--fresh`` to
redo).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
MODEL = "smollm2-135m"
ROWS = ("finercut25", "block25", "wanda70", "owl70")
#: rows with their own dense model: row -> MoE fixture under ../shared/models (REAP, 25 % of the routed experts)
FIXTURE_ROWS = {"reap25-qwen": "qwen2-moe-26m", "reap25-deepseek": "deepseek-v2-moe-25m"}
VARIANTS = ("ce", "kd", "kd+lora")


def shared_data() -> Path:
    from compresskit.paths import shared_data_dir

    return shared_data_dir()


def fixture_path(row: str) -> Path:
    from compresskit.paths import shared_models_dir

    return shared_models_dir() / FIXTURE_ROWS[row]


# --------------------------------------------------------------------------- compressed checkpoints
def make_checkpoint(row: str, work: Path, args) -> Path:
    import compresskit

    out = work / row
    if out.exists():
        return out
    calib = f"file:{shared_data() / 'corpora' / 'sotu.jsonl'}"
    common = dict(out=out, device=args.device, calib=calib, nsamples=args.calib_samples, seqlen=args.calib_seqlen,
                  load="in-memory")
    if row == "wanda70":
        compresskit.prune(MODEL, "wanda", sparsity=0.7, **common)
    elif row == "owl70":
        compresskit.prune(MODEL, "owl", sparsity=0.7, pruner="wanda", method_options={"owl_m": 5, "owl_lambda": 0.08},
                          **common)
    elif row in FIXTURE_ROWS:  # float32 like the other rows (the fixtures are stored in bf16)
        compresskit.prune(str(fixture_path(row)), "reap", method_options={"remove_experts": 0.25}, dtype="float32",
                          **common)
    else:
        replay_finercut(row, out)
    return out


def replay_finercut(row: str, out: Path) -> None:
    """Apply FinerCut's recorded greedy order (results/finercut_smollm2.json) and save the result as
    FinerCut does: stubs, identity blocks deleted and renumbered, per_layer_config, the structure."""
    from compresskit.checkpoint import Manifest, save_checkpoint
    from compresskit.depth.finish import finish_removal
    from compresskit.depth.removal import remove_sublayer
    from compresskit.models import get_adapter, load_model

    record = json.loads((RESULTS / "finercut_smollm2.json").read_text())[0]
    model, tok = load_model(MODEL, dtype="float32", device="cpu")  # the removal is exact: no device needed
    adapter = get_adapter(model)
    num_blocks = adapter.num_blocks
    if row == "finercut25":
        level, removals = "sublayer", [(k, b) for k, b in record["sublayer_search"]["order"][:int(2 * num_blocks * 0.25)]]
    else:
        level, removals = "block", [("block", b) for b in record["block_search"]["order"][:int(num_blocks * 0.25)]]
    rows = [{"block": i, "attention": None, "mlp": None, "new_index": i} for i in range(num_blocks)]
    for step, (kind, block) in enumerate(removals):
        remove_sublayer(adapter, block, kind)
        for k in (("attention", "mlp") if kind == "block" else ("attention" if kind == "attn" else "mlp",)):
            rows[block][k] = step
    done = finish_removal(model, adapter, level, {b for _, b in removals})
    if done.kept_blocks is not None:
        new_of = {old: new for new, old in enumerate(done.kept_blocks)}
        for r in rows:
            r["new_index"] = new_of.get(r["block"])
    manifest = Manifest(
        base_model=MODEL, method="finercut",
        hyperparameters={"level": level, "remove": 0.25, "replayed_from": "benchmarks/results/finercut_smollm2.json"},
        method_details={"level": level, "removed": len(removals), "per_layer": rows, "per_layer_config": done.per_layer_config,
                        "blocks_deleted": 0 if done.kept_blocks is None else num_blocks - len(done.kept_blocks)},
        structure=done.structure, loadable_with_transformers=not done.structure, form_reason=done.form_reason,
        dtype="float32")
    save_checkpoint(model, tok, out, manifest)


# --------------------------------------------------------------------------- evaluation
def heldout_ids(tok, args):
    from compresskit.evaluation.perplexity import perplexity_tokens

    ids, _ = perplexity_tokens(tok, "wikitext2", args.ppl_seqlen)
    return ids


def piqa_direct(model, tok, limit: int, device) -> float:
    """PIQA accuracy computed here, where lm-eval is not installed (the GPU machine): lm-eval's
    ``piqa`` protocol — context ``"Question: {goal}\nAnswer:"``, choices ``" " + sol``, the choice
    with the larger summed log-likelihood of its tokens (``acc``), first ``limit`` items."""
    import torch.nn.functional as F

    folder = shared_data() / "piqa"
    items = [json.loads(line) for line in (folder / "valid.jsonl").read_text().splitlines() if line.strip()][:limit]
    labels = [int(x) for x in (folder / "valid-labels.lst").read_text().split()][:limit]
    correct = 0
    for item, label in zip(items, labels):
        context = tok(f"Question: {item['goal']}\nAnswer:").input_ids
        scores = []
        for sol in (item["sol1"], item["sol2"]):
            full = tok(f"Question: {item['goal']}\nAnswer: {sol}").input_ids
            ids = torch.tensor([full], device=device)
            with torch.no_grad():
                logp = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            target = ids[0, 1:]
            scores.append(float(logp[len(context) - 1:].gather(-1, target[len(context) - 1:, None]).sum()))
        correct += int(scores.index(max(scores)) == label)
    return correct / len(items)


def moby_tail_ids(tok):
    """The REAP rows' second held-out text: the last 5 % of Moby Dick, which the fixtures never saw
    (they were trained on Moby Dick minus it) and the SOTU healing text does not contain — in the
    fixtures' own distribution, unlike WikiText-2."""
    moby = (shared_data() / "corpora" / "moby_dick.txt").read_text()
    return tok(moby[int(len(moby) * 0.95):], return_tensors="pt").input_ids


def evaluate_model(model, tok, ids, args, moby: bool = False) -> dict:
    from compresskit.evaluation.perplexity import windowed_perplexity

    model.eval().to(args.device)
    t0 = time.perf_counter()
    with torch.no_grad():
        ppl = windowed_perplexity(model, ids, args.ppl_seqlen, device=args.device, max_windows=args.ppl_windows)["value"]
        moby_ppl = (windowed_perplexity(model, moby_tail_ids(tok), args.ppl_seqlen, device=args.device,
                                        max_windows=args.ppl_windows)["value"] if moby else None)
    acc = None
    if args.piqa_limit > 0:
        try:
            import lm_eval  # noqa: F401
        except ImportError:
            acc = piqa_direct(model, tok, args.piqa_limit, args.device)
        else:
            from compresskit.evaluate import evaluate
            from compresskit.evaluation.task_sets import tasks_dir

            result = evaluate(model, tokenizer=tok, tasks="piqa_local", task_files=[tasks_dir() / "piqa_local.yaml"],
                              limit=args.piqa_limit, batch_size=8, device=args.device)
            acc = next(iter(result.tasks.values())).metric_value("acc")
    model.to("cpu")
    return {"ppl": ppl, "piqa": acc, **({"moby_tail_ppl": moby_ppl} if moby else {}),
            "eval_s": round(time.perf_counter() - t0, 1)}


def evaluate_dense(source: str, args) -> dict:
    """The dense model's table figures (``--ppl-seqlen`` windows) and its curve line (the training
    seqlen's windows, as the healing curve measures)."""
    from compresskit.evaluation.perplexity import perplexity_tokens, windowed_perplexity
    from compresskit.models import load_model

    dense, tok = load_model(source, dtype="float32", device=args.device)
    out = evaluate_model(dense, tok, heldout_ids(tok, args), args, moby=source != MODEL)
    curve_ids, _ = perplexity_tokens(tok, "wikitext2", args.seqlen)
    with torch.no_grad():
        out["curve_ppl"] = windowed_perplexity(dense.to(args.device), curve_ids, args.seqlen,
                                               device=args.device, max_windows=args.ppl_windows)["value"]
    out["params"] = sum(p.numel() for p in dense.parameters())
    del dense
    return out


# --------------------------------------------------------------------------- healing
def heal_variant(ckpt: Path, variant: str, work: Path, args) -> tuple[dict, object, object]:
    from compresskit.heal.workflow import HealSettings, heal

    lora = variant == "kd+lora"
    settings = HealSettings(
        data=(f"file:{shared_data() / 'corpora' / 'sotu.jsonl'}",), steps=args.steps, batch_size=args.batch,
        seqlen=args.seqlen, lr=args.lora_lr if lora else args.lr, warmup=args.warmup, seed=0,
        loss="ce" if variant == "ce" else "kd", train="lora" if lora else "auto", merge=lora,
        lora_rank=16 if lora else None, eval_data="wikitext2", eval_every=args.eval_every,
        eval_windows=args.ppl_windows, save_every=10 ** 6)
    # the held-out curve uses the training seqlen's windows; the row's table figures use --ppl-seqlen
    out = work / f"{ckpt.name}-{variant.replace('+', '-')}"
    outcome = heal(ckpt, out, settings, device=args.device, force=True,
                   progress=lambda phase, s, n, label: print(f"    {ckpt.name} {variant} {s}/{n} {label}", flush=True))
    d = outcome.record["method_details"]
    info = {"tokens": d["tokens"], "steps": d["steps"], "trained": d["trained"]["trained"],
            "trainable_params": d["trainable_params"], "seconds_per_step": d["seconds_per_step"],
            "curve": [{"train_tokens": e["train_tokens"], "ppl": e["ppl"], **({"after": e["after"]} if e.get("after") else {})}
                      for e in d["evals"]],
            "first_loss": outcome.losses[0], "last_loss": outcome.losses[-1],
            "sparsity_kept": d["sparsity_kept"], "lora": (d["lora"] or {}).get("merge")}
    if d["lora"]:  # what peft adapted, by module name with the block index dropped
        import re
        from collections import Counter

        kinds = Counter(re.sub(r"\.\d+\.", ".N.", name) for name in d["lora"]["adapted_modules"])
        info["lora_adapted"] = {"modules": len(d["lora"]["adapted_modules"]), "by_name": dict(sorted(kinds.items()))}
    return info, outcome.model, outcome.tokenizer


# --------------------------------------------------------------------------- report
def gap_recovered(dense: float, before: float, after: float) -> float | None:
    """Share of the log-perplexity gap closed: (log b − log a) / (log b − log d); None when the
    compressed model is not worse than the dense one (there is no gap to close)."""
    if before <= dense:
        return None
    return (math.log(before) - math.log(after)) / (math.log(before) - math.log(dense))


def pct(x: float | None) -> str:
    return "no gap" if x is None else f"{x:.0%}"


def row_dense(result: dict, row: dict) -> dict:
    """The row's own dense figures (REAP rows: the fixture) or the shared dense model's."""
    return row.get("dense") or result["dense"]


def table(result: dict) -> str:
    dense = result["dense"]
    lines = [f"tokens per healing run: {result['settings']['tokens_per_run']:,} "
             f"({result['settings']['steps']} steps × {result['settings']['batch']} × {result['settings']['seqlen']}); "
             f"held-out: WikiText-2 test, {result['settings']['ppl_windows']} × {result['settings']['ppl_seqlen']} tokens; "
             f"PIQA: first {result['settings']['piqa_limit']} items",
             f"dense {result['model']}: ppl {dense['ppl']:.2f} · PIQA {dense['piqa']}"]
    for name, row in result["rows"].items():
        if row.get("dense"):
            lines.append(f"dense {row.get('model', name)} (row {name}): ppl {row['dense']['ppl']:.2f} · PIQA {row['dense']['piqa']}")
    lines += ["", "| row | dense ppl / PIQA | before ppl / PIQA | CE ppl / PIQA | KD ppl / PIQA | KD+LoRA ppl / PIQA "
              "| KD gap recovered | KD+LoRA gap recovered | KD beats CE |",
              "|---|---|---|---|---|---|---:|---:|---|"]

    def cell(r):
        return "-" if r is None else f"{r['ppl']:.2f} / {r['piqa'] if r['piqa'] is not None else '-'}"

    for name, row in result["rows"].items():
        d = row_dense(result, row)
        cells = [cell(row.get(key)) for key in ("before", "ce", "kd", "kd+lora")]
        kd, ce, before, lora = row.get("kd"), row.get("ce"), row.get("before"), row.get("kd+lora")
        rec = pct(gap_recovered(d['ppl'], before['ppl'], kd['ppl'])) if kd and before else "-"
        rec_lora = pct(gap_recovered(d['ppl'], before['ppl'], lora['ppl'])) if lora and before else "-"
        beats = ("yes" if kd["ppl"] < ce["ppl"] else "no") if kd and ce else "-"
        lines.append(f"| {name} | {cell(d)} | {' | '.join(cells)} | {rec} | {rec_lora} | {beats} |")
    moby_rows = {n: r for n, r in result["rows"].items() if (r.get("dense") or {}).get("moby_tail_ppl")}
    if moby_rows:
        lines += ["", "second held-out text of the MoE rows: last 5 % of Moby Dick (in the fixtures' distribution, "
                  "never trained on), same windows", "",
                  "| row | dense | before | CE | KD | KD+LoRA | KD gap recovered | KD beats CE |", "|---|---|---|---|---|---|---:|---|"]
        for name, row in moby_rows.items():
            m = {k: (row.get(k) or {}).get("moby_tail_ppl") for k in ("dense", "before", "ce", "kd", "kd+lora")}
            rec = pct(gap_recovered(m["dense"], m["before"], m["kd"])) if m["kd"] and m["before"] else "-"
            beats = ("yes" if m["kd"] < m["ce"] else "no") if m["kd"] and m["ce"] else "-"
            lines.append(f"| {name} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in m.values())
                         + f" | {rec} | {beats} |")
    lines += ["", "| row | variant | trains | trainable params | s / step | wall s | sparsity kept |",
              "|---|---|---|---:|---:|---:|---|"]
    for name, row in result["rows"].items():
        for variant in VARIANTS:
            info = row.get(variant)
            if not info:
                if row.get(f"{variant}_error"):
                    lines.append(f"| {name} | {variant} | error: {row[f'{variant}_error']} | | | | |")
                continue
            trains = " + ".join(info["trained"])
            if info.get("lora_adapted"):
                trains += f" ({info['lora_adapted']['modules']} modules)"
            kept = info["sparsity_kept"]
            kept = "-" if kept is None else f"{kept['unchanged_per_tensor']} ({kept['tensors']} tensors)"
            lines.append(f"| {name} | {variant} | {trains} | {info['trainable_params']:,} | "
                         f"{info['seconds_per_step']:.2f} | {info['wall_s']:.0f} | {kept} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if any(v in result["rows"][r] for v in VARIANTS)]
    ncols = min(3, max(1, len(rows)))
    nrows = max(1, math.ceil(len(rows) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.6 * nrows), squeeze=False)
    for ax in axes.flat[len(rows):]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, rows):
        for variant, style in zip(VARIANTS, ("-o", "-s", "-^")):
            info = result["rows"][name].get(variant)
            if not info:
                continue
            pts = [p for p in info["curve"] if not p.get("after")]
            ax.plot([p["train_tokens"] / 1000 for p in pts], [p["ppl"] for p in pts], style, label=variant, markersize=4)
        ax.axhline(row_dense(result, result["rows"][name])["curve_ppl"], color="k", linestyle="--", linewidth=1,
                   label="dense")
        ax.set_yscale("log")
        ax.set_title(name if name not in FIXTURE_ROWS else f"{name} ({FIXTURE_ROWS[name]})")
        ax.set_xlabel("training tokens (thousands)")
        ax.set_ylabel("held-out ppl (WikiText-2)")
        ax.legend(fontsize=8)
    models = [MODEL] + [FIXTURE_ROWS[r] for r in rows if r in FIXTURE_ROWS]
    fig.suptitle(f"{', '.join(models)}: healing curve (held-out WikiText-2 perplexity against training tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--lora-lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=4)
    ap.add_argument("--ppl-seqlen", type=int, default=512)
    ap.add_argument("--ppl-windows", type=int, default=4)
    ap.add_argument("--piqa-limit", type=int, default=100)
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--calib-seqlen", type=int, default=256)
    ap.add_argument("--work", type=Path, default=Path("/tmp/compresskit-heal-bench"))
    ap.add_argument("--out", type=Path, default=RESULTS / "heal_smollm2.json")
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--report", type=Path, help="only print the table of this results JSON and redraw its PNG")
    args = ap.parse_args()
    if args.report:
        saved = json.loads(args.report.read_text())
        plot(saved, args.report.with_suffix(".png"))
        print(table(saved))
        return
    torch.manual_seed(0)
    args.work.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(args, k) for k in ("steps", "batch", "seqlen", "lr", "lora_lr", "warmup", "ppl_seqlen",
                                              "ppl_windows", "piqa_limit", "calib_samples", "calib_seqlen", "device")}
    settings["tokens_per_run"] = args.steps * args.batch * args.seqlen
    result = {"model": MODEL, "settings": settings, "rows": {}}
    if args.out.exists() and not args.fresh:
        saved = json.loads(args.out.read_text())
        if saved.get("settings") == settings:
            result = saved

    def save() -> None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        if result["rows"] and "dense" in result:
            plot(result, args.out.with_suffix(".png"))

    t_start = time.perf_counter()
    if "dense" not in result:
        result["dense"] = evaluate_dense(MODEL, args)
        save()
        print(f"dense: {result['dense']}", flush=True)

    for row in [r for r in args.rows.split(",") if r]:
        rec = result["rows"].setdefault(row, {})
        if row in FIXTURE_ROWS and "dense" not in rec:
            rec["model"] = FIXTURE_ROWS[row]
            rec["dense"] = evaluate_dense(str(fixture_path(row)), args)
            save()
            print(f"{row} dense ({rec['model']}): {rec['dense']}", flush=True)
        try:
            ckpt = make_checkpoint(row, args.work, args)
        except Exception as exc:  # noqa: BLE001 - one broken row must not lose the others
            rec["error"] = f"{type(exc).__name__}: {exc}"
            print(f"{row}: {rec['error']}", flush=True)
            continue
        if "before" not in rec:
            from compresskit.checkpoint import load_with_tokenizer

            model, tok = load_with_tokenizer(ckpt)
            rec["before"] = evaluate_model(model.float(), tok, heldout_ids(tok, args), args, moby=row in FIXTURE_ROWS)
            del model
            save()
            print(f"{row} before: {rec['before']}", flush=True)
        for variant in [v for v in args.variants.split(",") if v]:
            if variant in rec:
                continue
            t0 = time.perf_counter()
            try:
                info, model, tok = heal_variant(ckpt, variant, args.work, args)
            except Exception as exc:  # noqa: BLE001
                import traceback

                traceback.print_exc()
                rec[f"{variant}_error"] = f"{type(exc).__name__}: {exc}"
                continue
            info.update(evaluate_model(model.float(), tok, heldout_ids(tok, args), args, moby=row in FIXTURE_ROWS))
            info["wall_s"] = round(time.perf_counter() - t0, 1)
            rec[variant] = info
            del model
            gc.collect()
            save()
            print(f"{row} {variant}: ppl {info['ppl']:.2f} piqa {info['piqa']} ({info['wall_s']} s)", flush=True)
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    save()
    print(table(result))


if __name__ == "__main__":
    main()
