"""``compresskit eval`` / ``compresskit.evaluate``: a checkpoint scored through the CLI with a local
lm-eval task and a perplexity file gives the numbers of an independent computation, and the
results file round-trips through schema v1 with the checkpoint's manifest summary."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import compresskit
from compresskit.checkpoint import load_with_tokenizer
from compresskit.errors import InputError
from compresskit.evaluate import ppl_requests
from compresskit.evaluation.results import EvalResult
from compresskit.evaluation.task_sets import tasks_dir
from compresskit.models import load_model
from conftest import needs_shared
from compresskit.paths import shared_data_dir

PIQA_ITEMS = 4


@pytest.fixture(scope="module")
def checkpoint(tiny_model_dir, tmp_path_factory) -> Path:
    """Tiny Llama, magnitude 50% (no calibration needed), saved as a compresskit checkpoint."""
    out = tmp_path_factory.mktemp("eval") / "mag50"
    compresskit.prune(str(tiny_model_dir("llama")), "magnitude", sparsity=0.5, out=out, device="cpu")
    return out


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ppl") / "val.txt"
    path.write_text("It is a way I have of driving off the spleen and regulating the circulation. " * 30)
    return path


@torch.no_grad()
def _windowed_ppl(model, tok, text: str, seqlen: int) -> tuple[float, int]:
    """The papers' protocol written out: non-overlapping windows, CE · seqlen, remainder dropped."""
    ids = tok(text, return_tensors="pt").input_ids[0]
    n = ids.numel() // seqlen
    nll = 0.0
    for w in range(n):
        window = ids[w * seqlen : (w + 1) * seqlen]
        logp = torch.log_softmax(model(window[None]).logits[0].float(), -1)
        nll += -logp[:-1].gather(1, window[1:, None]).mean().item() * seqlen
    return math.exp(nll / (n * seqlen)), n


