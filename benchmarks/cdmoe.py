"""CD-MoE vs REAP vs dropping whole MoE layers on the two real MoE fixtures (CPU).

For each fixture (``../shared/models/{deepseek-v2-moe-25m,qwen2-moe-26m}``): one greedy search
(expert orders up to max(--ks), layer order up to max(--layers)) on the calibration text, then
every grid point is cut from those orders (``--from-order``, no new search):

* CD-MoE E(S+k) for k in --ks at every L in --layers, for every constant in --expert-weights
  (``routed``: the paper's avg_w, default; ``unconditional``: sum_w / all tokens, issue 21; one search
  each, ``--expert-stop`` applied to every search) (Qwen: ``--shared-gate exact``, the default, and
  ``--shared-gate constant``, the calibration-mean approximation, cut from the same orders);
* REAP at the same parameter budget: round(P / (MoE layers × expert params)) experts removed per
  layer (P = parameters CD-MoE removed; capped at E − top_k);
* dropping the MLP of whole MoE layers (a zero-output stub; the first layers of the greedy layer
  order) at the same budget: round(P / MoE-sublayer params) layers.

Held-out perplexity: the validation text of the fixtures' README / train.py (last 10 State of the
Union addresses + last 5 % of Moby Dick + last 300 GSM8K train items), texts joined by "\\n\\n"
(GSM8K items as question + "\\n" + answer), non-overlapping windows of 512 tokens (train.py's),
the first --val-windows windows. Parameters count tensors once; bytes on disk are the saved
safetensors files. Decode tokens/s: greedy generation with KV cache, batch 1, on CPU.

``--ft-steps N --ft-configs 0:4,4:6`` adds, for those (k, L) points, the CD-MoE checkpoint fine-tuned
with ``compresskit finetune`` (only the condensed experts trainable, as the reference's step 3) on the
fixtures' *training-side* texts: the SOTU addresses except the last 10, the first 95 % of Moby Dick,
the GSM8K train items except the last 300 (never the validation text). REAP and the dropped layers are
not fine-tuned (``finetune`` trains only condensed experts or low-rank factors), as in the paper's
comparison with pruning baselines.

    python benchmarks/cdmoe.py                                   # full grid
    python benchmarks/cdmoe.py --models deepseek --ks 0 2 --layers 2 6 --nsamples 4 --seqlen 128
    python benchmarks/cdmoe.py --expert-weights routed unconditional   # issue 21's k x L grid, both constants
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))

from compresskit import api  # noqa: E402
from compresskit.evaluation.sparsity import count_parameters  # noqa: E402
from compresskit.models import get_adapter, load_model  # noqa: E402
from compresskit.paths import shared_data_dir, shared_models_dir  # noqa: E402

FIXTURES = {"deepseek": "deepseek-v2-moe-25m", "qwen": "qwen2-moe-26m"}


def validation_text() -> str:
    data = shared_data_dir()
    sotu = [json.loads(line)["text"] for line in (data / "corpora" / "sotu.jsonl").read_text().splitlines() if line]
    moby = (data / "corpora" / "moby_dick.txt").read_text()
    gsm = [json.loads(line) for line in (data / "gsm8k" / "train.jsonl").read_text().splitlines() if line]
    parts = sotu[-10:] + [moby[int(len(moby) * 0.95):]] + [f"{g['question']}\n{g['answer']}" for g in gsm[-300:]]
    return "\n\n".join(parts)


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, windows: int, seqlen: int = 512) -> float:
    losses = []
    for w in range(min(windows, ids.numel() // seqlen)):
        x = ids[w * seqlen:(w + 1) * seqlen].unsqueeze(0).to(model.device)
        losses.append(float(model(x, labels=x).loss))
    return math.exp(sum(losses) / len(losses))


@torch.no_grad()
def decode_tps(model, prompt: torch.Tensor, new_tokens: int) -> float:
    model.generation_config.pad_token_id = 0
    prompt = prompt.to(model.device)
    model.generate(prompt, max_new_tokens=2, do_sample=False, use_cache=True)  # warm-up
    t0 = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True)
    return (out.shape[1] - prompt.shape[1]) / (time.perf_counter() - t0)


def disk_bytes(model, tokenizer) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return sum(f.stat().st_size for f in Path(tmp).glob("*.safetensors"))


class ZeroMLP(nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


def saved(path: str, method: str, tmp: str, device: str = "cpu", **kwargs):
    """Prune, save through compresskit's checkpoint writer, reload with compresskit.load: the figures
    are those of the checkpoint a user gets (bytes of its safetensors, ppl of the reloaded model)."""
    out = Path(tempfile.mkdtemp(dir=tmp)) / "ckpt"
    result = api.prune(path, method, device=device, out=out, **kwargs)
    form = result.manifest.method_details.get("form")
    del result
    model = api.load(out, device=device)
    model.eval()
    return model, out, form


def training_side_files(tmp: str) -> tuple[str, ...]:
    """The complement of validation_text(): what the fixtures were trained on, minus the held-out part."""
    data = shared_data_dir()
    sotu = [line for line in (data / "corpora" / "sotu.jsonl").read_text().splitlines() if line]
    moby = (data / "corpora" / "moby_dick.txt").read_text()
    gsm = [json.loads(line) for line in (data / "gsm8k" / "train.jsonl").read_text().splitlines() if line]
    files = {"sotu_train.jsonl": "\n".join(sotu[:-10]) + "\n",
             "moby_train.txt": moby[:int(len(moby) * 0.95)],
             "gsm8k_train.jsonl": "\n".join(json.dumps({"text": f"{g['question']}\n{g['answer']}"}) for g in gsm[:-300]) + "\n"}
    for name, text in files.items():
        (Path(tmp) / name).write_text(text)
    return tuple(f"file:{Path(tmp) / name}" for name in files)


def ft_settings(tmp: str, args):
    """The one fine-tuning setting of every "+ FT" row, CD-MoE's and the REAP control's."""
    from compresskit.heal.finetune import FinetuneSettings

    return FinetuneSettings(data=training_side_files(tmp), steps=args.ft_steps, lr=args.ft_lr,
                            batch_size=args.ft_batch, seqlen=args.ft_seqlen, save_every=args.ft_steps)


def finetuned(ckpt: Path, tmp: str, args):
    from compresskit.heal.finetune import finetune

    settings = ft_settings(tmp, args)
    out = Path(tempfile.mkdtemp(dir=tmp)) / "ft"
    outcome = finetune(ckpt, out, settings, device="cpu")
    d = outcome.manifest.method_details
    info = {"ft_steps": args.ft_steps, "ft_lr": args.ft_lr, "ft_batch": args.ft_batch, "ft_seqlen": args.ft_seqlen,
            "trainable_params": d.get("trainable_params"), "seconds_per_step": d.get("seconds_per_step"),
            "first_loss": outcome.losses[0], "last_loss": outcome.losses[-1]}
    del outcome
    model = api.load(out)
    model.eval()
    return model, out, info


def finetune_reap_in_memory(model, tok, tmp: str, args) -> dict:
    """The control for the fine-tuned CD-MoE rows: the REAP model's routed and shared experts of every
    MoE layer trainable (routers and everything else frozen), same data, steps, schedule and
    precision as ``compresskit finetune`` (fp32 on CPU, saved back in the checkpoint's dtype)."""
    from compresskit.heal.finetune import train_loop, training_windows

    settings = ft_settings(tmp, args)
    dtype = next(model.parameters()).dtype
    adapter = get_adapter(model)
    params = []
    for i in range(adapter.num_blocks):
        if adapter.is_moe(i):
            view = adapter.moe(i)
            frozen = {id(p) for m in (view.router, view.shared_expert_gate) if m is not None for p in m.parameters()}
            params += [p for p in view.module.parameters() if id(p) not in frozen]
    model.float()
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    model.config.use_cache = False
    model.train()
    ids, mask, _ = training_windows(settings, tok)
    t0 = time.perf_counter()
    _, losses = train_loop(model, params, ids, mask, settings, torch.device("cpu"))
    seconds = time.perf_counter() - t0
    model.eval().to(dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    model.config.use_cache = True
    return {"ft_steps": args.ft_steps, "ft_lr": args.ft_lr, "ft_batch": args.ft_batch, "ft_seqlen": args.ft_seqlen,
            "trainable_params": sum(p.numel() for p in params), "seconds_per_step": seconds / args.ft_steps,
            "first_loss": losses[0], "last_loss": losses[-1]}


def row(name, model, tok, ids, args, dense_params, prompt=None, ckpt: Path | None = None):
    params = count_parameters(model)
    nbytes = (sum(f.stat().st_size for f in ckpt.glob("*.safetensors")) if ckpt is not None
              else disk_bytes(model, tok))
    r = {"config": name, "params": params, "params_removed": dense_params - params,
         "bytes_on_disk": nbytes, "ppl": perplexity(model, ids, args.val_windows)}
    if prompt is not None:
        r["decode_tok_s"] = decode_tps(model, prompt, args.new_tokens)
    print(f"  {name:<28} params {params:>10,}  removed {r['params_removed']:>9,}  disk {r['bytes_on_disk']:>10,}  "
          f"ppl {r['ppl']:8.2f}" + (f"  decode {r['decode_tok_s']:.1f} tok/s" if prompt is not None else ""), flush=True)
    return r


def run_fixture(key: str, args, record: dict) -> dict:
    """Fill ``record`` (rows appended in place; ``args.save()`` after each, so a run that dies keeps them)."""
    path = str(shared_models_dir() / FIXTURES[key])
    calib = f"file:{args.calib}"
    model, tok = load_model(path, device=args.device)
    model.eval()
    ids = torch.tensor(tok(validation_text())["input_ids"])
    prompt = ids[:16].unsqueeze(0)
    dense_params = count_parameters(model)
    print(f"{key}: {FIXTURES[key]}  ({ids.numel()} validation tokens, {args.val_windows} windows of 512)", flush=True)
    rows = record.setdefault("rows", [])
    record["model"] = FIXTURES[key]
    rows.append(row("dense", model, tok, ids, args, dense_params, prompt))
    args.save()
    adapter = get_adapter(model)
    moe = [i for i in range(adapter.num_blocks) if adapter.is_moe(i)]
    view = adapter.moe(moe[0])
    expert_params = sum(t.numel() for t in (view.experts[0].gate, view.experts[0].up, view.experts[0].down))
    moe_params = sum(p.numel() for p in view.module.parameters())
    num_experts, top_k = view.num_experts, view.top_k
    del model, adapter, view

    with tempfile.TemporaryDirectory() as tmp:
        reap_rows, drop_rows = {}, {}
        for weight in args.expert_weights:  # one search per constant: the search weighs by what it folds
            orders_path = Path(tmp) / f"orders-{weight}.json"
            given = args.orders.get(f"{key}:{weight}")
            if given:  # an earlier run's search (its own timings are reported)
                orders = json.loads(Path(given).read_text())
                search_s = orders["timings"]["expert_search_s"] + orders["timings"]["layer_search_s"]
                print(f"  orders from {given} (searched earlier, --expert-weight {weight})", flush=True)
            else:
                t0 = time.perf_counter()
                search = api.prune(path, "cdmoe", calib=calib, nsamples=args.nsamples, seqlen=args.seqlen, device=args.device,
                                   method_options={"experts": max(args.ks), "layers": max(args.layers),
                                                   "expert_weight": weight, "expert_stop": args.expert_stop})
                search_s = time.perf_counter() - t0
                orders = search.manifest.method_details["orders"]
                del search
            orders_path.write_text(json.dumps(orders))
            if args.keep_orders:
                Path(args.keep_orders).mkdir(parents=True, exist_ok=True)
                name = f"{key}.json" if weight == "routed" else f"{key}-{weight}.json"
                (Path(args.keep_orders) / name).write_text(json.dumps(orders))
            print(f"  greedy search (--expert-weight {weight}, --expert-stop {args.expert_stop}): {search_s:.1f} s "
                  f"(experts {orders['timings']['expert_search_s']:.1f} s, layers {orders['timings']['layer_search_s']:.1f} s); "
                  f"layer order {orders['layer_order']}", flush=True)
            record.setdefault("searches", {})[weight] = dict(search_s=search_s, layer_order=orders["layer_order"],
                                                             expert_order=orders["expert_order"],
                                                             expert_stop=args.expert_stop)
            if weight == args.expert_weights[0]:
                record.update(search_s=search_s, layer_order=orders["layer_order"], expert_order=orders["expert_order"])
            tag = "" if args.expert_weights == ["routed"] and args.expert_stop == "budget" else f" w={weight}"
            gates = ["exact", "constant"] if key == "qwen" else ["exact"]
            for k in args.ks:
                for L in args.layers:
                    for gate in gates:
                        cm, ckpt, form = saved(path, "cdmoe", tmp, args.device, method_options={
                            "experts": k, "layers": L, "from_order": str(orders_path), "shared_gate": gate,
                            "expert_weight": weight})
                        last = k == max(args.ks) and L == max(args.layers)
                        label = f"CD-MoE E(S+{k}) L={L}{tag}" + (" const-gate" if gate == "constant" else "")
                        r = row(label, cm, tok, ids, args, dense_params, prompt if last else None, ckpt=ckpt)
                        r.update(method="cdmoe", k=k, L=L, shared_gate=gate, form=form, expert_weight=weight,
                                 expert_stop=args.expert_stop)
                        rows.append(r)
                        args.save()
                        del cm
                        if gate == "exact":
                            budget = r["params_removed"]
                            if args.ft_steps and (k, L) in args.ft_configs and "cdmoe" in args.ft_what:
                                fm, fckpt, info = finetuned(ckpt, tmp, args)
                                fr = row(f"{label} + FT {args.ft_steps} steps", fm, tok, ids, args, dense_params, ckpt=fckpt)
                                fr.update(method="cdmoe+finetune", k=k, L=L, shared_gate=gate, form=form,
                                          expert_weight=weight, expert_stop=args.expert_stop, **info)
                                rows.append(fr)
                                args.save()
                                del fm
                    budget_rows = []
                    n = min(num_experts - top_k, max(1, round(budget / (len(moe) * expert_params))))
                    if n not in reap_rows:
                        rm, ckpt, _ = saved(path, "reap", tmp, args.device, calib=calib, nsamples=args.nsamples,
                                            seqlen=args.seqlen, method_options={"remove_experts": n / num_experts})
                        reap_rows[n] = row(f"  REAP -{n}/{num_experts} experts", rm, tok, ids, args, dense_params,
                                           ckpt=ckpt)
                        del rm
                    else:
                        print(f"  REAP -{n}/{num_experts} experts: same as above", flush=True)
                    budget_rows.append(dict(reap_rows[n], method="reap", experts_removed_per_layer=n))
                    m = min(len(moe), max(1, round(budget / moe_params)))
                    if m not in drop_rows:
                        dropped, _ = load_model(path, device=args.device)
                        dropped.eval()
                        da = get_adapter(dropped)
                        order = orders["layer_order"] + [b for b in moe if b not in orders["layer_order"]]
                        for i in order[:m]:
                            da.block(i).mlp = ZeroMLP()
                        drop_rows[m] = row(f"  drop {m} MoE MLP(s)", dropped, tok, ids, args, dense_params)
                        del dropped, da
                    else:
                        print(f"  drop {m} MoE MLP(s): same as above", flush=True)
                    budget_rows.append(dict(drop_rows[m], method="drop_layers", layers_dropped=m))
                    if (args.ft_steps and (k, L) in args.ft_configs and "reap" in args.ft_what
                            and weight == args.expert_weights[0]):
                        rm, ckpt, _ = saved(path, "reap", tmp, calib=calib, nsamples=args.nsamples, seqlen=args.seqlen,
                                            method_options={"remove_experts": n / num_experts})
                        info = finetune_reap_in_memory(rm, tok, tmp, args)
                        budget_rows.append(dict(row(f"  REAP -{n}/{num_experts} + FT {args.ft_steps} steps", rm, tok, ids, args,
                                                    dense_params, ckpt=ckpt), method="reap+finetune",
                                                experts_removed_per_layer=n, **info))
                        del rm
                    for b in budget_rows:
                        b.update(k=k, L=L, budget_of=f"CD-MoE E(S+{k}) L={L}{tag}", expert_weight=weight)
                    rows.extend(budget_rows)
                    args.save()
    return record


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(FIXTURES), choices=list(FIXTURES))
    ap.add_argument("--ks", nargs="+", type=int, default=[0, 1, 2, 4])
    ap.add_argument("--layers", nargs="+", type=int, default=[2, 4, 6])
    ap.add_argument("--calib", default=None,
                    help="Calibration file (.txt/.jsonl); default: the SOTU addresses except the last 10 "
                         "(training-side text, never the validation texts).")
    ap.add_argument("--nsamples", type=int, default=100)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--val-windows", type=int, default=64, help="train.py evaluates 64 windows of 512.")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out", default=str(HERE / "results" / "cdmoe.json"))
    ap.add_argument("--orders", nargs="*", default=[], metavar="FIXTURE=JSON",
                    help="Reuse an earlier search's orders (written by --keep-orders) instead of searching again; "
                         "each file is used for the --expert-weight it records (older files: routed).")
    ap.add_argument("--expert-weights", nargs="+", default=["routed"], choices=["routed", "unconditional"],
                    help="CD-MoE constants to grid (one search each): routed = the paper's avg_w, unconditional = "
                         "sum_w / all tokens (issue 21).")
    ap.add_argument("--expert-stop", default="budget", choices=["budget", "objective"],
                    help="CD-MoE's greedy expert search: budget (the paper's) or objective (stop before an expert "
                         "that does not lower the search's distance).")
    ap.add_argument("--keep-orders", default=None, metavar="DIR", help="Write each fixture's orders JSON here.")
    ap.add_argument("--device", default="cpu",
                    help="Where searches, pruning and evaluation run (cpu, as every stored result unless its settings "
                         "say otherwise; cuda: decode tok/s is then the GPU's). Fine-tuning rows stay on cpu.")
    ap.add_argument("--ft-steps", type=int, default=0, help="Fine-tune these (k, L) points for N steps (0: none).")
    ap.add_argument("--ft-configs", default="0:4,4:6", help="k:L points to fine-tune, comma-separated.")
    ap.add_argument("--ft-what", default="cdmoe", help="What to fine-tune at --ft-configs: cdmoe, reap or cdmoe,reap "
                    "(REAP: its experts and shared experts in every MoE layer, in memory; the control for CD-MoE's).")
    ap.add_argument("--ft-lr", type=float, default=5e-5)
    ap.add_argument("--ft-batch", type=int, default=8, help="The reference's batch.")
    ap.add_argument("--ft-seqlen", type=int, default=256, help="The reference's max_length.")
    args = ap.parse_args(argv)
    args.ft_configs = {tuple(int(x) for x in c.split(":")) for c in args.ft_configs.split(",") if c}
    given = [item.split("=", 1) for item in args.orders]
    args.orders = {f'{fixture}:{json.loads(Path(path).read_text()).get("expert_weight", "routed")}': path
                   for fixture, path in given}
    torch.manual_seed(0)
    if args.calib is None:
        lines = (shared_data_dir() / "corpora" / "sotu.jsonl").read_text().splitlines()
        args.calib = str(Path(tempfile.mkdtemp()) / "sotu_train.jsonl")
        Path(args.calib).write_text("\n".join([line for line in lines if line][:-10]) + "\n")
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__, "device": args.device,
           "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
           "threads": torch.get_num_threads()}
    results = {"settings": {**vars(args), "ft_configs": sorted(args.ft_configs)}, "environment": env,
               "load_average_start": list(os.getloadavg()), "fixtures": []}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)

    def save():  # after every row, so a long run keeps what it finished
        results["load_average_end"] = list(os.getloadavg())
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")

    args.save = save
    for k in args.models:
        record: dict = {}
        results["fixtures"].append(record)
        run_fixture(k, args, record)
        save()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
