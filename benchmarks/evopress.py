"""EvoPress on the real SmolLM2-135M (CPU): measured search against the heuristics we ship (issue 18).

Suites (each writes ``benchmarks/results/evopress_<suite>.json`` row by row, so an interrupted run
keeps what it measured and a rerun skips the rows already there):

* ``depth`` — 25 % depth at equal parameters: k = int(0.25·L) = 7 of SmolLM2's 30 blocks, so
  block removal takes 7 blocks and the sublayer search 7 attention + 7 MLP sublayers (the same
  parameters: SmolLM2's blocks are alike); FinerCut takes its greedy sublayers up to the count
  whose parameters are nearest those 7 blocks' (18 sublayers, 13 attention + 5 MLP), block
  greedy its first 7 blocks. Rows: dense, FinerCut, block greedy, EvoPress ``--level sublayer``,
  EvoPress ``--level block``; then held-out ppl of the sublayer search's successive parents
  against their fitness (how ppl tracks the KL) and a fitness-per-generation plot. Last, every row
  and tracked parent is scored on all calibration tokens with the full KL (``pool_kl``; the
  search's own fitness is a fresh minibatch's estimate per generation, and top-K once the
  calibration's full logits pass 1 GiB), so the rows compare on the search's objective too.
* ``shape7b`` — on CUDA: the dead-sublayer check, then the depth search's paper schedule for
  ``--generations`` generations at Llama-2-7B's shape with random bf16 weights (time per
  generation, projected paper-schedule time, peak GPU memory; not quality).
* ``sparsity`` — 70 % (``--sparsities``) unstructured with Wanda (``--pruners``): uniform, OWL,
  AlphaPruning (ε = 0.2, as sparsity_smollm2.py), EvoPress ``fast`` from uniform, EvoPress seeded
  from all three; search time, database size and build time, peak RSS of each row (VmHWM reset
  before it), the fitness per generation of every EvoPress row (``fitness_per_generation``, from the
  manifest's history; generation 0 = the best seed). Per (sparsity, pruner) the reusable heuristic
  rows come first (no work), then the EvoPress rows (the second reuses the first's level database:
  ``database_reused``), then the heuristic rows pruned here: those not reusable and, with
  ``--piqa-limit`` (``--reprune-heuristics``), the reused ones again, since a reused row has no model
  and so no PIQA (its reused ppl stays beside, ``reused_ppl``, as a cross-check). The plot
  (``<out>.png``): best fitness per generation, and held-out ppl against fitness per row (heuristic
  rows at the KL their allocation got as a seed). Two processes never share an ``--out``: give each
  its own and join them with ``--merge-from``. ``--sp-calib wikitext2-tail`` is an in-domain
  diagnostic, not the protocol: calibration from WikiText-2 test after the held-out windows
  (disjoint passages of one corpus), to tell a search that fits its calibration text from one
  whose ranking does not carry to another genre; ``--seed-alpha-epsilon`` gives the seeded rows'
  AlphaPruning seed the AlphaPruning row's ε.

Protocol. Calibration: State of the Union addresses (``corpora/sotu.jsonl``); held-out: WikiText-2
test (the perplexity module's protocol: non-overlapping windows of ``--eval-seqlen``, the first
``--eval-windows``) and local PIQA (first ``--piqa-limit`` items) — disjoint corpora. Depth uses
FinerCut's ``prefix`` calibration (the first nsamples × seqlen tokens), so its first 4 × 128
tokens are exactly the ones benchmarks/finercut.py's FinerCut and block-greedy searches used:
those orders are reused from ``benchmarks/results/finercut_smollm2.json`` (``--finercut-json``;
each search costs 20-55 min on this shared CPU) instead of being searched again, and the block
order is also the EvoPress searches' ``block-greedy`` seed (the same greedy on the first 512 of
the search's tokens). Sparsity uses sparsity_smollm2.py's calibration (32 × 512 random windows, seed
0). Peak RSS is the process's maximum resident set after each search (``ru_maxrss``): the
searches run before any evaluation, each on a freshly (lazily) loaded model.

The schedules are cut to fit a 2-core CPU shared with other jobs (``--generations``,
``--offspring``, ``--tokens``; printed with the table and stored in every row): far fewer
generations than the reference's k(n−k)/1.5 = 107 for depth.

    nice -n 10 env OMP_NUM_THREADS=1 python benchmarks/evopress.py --suite depth
    nice -n 10 env OMP_NUM_THREADS=1 python benchmarks/evopress.py --suite sparsity --sparsities 0.7 \
        --pruners wanda --schedule fast --eval-windows 8 --piqa-limit 100 --out benchmarks/results/evopress_sparsity_grid.json
    python benchmarks/evopress.py --suite depth --report-only
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import time
from pathlib import Path

import torch

import compresskit
from compresskit.calibration.loader import load_calibration
from compresskit.calibration.spec import CalibrationSpec
from compresskit.depth.blocks import delete_blocks
from compresskit.depth.removal import remove_sublayer
from compresskit.evaluation.perplexity import perplexity_tokens, windowed_perplexity
from compresskit.evaluation.task_sets import tasks_dir
from compresskit.models import get_adapter, load_model
from compresskit.paths import shared_data_dir

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MODEL = "smollm2-135m"


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def reset_peak_rss() -> bool:
    """Reset this process's peak resident set (Linux ≥ 4.0: ``clear_refs`` 5 resets VmHWM), so the
    next :func:`row_peak_rss_mb` is one row's peak, not the process's since start."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def row_peak_rss_mb() -> float:
    """VmHWM: the peak resident set since the last :func:`reset_peak_rss` (else ``ru_maxrss``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(rss_mb(), 1)


def fresh(dtype: str = "float32"):
    model, tok = load_model(MODEL, dtype=dtype, device="cpu")
    return model.eval(), tok


def piqa(model, tok, limit: int) -> float | None:
    if limit <= 0:
        return None
    from compresskit.evaluate import evaluate

    result = evaluate(model, tokenizer=tok, tasks="piqa_local", task_files=[tasks_dir() / "piqa_local.yaml"],
                      limit=limit, batch_size=8, device="cpu")
    return next(iter(result.tasks.values())).metric_value("acc")


class Rows:
    """The suite's JSON file, rewritten after every row. ``settings``: what the searches depend on
    (a file made with others is refused); ``evaluation``: how rows are evaluated (rows measured
    otherwise are evaluated again, their searches kept)."""

    EVAL_KEYS = ("ppl", "piqa", "eval_windows", "eval_tokens", "eval_s", "eval_seqlen")

    def __init__(self, path: Path, settings: dict, evaluation: dict):
        self.path = path
        data = json.loads(path.read_text()) if path.exists() else {}
        stored = data.get("settings", {})
        old = {k: v for k, v in stored.items() if k in settings and settings[k] != v}
        if data and old:
            raise SystemExit(f"error: {path} was measured with other settings ({old}); pass --out NEW.json or delete it")
        self.data = data or {"settings": settings, "rows": []}
        self.data["settings"] = settings
        if self.data.get("evaluation") != evaluation:
            for row in self.data["rows"]:
                if not row.get("reused_from"):
                    for key in self.EVAL_KEYS:
                        row.pop(key, None)
            self.data.pop("tracking", None)
            self.data["evaluation"] = evaluation

    def _merge_file(self) -> None:
        """Rows another process (``--levels``) wrote meanwhile join ours (ours win for a label)."""
        if not self.path.exists():
            return
        theirs = json.loads(self.path.read_text())
        mine = {r["label"]: i for i, r in enumerate(self.data["rows"])}
        for r in theirs.get("rows", []):
            if r["label"] not in mine:
                self.data["rows"].append(r)
            elif "ppl" in r and "ppl" not in self.data["rows"][mine[r["label"]]]:  # evaluated meanwhile
                self.data["rows"][mine[r["label"]]] = r
        seen = {t["generation"] for t in self.data.get("tracking", [])}
        extra = [t for t in theirs.get("tracking", []) if t["generation"] not in seen]
        if extra and theirs.get("evaluation") == self.data.get("evaluation"):
            self.data.setdefault("tracking", []).extend(extra)

    def get(self, label: str) -> dict | None:
        self._merge_file()
        return next((r for r in self.data["rows"] if r["label"] == label), None)

    def put(self, row: dict) -> dict:
        self._merge_file()
        self.data["rows"] = [r for r in self.data["rows"] if r["label"] != row["label"]] + [row]
        self.data.update(torch_threads=torch.get_num_threads(), cpu_count=os.cpu_count())
        self.path.write_text(json.dumps(self.data, indent=1))
        return row


def evaluate_row(row: dict, model, tok, ids, args) -> dict:
    t0 = time.perf_counter()
    ppl = windowed_perplexity(model.float(), ids, args.eval_seqlen, max_windows=args.eval_windows, device="cpu")
    row.update(ppl=ppl["value"], eval_windows=ppl["n_windows"], eval_tokens=ppl["tokens"], eval_seqlen=args.eval_seqlen,
               piqa=piqa(model, tok, args.piqa_limit), params=sum(p.numel() for p in model.parameters()),
               eval_s=round(time.perf_counter() - t0, 1))
    if getattr(args, "heldout_kl", False):
        row["heldout_kl"] = heldout_kl(model, ids, args)
    return row


_DENSE: dict = {}


@torch.no_grad()
def heldout_kl(model, ids: torch.Tensor, args) -> float:
    """Full KL(dense ‖ model) per token on the held-out windows (``--heldout-kl``): the search's
    objective on text it never saw, so a row's held-out ppl can be told from its held-out KL (does
    a lower calibration KL carry to new text as KL, and does KL follow perplexity?)."""
    dtype = getattr(args, "sp_dtype", "float32") if args.suite == "sparsity" else "float32"
    if dtype not in _DENSE:
        _DENSE[dtype] = fresh(dtype)[0].float()
    n = min(ids.shape[1] // args.eval_seqlen, args.eval_windows)
    windows = ids[0, :n * args.eval_seqlen].reshape(n, args.eval_seqlen)
    return pool_kl(_DENSE[dtype], {"row": model}, windows)["row"]


# ---------------------------------------------------------------------------------------------- depth
def reused_orders(path: Path) -> dict:
    data = json.loads(path.read_text())
    rec = next(r for r in data if r["model"] == MODEL and r.get("protocol", "cross") == "cross")
    return {"sublayers": [tuple(x) for x in rec["sublayer_search"]["order"]], "blocks": rec["block_search"]["order"],
            "settings": rec["settings"]}


def install_block_greedy_seed(block_order: list[int], k: int):
    """The EvoPress searches' ``block-greedy`` seed is the reused order's first k blocks (module doc)."""
    import compresskit.search.depth as depth

    def seed(replay, adapter, units, groups, high, k_, level, name, progress=None):
        blocks = set(block_order[:k_])
        removed = {("block", b) for b in blocks} | {("attn", b) for b in blocks} | {("mlp", b) for b in blocks}
        genes = [1 if (u.kind, u.block) in removed else 0 for u in units]
        return genes, {"order": [f"block{b}" for b in block_order[:k_]],
                       "source": "benchmarks/results/finercut_smollm2.json block_search (4 x 128 prefix of sotu)"}

    depth.greedy_seed = seed


def run_depth(args) -> dict:
    sotu = shared_data_dir() / "corpora" / "sotu.jsonl"
    settings = {"suite": "depth", "model": MODEL, "calib": "sotu.jsonl", "calib_format": "prefix",
                "nsamples": args.nsamples, "seqlen": args.seqlen, "remove": 0.25, "generations": args.generations,
                "block_generations": args.block_generations or args.generations,
                "offspring": args.offspring, "tokens": args.tokens, "survivors": args.survivors,
                "search_seed": args.search_seed, "finercut_json": str(args.finercut_json.name)}
    evaluation = {"eval_seqlen": args.eval_seqlen, "eval_windows": args.eval_windows, "piqa_limit": args.piqa_limit}
    rows = Rows(args.out or RESULTS / "evopress_depth.json", settings, evaluation)
    orders = reused_orders(args.finercut_json)
    num_blocks = 30
    k = int(num_blocks * 0.25)
    install_block_greedy_seed(orders["blocks"], k)
    options = {"remove": 0.25, "generations": args.generations, "offspring": args.offspring, "tokens": args.tokens,
               "survivors": args.survivors, "seed": args.search_seed, "seed_from": "block-greedy"}
    searches = {}
    for level in ("sublayer", "block"):
        label = f"evopress {level}"
        if rows.get(label) is None and level in args.levels.split(","):
            t0 = time.perf_counter()
            out = compresskit.prune(MODEL, "evopress", calib=f"file:{sotu}", calib_format="prefix",
                                    nsamples=args.nsamples, seqlen=args.seqlen, device="cpu", dtype="float32",
                                    method_options={**options, "level": level,
                                                    "generations": settings[
                                                        "generations" if level == "sublayer" else "block_generations"]})
            d = out.manifest.method_details
            rows.put({"label": label, "level": level, "search_s": round(time.perf_counter() - t0, 1),
                      "peak_rss_mb": round(rss_mb(), 1), "details": d,
                      "removed": [f"{r['type']}{r['block']}" for r in d["removed"]],
                      "final_fitness": d["final_fitness"], "seed_fitness": d["seed_fitness"],
                      "seed_winner": d["seed_winner"], "tokens_seen": d["tokens_seen"]})
            print(label, "search", round(time.perf_counter() - t0, 1), "s; removed", rows.get(label)["removed"],
                  "KL", d["final_fitness"], "seeds", d["seed_fitness"], flush=True)
            del out
        searches[level] = rows.get(label)

    model, tok = fresh()
    ids, info = perplexity_tokens(tok, "wikitext2", args.eval_seqlen)
    rows.data["wikitext2"] = info

    def build(kind: str, payload):
        m, _ = fresh()
        adapter = get_adapter(m)
        if kind == "sublayers":
            for t, b in payload:
                remove_sublayer(adapter, b, t)
        elif kind == "blocks":
            delete_blocks(adapter, set(payload))
        elif kind == "genes":
            units, genes = payload
            drop = set()
            for unit, g in zip(units, genes):
                if g:
                    kind_, block = re.fullmatch(r"([a-z]+)(\d+)", unit).groups()
                    block = int(block)
                    if kind_ == "block":
                        drop.add(block)
                    else:
                        remove_sublayer(adapter, block, kind_)
            if drop:
                delete_blocks(adapter, drop)
        return m

    block_params = 3 * 576 * 1536 + 2 * 576 * 576 + 2 * 576 * 192 + 2 * 576  # one SmolLM2 block
    target = k * block_params
    fc = orders["sublayers"]
    sizes = [2 * 576 * 576 + 2 * 576 * 192 + 576 if t == "attn" else 3 * 576 * 1536 + 576 for t, _ in fc]
    count = min(range(len(fc) + 1), key=lambda n: abs(sum(sizes[:n]) - target))
    plan = [("dense", None, None),
            ("finercut", "sublayers", fc[:count]),
            ("block greedy", "blocks", orders["blocks"][:k])]
    for level in ("sublayer", "block"):
        if searches[level] is None:
            print(f"evopress {level}: no search yet (another --levels run makes it); not evaluated", flush=True)
            continue
        d = searches[level]["details"]
        plan.append((f"evopress {level}", "genes", (d["units"], d["genes"])))
    for label, kind, payload in plan:
        row = rows.get(label) or {"label": label}
        if "ppl" in row or (args.eval_rows and label not in args.eval_rows.split(",")):
            continue
        m = model if kind is None else build(kind, payload)
        if kind == "sublayers":
            row.update(removed=[f"{t}{b}" for t, b in payload], source="finercut_smollm2.json sublayer order")
        elif kind == "blocks":
            row.update(removed=[f"block{b}" for b in payload], source="finercut_smollm2.json block order")
        rows.put(evaluate_row(row, m, tok, ids, args))
        print(label, "ppl", round(row["ppl"], 2), "piqa", row.get("piqa"), "params", row["params"], flush=True)
        if m is not model:
            del m

    # held-out ppl of the sublayer search's successive parents against their fitness
    d = (searches["sublayer"] or {}).get("details") or {}
    parents = d.get("parents") or []
    pick = parents if len(parents) <= args.track else [parents[round(i * (len(parents) - 1) / (args.track - 1))]
                                                       for i in range(args.track)]
    # a parent whose genes are an evaluated row's (the seed = block greedy's blocks, the last = the result)
    known = {}
    for label, genes in (("block greedy", (d.get("seed_genes") or {}).get("block-greedy")),
                         ("evopress sublayer", d.get("genes"))):
        row = rows.get(label) or {}
        if genes is not None and "ppl" in row:
            known[tuple(genes)] = (row["ppl"], label)
    track = rows.data.setdefault("tracking", [])
    done = {t["generation"] for t in track}
    for p in pick if (not args.eval_rows or "tracking" in args.eval_rows.split(",")) else []:
        if p["generation"] in done:
            continue
        if tuple(p["genes"]) in known:
            value, same_as = known[tuple(p["genes"])]
        else:
            m = build("genes", (d["units"], p["genes"]))
            value = windowed_perplexity(m.float(), ids, args.eval_seqlen, max_windows=args.eval_windows,
                                        device="cpu")["value"]
            same_as = None
            del m
        track.append({"generation": p["generation"], "fitness": p["fitness"], "ppl": value,
                      "origin": p.get("origin"), "same_as_row": same_as})
        rows.put(rows.get("evopress sublayer"))
        print("parent at generation", p["generation"], "KL", p["fitness"], "ppl", value, flush=True)
    # every row and tracked parent on all calibration tokens: the fitness of each draw is a fresh
    # minibatch's estimate, so only this one compares allocations (what the final selection uses)
    todo = [(r["label"], r) for r in rows.data["rows"] if r["label"] != "dense" and "pool_kl" not in r]
    todo += [(f"parent {t['generation']}", t) for t in track if "pool_kl" not in t and t.get("same_as_row") is None]
    if todo and (not args.eval_rows or "pool" in args.eval_rows.split(",")):
        kinds = {label: (kind, payload) for label, kind, payload in plan}
        genes_at = {f"parent {p['generation']}": p["genes"] for p in parents}
        models = {label: build("genes", (d["units"], genes_at[label])) if label in genes_at else build(*kinds[label])
                  for label, _ in todo}
        calib = load_calibration(CalibrationSpec(source=f"file:{sotu}", format="prefix", nsamples=args.nsamples,
                                                 seqlen=args.seqlen), tok)
        t0 = time.perf_counter()
        kls = pool_kl(model, models, calib.input_ids)
        for label, target in todo:
            target["pool_kl"] = kls[label]
        for t in track:  # parents that are rows take the row's value
            if t.get("same_as_row") and rows.get(t["same_as_row"]) and "pool_kl" in rows.get(t["same_as_row"]):
                t["pool_kl"] = rows.get(t["same_as_row"])["pool_kl"]
        rows.data["pool_kl_tokens"] = int(calib.input_ids.shape[0] * (calib.input_ids.shape[1] - 1))
        rows.put(rows.get("evopress sublayer") or rows.data["rows"][-1])
        print("pool KL", {k: round(v, 4) for k, v in kls.items()}, round(time.perf_counter() - t0, 1), "s", flush=True)
        del models
    plot_history(rows.data, (args.out or RESULTS / "evopress_depth.json").with_suffix(".png"))
    return rows.data


@torch.no_grad()
def pool_kl(dense, models: dict, input_ids: torch.Tensor) -> dict[str, float]:
    """Mean per-token KL(dense ‖ model) over every sequence of ``input_ids`` [n, L], the last position
    of each excluded: the search's fitness (search/fitness.py, float64 KL, full vocabulary) on all
    calibration tokens (depth's ``pool_kl``) or on the held-out windows (``heldout_kl``); the float64
    KL runs 256 positions at a time."""
    from compresskit.analysis.distances import token_kl

    totals = {k: 0.0 for k in models}
    count = 0
    for row in input_ids:
        x = row[None]
        ref = dense(x).logits[0, :-1].float()
        for label, m in models.items():
            new = m(x).logits[0, :-1].float()
            totals[label] += sum(float(token_kl(ref[i:i + 256], new[i:i + 256]).sum()) for i in range(0, ref.shape[0], 256))
        count += ref.shape[0]
    return {k: v / count for k, v in totals.items()}


def plot_history(data: dict, path: Path, points: list[dict] | None = None) -> None:
    """Left: best fitness per generation of every search row. Right: held-out ppl against fitness —
    the depth suite's successive parents (``tracking``), or ``points`` (the sparsity suite: one per
    row, ``{"pair", "kind", "fitness", "ppl"}``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for r in data["rows"]:
        hist = r.get("fitness_per_generation") or (r.get("details") or {}).get("history") \
            or (r.get("details") or {}).get("fitness_history")
        if hist:
            ax.plot([h["generation"] for h in hist], [h["best_fitness"] for h in hist], marker="o", ms=2, label=r["label"])
    ax.set_xlabel("generation")
    ax.set_ylabel("KL to the dense model (last stage's minibatch)")
    ax.set_yscale("log")
    if ax.get_lines():
        ax.legend(fontsize=6)
    ax.set_title("fitness per generation", fontsize=9)
    track = sorted(data.get("tracking", []), key=lambda t: t["generation"])
    if track:
        pooled = all("pool_kl" in t for t in track)
        key = "pool_kl" if pooled else "fitness"
        ax2.plot([t[key] for t in track], [t["ppl"] for t in track], marker="o", label="sublayer search's parents")
        for t in track:
            ax2.annotate(str(t["generation"]), (t[key], t["ppl"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if pooled:  # the rows on the same scale
            for i, r in enumerate(x for x in data["rows"] if "pool_kl" in x and "ppl" in x):
                ax2.scatter(r["pool_kl"], r["ppl"], marker="s^v*D"[i % 5], s=36, label=r["label"], zorder=3)
            ax2.legend(fontsize=6)
        ax2.set_xlabel("full KL to the dense model on all calibration tokens" if pooled
                       else "search fitness (KL on that generation's minibatch)")
        ax2.set_ylabel("held-out WikiText-2 ppl")
        ax2.set_title("held-out ppl of successive parents (label: generation)", fontsize=9)
    elif points:
        markers = {"uniform": "s", "owl": "^", "alphapruning": "v", "evopress": "o", "evopress seeded": "*"}
        pairs = list(dict.fromkeys(p["pair"] for p in points))
        colors = {pair: f"C{i}" for i, pair in enumerate(pairs)}
        for p in points:
            ax2.scatter(p["fitness"], p["ppl"], marker=markers.get(p["kind"], "o"), color=colors[p["pair"]],
                        s=40 if p["kind"] == "evopress seeded" else 22)
        for pair in pairs:  # one line per pair, by fitness
            pts = sorted((p["fitness"], p["ppl"]) for p in points if p["pair"] == pair)
            ax2.plot([a for a, _ in pts], [b for _, b in pts], color=colors[pair], lw=0.7, label=pair)
        for kind, mk in markers.items():
            ax2.scatter([], [], marker=mk, color="grey", label=kind)
        ax2.set_xscale("log")
        ax2.set_yscale("log")
        ax2.legend(fontsize=6)
        ax2.set_xlabel("search fitness (KL on the last stage's calibration tokens)")
        ax2.set_ylabel("held-out WikiText-2 ppl")
        ax2.set_title("held-out ppl against fitness (heuristics: KL as seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print("plot:", path)


# ---------------------------------------------------------------------------------------------- sparsity
def sparsity_configs(sparsities: list[float], pruners: list[str], options: dict) -> list[dict]:
    rows = []
    for s in sparsities:
        for pruner in pruners:
            rows += [
                {"label": f"uniform {pruner} {s:.0%}", "method": "uniform", "pruner": pruner, "sparsity": s},
                {"label": f"owl {pruner} {s:.0%}", "method": "owl", "pruner": pruner, "sparsity": s},
                {"label": f"alphapruning {pruner} {s:.0%}", "method": "alphapruning", "pruner": pruner, "sparsity": s,
                 "options": {"alpha_epsilon": 0.2}},
                {"label": f"evopress {pruner} {s:.0%}", "method": "evopress", "pruner": pruner, "sparsity": s,
                 "options": {**options, "seed_from": "uniform"}},
                {"label": f"evopress seeded {pruner} {s:.0%}", "method": "evopress", "pruner": pruner, "sparsity": s,
                 "options": {**options, "seed_from": "uniform,owl,alphapruning"}},
            ]
    return rows


#: sparsity_smollm2.py's labels for the heuristic rows
_ALLOCATION_LABELS = {"uniform": "{pruner} {s}", "owl": "owl+{pruner} {s}",
                      "alphapruning": "alphapruning+{pruner} {s} (alpha_epsilon=0.2)"}


def reusable_allocation_rows(args) -> dict[str, dict]:
    """Uniform / OWL / AlphaPruning rows that sparsity_smollm2.py measured with this protocol
    (calibration, eval windows, dtype): their ppl and prune time are reused, not measured again."""
    path = RESULTS / "sparsity_smollm2_allocation.json"
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    a = data["args"]
    same = (a.get("calib", "").endswith("sotu.jsonl") and a.get("nsamples") == args.sp_nsamples
            and a.get("seqlen") == args.sp_seqlen and a.get("eval_seqlen") == args.eval_seqlen
            and a.get("eval_windows") == args.eval_windows and a.get("dtype") == args.sp_dtype)
    if not same:
        return {}
    out = {}
    by_label = {r["label"]: r for r in data["rows"]}
    for s in (float(x) for x in args.sparsities.split(",")):
        for pruner in args.pruners.split(","):
            for method, fmt in _ALLOCATION_LABELS.items():
                theirs = by_label.get(fmt.format(pruner=pruner, s=f"{s:.0%}"))
                if theirs is not None and theirs.get("ppl") == theirs.get("ppl"):  # not NaN
                    out[f"{method} {pruner} {s:.0%}"] = {
                        "ppl": theirs["ppl"], "prune_s": round(theirs.get("prune_s", 0), 1),
                        "measured_sparsity": theirs.get("measured_sparsity"), "block_ratios": theirs.get("block_ratios"),
                        "eval_windows": theirs.get("eval_windows"), "eval_tokens": theirs.get("eval_tokens"),
                        "piqa": None, "reused_from": f"{path.name} ({theirs['label']})"}
    return out


def _progress_printer():
    """Plain progress lines (the run is logged to a file): every generation, every tenth database block."""
    t0 = time.perf_counter()

    def show(phase: str, done: int, total: int, label: str = "") -> None:
        if phase == "evopress" or (phase in ("level database", "measure") and (done % 10 == 0 or done == total)) \
                or (phase in ("fitness", "dense logits") and done == total):
            print(f"  [{time.perf_counter() - t0:7.0f}s] {phase} {done}/{total} {label}", flush=True)

    return show


def with_generation_fields(row: dict) -> dict:
    """An EvoPress row's fitness per generation (from the manifest's history; generation 0 = the best
    seed), its mean seconds per generation and its search time without the database pass."""
    d = row.get("details") or {}
    hist = d.get("fitness_history") or d.get("history") or []
    if row.get("method") != "evopress" or not hist:
        return row
    seeds = d.get("seed_fitness") or {}
    first = [{"generation": 0, "best_fitness": min(seeds.values()), "origin": d.get("seed_winner")}] if seeds else []
    row["fitness_per_generation"] = first + [
        {k: h.get(k) for k in ("generation", "best_fitness", "origin", "improved", "seconds")} for h in hist]
    row["generations_done"] = len(hist)
    row["generation_s_mean"] = round(sum(h.get("seconds", 0) for h in hist) / len(hist), 2)
    if row.get("search_s") is not None and row.get("database_s") is not None:
        row["search_without_database_s"] = round(row["search_s"] - row["database_s"], 1)
    db = d.get("database") or {}
    row.setdefault("database_build_s", db.get("build_s"))
    return row


def merge_rows(rows: "Rows", paths: list[Path]) -> None:
    """Rows measured by another process into another ``--out`` (same settings and evaluation) join
    ours: a label we lack, or lack ``ppl`` for, or a heuristic row they re-pruned and we did not."""
    for path in paths:
        theirs = json.loads(path.read_text())
        if theirs.get("settings") != rows.data["settings"] or theirs.get("evaluation") != rows.data.get("evaluation"):
            raise SystemExit(f"error: {path} was measured with other settings or evaluation; not merged")
        for r in theirs["rows"]:
            mine = rows.get(r["label"])
            if mine is None or ("ppl" not in mine and "ppl" in r) or (r.get("repruned") and not mine.get("repruned")):
                rows.put(dict(r, merged_from=path.name))
                print(f"merged {r['label']} from {path.name}", flush=True)


def _pair_plan(plan: list[dict], reuse: dict, reprune: bool) -> list[tuple[str, dict]]:
    """Per (sparsity, pruner): the reusable heuristic rows first (no work), then the EvoPress rows,
    then the heuristic rows pruned here (not reusable, or re-pruned for PIQA)."""
    out = []
    pairs = list(dict.fromkeys((c["sparsity"], c["pruner"]) for c in plan))
    for pair in pairs:
        cfgs = [c for c in plan if (c["sparsity"], c["pruner"]) == pair]
        heur = [c for c in cfgs if c["method"] != "evopress"]
        out += [("reuse", c) for c in heur if c["label"] in reuse]
        out += [("search", c) for c in cfgs if c["method"] == "evopress"]
        out += [("prune", c) for c in heur if c["label"] not in reuse or reprune]
    return out


def wikitext2_tail(tok, eval_seqlen: int, eval_windows: int) -> tuple[Path, dict]:
    """The in-domain diagnostic's calibration text (``--sp-calib wikitext2-tail``): WikiText-2 test
    from the first line break after the last character the held-out windows read (the first
    ``eval_windows × eval_seqlen`` tokens), so calibration and held-out text are disjoint passages of
    one corpus. Not the protocol (the papers calibrate on other text than they evaluate on): it tells
    whether the search's ranking carries to WikiText-2 when its fitness sees the same kind of text."""
    from compresskit.evaluation.perplexity import _wikitext2_text

    text, info = _wikitext2_text()
    enc = tok(text, return_offsets_mapping=True)
    last = eval_windows * eval_seqlen - 1
    end = enc["offset_mapping"][last][1]
    start = text.index("\n", end) + 1
    import tempfile

    fd, name = tempfile.mkstemp(prefix=f"compresskit-bench-wikitext2-tail-{eval_windows}x{eval_seqlen}-", suffix=".txt")
    with os.fdopen(fd, "w") as f:  # a new file of our own: nothing of anyone else's is overwritten
        f.write(text[start:])
    path = Path(name)
    return path, {**info, "held_out_chars": end, "calib_from_char": start, "calib_chars": len(text) - start,
                  "calib_tokens": sum(1 for first, _ in enc["offset_mapping"] if first >= start)}


def run_sparsity(args) -> dict:
    calib_path = shared_data_dir() / "corpora" / "sotu.jsonl"
    options = {k: v for k, v in {"schedule": args.schedule, "generations": args.generations, "offspring": args.offspring,
                                 "tokens": args.tokens, "survivors": args.survivors, "seed": args.search_seed}.items()
               if v is not None}
    settings = {"suite": "sparsity", "model": MODEL, "calib": "sotu.jsonl", "calib_format": "window",
                "nsamples": args.sp_nsamples, "seqlen": args.sp_seqlen, "evopress": options, "dtype": args.sp_dtype}
    tok = ids = None
    if args.sp_calib == "wikitext2-tail":
        _, tok = fresh(args.sp_dtype)
        calib_path, calib_info = wikitext2_tail(tok, args.eval_seqlen, args.eval_windows)
        settings.update(calib="wikitext2-tail", calib_info=calib_info)
    if args.seed_alpha_epsilon is not None:
        settings["seed_alpha_epsilon"] = args.seed_alpha_epsilon
    evaluation = {"eval_seqlen": args.eval_seqlen, "eval_windows": args.eval_windows, "piqa_limit": args.piqa_limit}
    out_path = args.out or RESULTS / "evopress_sparsity.json"
    rows = Rows(out_path, settings, evaluation)
    if args.merge_from:
        merge_rows(rows, [Path(p) for p in args.merge_from.split(",")])
    plan = sparsity_configs([float(s) for s in args.sparsities.split(",")], args.pruners.split(","), options)
    if args.seed_alpha_epsilon is not None:  # the seeded rows' AlphaPruning seed at the row's ε
        for cfg in plan:
            if "alphapruning" in cfg.get("options", {}).get("seed_from", ""):
                cfg["options"] = {**cfg["options"], "alpha_epsilon": args.seed_alpha_epsilon}
    reuse = reusable_allocation_rows(args) if args.sp_calib == "sotu" else {}
    reprune = args.reprune_heuristics == "always" or (args.reprune_heuristics == "auto" and args.piqa_limit > 0)
    todo = []
    for stage, cfg in _pair_plan(plan, reuse, reprune):
        if args.only and not any(s in cfg["label"] for s in args.only.split(",")):
            continue
        row = rows.get(cfg["label"])
        if stage == "prune" and row is not None and "ppl" in row and (row.get("repruned") or cfg["label"] not in reuse):
            continue
        if stage != "prune" and row is not None and "ppl" in row:
            continue
        todo.append((stage, cfg))
    if any(stage != "reuse" for stage, _ in todo):
        if tok is None:
            _, tok = fresh(args.sp_dtype)
        ids, info = perplexity_tokens(tok, "wikitext2", args.eval_seqlen)
        rows.data["wikitext2"] = info
    for stage, cfg in todo:
        if stage == "reuse":
            rows.put(dict(cfg, **reuse[cfg["label"]]))
            print(f"{cfg['label']:35s} ppl {reuse[cfg['label']]['ppl']:10.2f} (reused)", flush=True)
            continue
        print(f"{time.strftime('%H:%M:%S')} {cfg['label']}: {stage}", flush=True)
        reset_peak_rss()
        t0 = time.perf_counter()
        out = compresskit.prune(MODEL, cfg["method"], pruner=cfg["pruner"], sparsity=cfg["sparsity"],
                                calib=f"file:{calib_path}", nsamples=args.sp_nsamples, seqlen=args.sp_seqlen, seed=0,
                                device="cpu", dtype=args.sp_dtype, method_options=cfg.get("options"),
                                progress=_progress_printer())
        m = out.manifest
        # peak RSS of this row's prune / search (VmHWM reset before it); the process's since start beside it
        row = dict(cfg, prune_s=round(time.perf_counter() - t0, 1), peak_rss_mb=row_peak_rss_mb(),
                   process_peak_rss_mb=round(rss_mb(), 1),
                   measured_sparsity=m.sparsity.get("overall"), block_ratios=m.block_ratios)
        if cfg["method"] == "evopress":
            d = m.method_details
            db = d.get("database") or {}
            row.update(final_fitness=d.get("final_fitness"), seed_fitness=d.get("seed_fitness"),
                       seed_winner=d.get("seed_winner"), database_bytes=db.get("bytes"), database_reused=db.get("reused"),
                       database_key=db.get("key"), database_build_s=db.get("build_s"),
                       database_s=m.timings.get("database_s"), search_s=m.timings.get("search_s"),
                       tokens_seen=d.get("tokens_seen"), details=d)
            with_generation_fields(row)
        elif cfg["label"] in reuse:  # re-pruned for PIQA: the reused figure stays beside ours as a cross-check
            old = reuse[cfg["label"]]
            row.update(repruned=True, reused_ppl=old["ppl"], reused_prune_s=old["prune_s"],
                       reused_measured_sparsity=old["measured_sparsity"], cross_check_from=old["reused_from"])
        rows.put(evaluate_row(row, out.model, tok, ids, args))
        extra = f" (reused {row['reused_ppl']:.2f})" if row.get("repruned") else ""
        print(f"{cfg['label']:35s} ppl {row['ppl']:10.2f}{extra} piqa {row.get('piqa')} prune {row['prune_s']:8.1f}s "
              f"rss {row['peak_rss_mb']:.0f} MB", flush=True)
        del out
    for r in rows.data["rows"]:
        with_generation_fields(r)
    if rows.data["rows"]:
        rows.put(rows.data["rows"][-1])  # the derived fields, written
        plot_history(rows.data, out_path.with_suffix(".png"), points=sparsity_points(rows.data))
    return rows.data


def sparsity_points(data: dict) -> list[dict]:
    """(KL, held-out ppl) per row for the plot: EvoPress rows at their final fitness; heuristic rows at
    the fitness their allocation got as a seed of the same pair's seeded search (its level vector on
    the same calibration tokens) — unless the seed is another allocation than the row's: the
    AlphaPruning seed takes the largest feasible ε ≤ 0.3 (``seed_settings``), the row ε = 0.2."""
    points = []
    by_pair = {}
    for r in data["rows"]:
        if r.get("method") == "evopress" and r.get("seed_fitness"):
            key = (r["sparsity"], r["pruner"])
            if len(r["seed_fitness"]) > len(by_pair.get(key, ({}, {}))[0]):
                by_pair[key] = (r["seed_fitness"], (r.get("details") or {}).get("seed_settings") or {})
    for r in data["rows"]:
        if "ppl" not in r:
            continue
        pair = f"{r['pruner']} {r['sparsity']:.0%}"
        if r.get("method") == "evopress" and r.get("final_fitness") is not None:
            kind = "evopress seeded" if "seeded" in r["label"] else "evopress"
            points.append({"pair": pair, "kind": kind, "fitness": r["final_fitness"], "ppl": r["ppl"]})
        elif r.get("method") != "evopress":
            fit, seed_settings = by_pair.get((r["sparsity"], r["pruner"]), ({}, {}))
            kl = fit.get(r["method"])
            theirs = (seed_settings.get(r["method"]) or {}).get("alpha_epsilon")
            ours = (r.get("options") or {}).get("alpha_epsilon")
            if theirs is not None and ours is not None and abs(theirs - ours) > 1e-3:
                kl = None  # the seed was another allocation than this row's
            if kl is not None:
                points.append({"pair": pair, "kind": r["method"], "fitness": kl, "ppl": r["ppl"]})
    return points


def sparsity_table(data: dict) -> str:
    s = data["settings"]
    lines = [f"suite {s['suite']}: {json.dumps(s)}", f"evaluation: {json.dumps(data.get('evaluation'))}", "",
             "| row | ppl | reused ppl | PIQA | prune/search s | gens × s/gen | DB MB | DB build s (reused) | "
             "peak RSS MB | final KL | seed KL | winner | held-out KL |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    for r in data["rows"]:
        seeds = " / ".join(f"{k} {v:.3f}" for k, v in (r.get("seed_fitness") or {}).items())
        gens = f"{r['generations_done']} × {r['generation_s_mean']}" if r.get("generations_done") else "-"
        db = "-" if r.get("database_bytes") is None else f"{r['database_bytes'] / 2**20:.0f}"
        dbs = "-" if r.get("database_build_s") is None else f"{r['database_build_s']:.0f} ({'yes' if r.get('database_reused') else 'no'})"
        lines.append(f"| {r['label']} | {f(r.get('ppl'), '.2f')}{' (reused)' if r.get('reused_from') else ''} | "
                     f"{f(r.get('reused_ppl'), '.2f')} | {f(r.get('piqa'), '.3f')} | "
                     f"{r.get('search_s', r.get('prune_s'))} | {gens} | {db} | {dbs} | {r.get('peak_rss_mb', '-')} | "
                     f"{f(r.get('final_fitness'), '.4f')} | {seeds or '-'} | {r.get('seed_winner') or '-'} | "
                     f"{f(r.get('heldout_kl'), '.4f')} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- GPU, 7B shape
def run_shape(args) -> dict:
    """The depth search's paper schedule at Llama-2-7B's shape on CUDA (random bf16 weights: time and
    memory, not quality), plus the dead-sublayer check on CUDA. Needs only the repository (the
    tokenizer is tests/tiny_models' byte-level BPE, the calibration a generated text file)."""
    import sys
    import tempfile

    import transformers

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import _BASE, tiny_tokenizer

    assert torch.cuda.is_available(), "the shape suite needs CUDA"
    tok = tiny_tokenizer()
    tmp = Path(tempfile.mkdtemp(prefix="evopress-shape-"))
    text = tmp / "calib.txt"
    words = [w for w in (ROOT / "README.md").read_text().split() if w.isalpha()]
    import random as _random

    rng = _random.Random(0)
    text.write_text(" ".join(rng.choice(words) for _ in range(120_000)))
    record: dict = {"suite": "shape7b", "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                    "transformers": transformers.__version__}

    # 1. correctness on CUDA: a dead attention / MLP is what the search removes
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**{**_BASE, "num_hidden_layers": 4, "initializer_range": 0.2})
    small = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        small.model.layers[2].self_attn.o_proj.weight.zero_()
        small.model.layers[1].mlp.down_proj.weight.zero_()
    out = compresskit.prune(small, "evopress", tokenizer=tok, calib=f"file:{text}", calib_format="prefix", nsamples=4,
                            seqlen=32, device="cuda", method_options={"level": "sublayer", "remove": 0.25,
                                                                      "generations": 4, "offspring": 4,
                                                                      "tokens": "32,128", "survivors": "2,1"})
    d = out.manifest.method_details
    record["dead_sublayer_check"] = {"removed": sorted(f"{r['type']}{r['block']}" for r in d["removed"]),
                                     "final_fitness": d["final_fitness"]}
    print("dead sublayer check on CUDA:", record["dead_sublayer_check"], flush=True)

    # 2. Llama-2-7B shape, random bf16 weights, the paper schedule for --generations generations
    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    t0 = time.perf_counter()
    with torch.device("cuda"):
        big = transformers.LlamaForCausalLM._from_config(cfg, torch_dtype=torch.bfloat16).eval()
    record["init_s"] = round(time.perf_counter() - t0, 1)
    torch.cuda.reset_peak_memory_stats()
    options = {"level": "sublayer", "remove": 0.25, "schedule": "paper", "generations": args.generations or 2,
               "score_dtype": "model"}
    t0 = time.perf_counter()
    out = compresskit.prune(big, "evopress", tokenizer=tok, calib=f"file:{text}", calib_format="prefix",
                            nsamples=16, seqlen=2048, device="cuda", batch_size=4, method_options=options)
    d = out.manifest.method_details
    gens = d["history"]
    per_gen = sum(h["seconds"] for h in gens) / max(len(gens), 1)
    record.update(options=options, total_s=round(time.perf_counter() - t0, 1), timings=out.manifest.timings,
                  schedule=d["schedule"], kl=d["kl"], seconds_per_generation=round(per_gen, 2),
                  paper_generations=int(8 * (32 - 8) / 1.5),
                  projected_paper_min=round(per_gen * int(8 * (32 - 8) / 1.5) / 60, 1),
                  peak_gpu_gb=round(torch.cuda.max_memory_allocated() / 2**30, 1), peak_rss_mb=round(rss_mb(), 1),
                  history=gens, seed_fitness=d["seed_fitness"])
    print(json.dumps({k: v for k, v in record.items() if k != "history"}, indent=1), flush=True)
    (args.out or RESULTS / "evopress_shape7b.json").write_text(json.dumps(record, indent=1))
    return record


# ---------------------------------------------------------------------------------------------- report
def table(data: dict) -> str:
    s = data["settings"]
    lines = [f"suite {s['suite']}: {json.dumps(s)}", f"evaluation: {json.dumps(data.get('evaluation'))}", "",
             "| row | removed / allocation | params | WikiText-2 ppl | PIQA | search s | peak RSS MB | KL (search) | "
             "full KL, all calibration |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        what = " ".join(r.get("removed", [])) if r.get("removed") else (
            f"sparsity {r['measured_sparsity']:.4f}" if r.get("measured_sparsity") is not None else "-")
        search = r.get("search_s", r.get("prune_s"))
        lines.append(f"| {r['label']} | {what} | {r.get('params', 0):,} | {r.get('ppl', float('nan')):.2f} | "
                     f"{'-' if r.get('piqa') is None else format(r['piqa'], '.3f')} | {search if search is not None else '-'} | "
                     f"{r.get('peak_rss_mb', '-')} | {'-' if r.get('final_fitness') is None else format(r['final_fitness'], '.4g')} | "
                     f"{'-' if r.get('pool_kl') is None else format(r['pool_kl'], '.4f')} |")
    if data.get("tracking"):
        lines += ["", "sublayer search, successive parents: generation, KL on that generation's minibatch, "
                      "full KL on all calibration tokens, held-out ppl"]
        for t in sorted(data["tracking"], key=lambda t: t["generation"]):
            pool = "-" if t.get("pool_kl") is None else format(t["pool_kl"], ".4f")
            lines.append(f"  {t['generation']:4d}  {t['fitness']:.4g}  {pool}  {t['ppl']:.2f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=["depth", "sparsity", "shape7b"], default="depth")
    ap.add_argument("--nsamples", type=int, default=8, help="depth: calibration samples (prefix)")
    ap.add_argument("--seqlen", type=int, default=128, help="depth: calibration sample length")
    ap.add_argument("--sp-nsamples", type=int, default=32, help="sparsity: calibration windows")
    ap.add_argument("--sp-seqlen", type=int, default=512, help="sparsity: window length")
    ap.add_argument("--sp-calib", choices=["sotu", "wikitext2-tail"], default="sotu",
                    help="sparsity: calibration text; wikitext2-tail is an in-domain diagnostic, not the protocol "
                         "(WikiText-2 test after the held-out windows)")
    ap.add_argument("--heldout-kl", action="store_true",
                    help="also the full KL to the dense model on the held-out windows, per row (heldout_kl)")
    ap.add_argument("--seed-alpha-epsilon", type=float, default=None,
                    help="sparsity: the seeded rows' AlphaPruning seed ε (default: the method's, the largest "
                         "feasible <= 0.3; the AlphaPruning row uses 0.2)")
    ap.add_argument("--sp-dtype", default="bfloat16", help="sparsity: model dtype (sparsity_smollm2.py's)")
    ap.add_argument("--sparsities", default="0.7")
    ap.add_argument("--pruners", default="wanda")
    ap.add_argument("--schedule", default=None, help="sparsity: EvoPress schedule name (default: the method's)")
    ap.add_argument("--generations", type=int, default=None)
    ap.add_argument("--offspring", type=int, default=None)
    ap.add_argument("--block-generations", type=int, default=None, help="depth: generations of the block search "
                    "(default --generations)")
    ap.add_argument("--tokens", default=None)
    ap.add_argument("--survivors", default=None)
    ap.add_argument("--search-seed", type=int, default=0)
    ap.add_argument("--eval-seqlen", type=int, default=2048)
    ap.add_argument("--eval-windows", type=int, default=4)
    ap.add_argument("--piqa-limit", type=int, default=0)
    ap.add_argument("--track", type=int, default=5, help="depth: parents whose held-out ppl is measured")
    ap.add_argument("--eval-rows", default=None,
                    help="depth: evaluate only these rows (comma-separated labels; 'tracking' for the parents)")
    ap.add_argument("--levels", default="sublayer,block",
                    help="depth: the EvoPress searches this process runs (another process may run the others into "
                         "the same --out; rows are merged)")
    ap.add_argument("--finercut-json", type=Path, default=RESULTS / "finercut_smollm2.json")
    ap.add_argument("--only", default=None, help="sparsity: comma-separated label substrings")
    ap.add_argument("--reprune-heuristics", choices=["auto", "always", "never"], default="auto",
                    help="sparsity: prune the uniform/OWL/AlphaPruning rows again although sparsity_smollm2_allocation.json "
                         "has their ppl (a reused row has no model, hence no PIQA); the reused ppl stays beside the new one "
                         "as a cross-check. auto: when --piqa-limit > 0. They run after the pair's EvoPress rows.")
    ap.add_argument("--merge-from", default=None,
                    help="sparsity: comma-separated JSON files another process wrote (its own --out, same settings): "
                         "their rows join --out")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    if args.suite == "depth":
        args.generations = 20 if args.generations is None else args.generations
        args.offspring = 8 if args.offspring is None else args.offspring
        args.tokens = args.tokens or "128,1024"
        args.survivors = args.survivors or "2,1"
    torch.manual_seed(0)
    out = args.out or RESULTS / f"evopress_{args.suite}.json"
    if args.suite == "shape7b":
        run_shape(args)
        return
    if args.report_only:
        data = json.loads(out.read_text())
        if args.suite == "sparsity":
            for r in data["rows"]:
                with_generation_fields(r)
    else:
        data = run_depth(args) if args.suite == "depth" else run_sparsity(args)
    print(sparsity_table(data) if args.suite == "sparsity" else table(data))


if __name__ == "__main__":
    main()