@torch.no_grad()
def _piqa_accuracy(model, tok, n: int) -> float:
    """lm-eval's multiple-choice rule on the first ``n`` PIQA items: argmax of the summed
    log-likelihood of " " + solution after "Question: <goal>\\nAnswer:"."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("piqa_local_for_eval_test", tasks_dir() / "piqa_local.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.read_piqa(module.resolve_piqa_dir())[:n]
    correct = 0
    for row in rows:
        context = f"Question: {row['goal']}\nAnswer:"
        scores = []
        for sol in (row["sol1"], row["sol2"]):
            whole = tok(context + " " + sol).input_ids
            n_ctx = len(tok(context).input_ids)
            logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
            scores.append(sum(logp[p - 1, whole[p]].item() for p in range(n_ctx, len(whole))))
        correct += int(max(range(2), key=scores.__getitem__) == row["label"])
    return correct / n


def test_eval_cli_local_task_and_ppl_file_round_trip(cli, checkpoint, text_file, tmp_path):
    needs_shared(shared_data_dir() / "piqa" / "valid.jsonl")
    out = tmp_path / "eval.json"
    res = cli("eval", checkpoint, "--task-file", tasks_dir() / "piqa_local.yaml", "--limit", str(PIQA_ITEMS),
              "--batch-size", "2", "--ppl-file", text_file, "--seqlen", "32", "--device", "cpu", "--quiet",
              "--json", out)
    assert res.exit_code == 0, res.stderr
    result = EvalResult.load(out)
    assert EvalResult.model_validate_json(out.read_text()) == result
    assert json.loads(out.read_text())["schema_version"] == 1

    model, tok = load_with_tokenizer(checkpoint)
    ppl, windows = _windowed_ppl(model, tok, text_file.read_text(), 32)
    p = result.perplexity["val"]  # a file is keyed by its stem
    assert (p.seqlen, p.n_windows, p.tokens) == (32, windows, 32 * windows)
    assert p.value == pytest.approx(ppl, rel=1e-4)

    piqa = result.tasks["piqa_local"]
    assert (piqa.metric, piqa.n, piqa.limit, piqa.version, piqa.fewshot) == ("acc", PIQA_ITEMS, PIQA_ITEMS, "1.0", 0)
    assert piqa.value == _piqa_accuracy(model, tok, PIQA_ITEMS)
    assert result.lm_eval_version.startswith("0.4")

    # the checkpoint's manifest travels with the numbers
    assert (result.model.path, result.model.method) == (str(checkpoint), "magnitude")
    assert result.model.manifest["sparsity"] == pytest.approx(0.5)
    assert result.model.manifest["hyperparameters"]["sparsity"] == 0.5
    assert (result.device, result.dtype) == ("cpu", "float32")


def test_eval_baseline_writes_both_and_compare_reads_them(cli, checkpoint, text_file, tiny_model_dir, tmp_path):
    out = tmp_path / "ckpt.json"
    res = cli("eval", checkpoint, "--baseline", "--ppl-file", text_file, "--seqlen", "32", "--device", "cpu",
              "--quiet", "--json", out)
    assert res.exit_code == 0, res.stderr
    result, dense = EvalResult.load(out), EvalResult.load(tmp_path / "ckpt.baseline.json")
    assert dense.model.path == str(tiny_model_dir("llama")) and dense.extra["baseline_of"] == str(checkpoint)
    model, tok = load_model(str(tiny_model_dir("llama")))
    assert dense.perplexity["val"].value == pytest.approx(_windowed_ppl(model, tok, text_file.read_text(), 32)[0],
                                                          rel=1e-4)
    assert dense.perplexity["val"].value != result.perplexity["val"].value

    res = cli("compare", tmp_path / "ckpt.baseline.json", out, "--markdown")
    assert res.exit_code == 0, res.stderr
    d, c = dense.perplexity["val"].value, result.perplexity["val"].value
    assert f"| val ppl (seqlen 32) | {d:.3f} | {c:.3f} | {c - d:+.3f} | {100 * (c - d) / d:+.1f}% | – |" in res.stdout

    # --json - prints both results on stdout
    res = cli("eval", checkpoint, "--baseline", "--ppl-file", text_file, "--seqlen", "32", "--max-windows", "1",
              "--device", "cpu", "--json", "-")
    both = json.loads(res.stdout)
    assert both["result"]["model"]["method"] == "magnitude" and both["baseline"]["model"]["manifest"] is None
    assert both["result"]["perplexity"]["val"]["n_windows"] == 1


def test_efficiency_figures(checkpoint, text_file):
    result = compresskit.evaluate(str(checkpoint), ppl_file=text_file, seqlen=32, max_windows=1, efficiency=True,
                                  device="cpu")
    eff = result.efficiency
    model = compresskit.load(checkpoint)
    assert eff.params_total == sum(p.numel() for p in model.parameters())
    linears = [m.weight for name, m in model.named_modules() if name.startswith("model.layers.")
               and isinstance(m, torch.nn.Linear)]
    assert eff.params_decoder_linear == sum(w.numel() for w in linears)
    assert eff.nonzeros_decoder_linear == sum(int((w != 0).sum()) for w in linears)
    assert eff.disk_bytes == (checkpoint / "model.safetensors").stat().st_size
    assert eff.timing_device == "cpu" and "cpu timing" in eff.note
    assert eff.prefill_tokens_per_s > 0 and eff.decode_tokens_per_s > 0


def test_ppl_request_names():
    assert ppl_requests("wikitext2,c4", ["data/val set.jsonl", "file:b.txt"]) == {
        "wikitext2": "wikitext2", "c4": "c4", "val_set": "file:data/val set.jsonl", "b": "file:b.txt"}
    with pytest.raises(InputError, match="both named 'val'"):
        ppl_requests(None, ["a/val.txt", "b/val.txt"])
    with pytest.raises(InputError, match="unknown perplexity dataset 'ptb'"):
        ppl_requests("ptb")


@pytest.mark.parametrize(
    "args, needle",
    [
        ([], "give a checkpoint directory or --model"),
        (["{ckpt}", "--limit", "lots"], "--limit must be a number"),
        (["{ckpt}", "--batch-size", "big", "--tasks", "piqa_local"], "--batch-size must be 'auto'"),
        (["{dense}", "--baseline"], "not a compresskit checkpoint"),
        (["{ckpt}", "--model", "{dense}"], "not both"),
        (["{ckpt}", "--ppl", "ptb"], "unknown perplexity dataset"),
    ],
)
def test_eval_bad_input(cli, checkpoint, tiny_model_dir, args, needle):
    args = [a.format(ckpt=checkpoint, dense=tiny_model_dir("llama")) for a in args]
    res = cli("eval", *args, "--device", "cpu")
    assert res.exit_code == 2, (res.stdout, res.stderr)
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], res.stderr
