"""lm-eval integration: local tasks score exactly what a direct log-likelihood computation gives.

The model is a seeded random tiny Llama driven by the real offline BPE tokenizer; the reference
numbers are computed here with plain ``model(ids).logits`` and lm-eval's definitions (context +
" " + choice split at the context's token count; acc_norm divides by the choice's character
length; rolling log-likelihood conditions the first token on the prefix token).
"""

from __future__ import annotations

import importlib.util
import json
import math
import re

import pytest
import torch

from compresskit import hub
from compresskit.errors import EvaluationError
from compresskit.evaluation.lmeval import (
    TaskRequest,
    expand_requests,
    normalise_task_result,
    parse_metrics,
    run_lm_eval,
)
from compresskit.evaluation.task_sets import load_task_sets, tasks_dir
from tiny_models import tiny_model, tiny_tokenizer
from conftest import needs_shared
from compresskit.paths import shared_data_dir


def _piqa_module():
    spec = importlib.util.spec_from_file_location("piqa_local_under_test", tasks_dir() / "piqa_local.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return tiny_model("llama", seed=0), tiny_tokenizer()


@torch.no_grad()
def _continuation_loglik(model, tok, context: str, continuation: str) -> float:
    whole = tok(context + continuation).input_ids
    n_ctx = len(tok(context).input_ids)
    logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), dim=-1)
    return sum(logp[pos - 1, whole[pos]].item() for pos in range(n_ctx, len(whole)))


# ----------------------------------------------------------------------------- PIQA
def test_piqa_local_equals_direct_loglikelihood(model_and_tokenizer):
    needs_shared(shared_data_dir() / "piqa" / "valid.jsonl")
    model, tok = model_and_tokenizer
    out = run_lm_eval(model, tok, "piqa_local", limit=8, batch_size=4, return_samples=True)

    rows = _piqa_module().read_piqa(_piqa_module().resolve_piqa_dir())[:8]
    acc = acc_norm = 0
    for row, sample in zip(rows, sorted(out["samples"]["piqa_local"], key=lambda s: s["doc_id"]), strict=True):
        context = f"Question: {row['goal']}\nAnswer:"
        lls = [_continuation_loglik(model, tok, context, " " + row[k]) for k in ("sol1", "sol2")]
        assert [r[0] for r in sample["resps"]] == pytest.approx(lls, rel=1e-5, abs=1e-3)
        normed = [ll / len(row[k]) for ll, k in zip(lls, ("sol1", "sol2"), strict=True)]
        acc += int(max(range(2), key=lls.__getitem__) == row["label"])
        acc_norm += int(max(range(2), key=normed.__getitem__) == row["label"])

    piqa = out["tasks"]["piqa_local"]
    assert piqa["metric"] == "acc"
    assert piqa["value"] == acc / 8
    assert piqa["metrics"]["acc_norm"]["value"] == acc_norm / 8
    assert piqa["stderr"] == pytest.approx(math.sqrt((acc / 8) * (1 - acc / 8) / 7))  # sample std / sqrt(n)
    assert (piqa["n"], piqa["fewshot"], piqa["limit"], piqa["version"]) == (8, 0, 8, "1.0")
    assert out["lm_eval_version"].startswith("0.4")


def test_piqa_loader_joins_labels_and_validates(tmp_path, monkeypatch):
    mod = _piqa_module()
    items = [{"goal": "g0", "sol1": "a", "sol2": "b"}, {"goal": "g1", "sol1": "c", "sol2": "d"}]
    (tmp_path / "valid.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    (tmp_path / "valid-labels.lst").write_text("1\n0\n")
    monkeypatch.setenv("COMPRESSKIT_PIQA_DIR", str(tmp_path))
    ds = mod.load_piqa(version=1.0)  # lm-eval passes the task metadata as keywords
    assert ds["validation"]["label"] == [1, 0]
    assert ds["validation"]["goal"] == ["g0", "g1"]

    (tmp_path / "valid-labels.lst").write_text("1\n")
    with pytest.raises(EvaluationError, match="2 questions but 1 labels"):
        mod.load_piqa()
    with pytest.raises(EvaluationError, match="COMPRESSKIT_PIQA_DIR"):
        mod.load_piqa(piqa_dir=str(tmp_path / "missing"))


# ----------------------------------------------------------------------------- rolling log-likelihood
ROLLING_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""


def test_rolling_task_equals_direct_nll(model_and_tokenizer, tmp_path):
    model, tok = model_and_tokenizer
    texts = [
        "Call me Ishmael. Some years ago, never mind how long precisely, I thought I would sail about.",
        "It is a way I have of driving off the spleen and regulating the circulation.\nWhenever I find myself grim",
    ]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    task_file = tmp_path / "tiny_rolling.yaml"
    task_file.write_text(ROLLING_YAML.format(name="tiny_rolling", data=data))

    out = run_lm_eval(model, tok, ["tiny_rolling"], task_files=[task_file], batch_size=2)

    total_ll = 0.0
    with torch.no_grad():
        for text in texts:
            ids = tok(text).input_ids
            assert len(ids) < model.config.max_position_embeddings  # one window: the whole text
            inp = torch.tensor([[tok.bos_token_id, *ids[:-1]]])  # lm-eval's prefix token, then the text
            logp = torch.log_softmax(model(inp).logits[0].float(), dim=-1)
            total_ll += logp[torch.arange(len(ids)), torch.tensor(ids)].sum().item()
    words = sum(len(re.split(r"\s+", t)) for t in texts)
    n_bytes = sum(len(t.encode()) for t in texts)

    res = out["tasks"]["tiny_rolling"]
    assert res["metric"] == "word_perplexity"
    assert res["value"] == pytest.approx(math.exp(-total_ll / words), rel=1e-4)
    assert res["metrics"]["bits_per_byte"]["value"] == pytest.approx(-total_ll / n_bytes / math.log(2), rel=1e-4)
    assert res["n"] == 2


# ----------------------------------------------------------------------------- errors
def test_unreadable_local_dataset_is_an_evaluation_error(model_and_tokenizer, tmp_path):
    model, tok = model_and_tokenizer
    task_file = tmp_path / "gone.yaml"
    task_file.write_text(ROLLING_YAML.format(name="gone_task", data=tmp_path / "missing.jsonl"))
    with pytest.raises(EvaluationError, match=r"'gone_task' could not be loaded.*--task-file"):
        run_lm_eval(model, tok, "gone_task", task_files=[task_file])


def test_unknown_and_hub_tasks_fail_fast_offline(model_and_tokenizer, monkeypatch):
    model, tok = model_and_tokenizer
    with pytest.raises(EvaluationError, match=r"unknown lm-eval task 'no_such_task_xyz'.*--task-file"):
        run_lm_eval(model, tok, "no_such_task_xyz")
    monkeypatch.setattr(hub, "offline_forced", lambda: False)
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(EvaluationError, match=r"'piqa' reads its data from the Hugging Face Hub.*--task-file"):
        run_lm_eval(model, tok, ["piqa_local", "piqa"])


# ----------------------------------------------------------------------------- sets and normalisation
def test_finercut_set_protocol_and_overrides():
    sets = load_task_sets()
    assert sets["zeroshot7"].task_names == [
        "boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa",
    ]
    assert len(sets["cdmoe8"].tasks) == 8
    reqs = {r.name: r for r in expand_requests("finercut9", sets=sets)}
    assert len(reqs) == 9
    assert (reqs["piqa"].fewshot, reqs["piqa"].limit, reqs["piqa"].metrics, reqs["piqa"].seed) == (
        0, 1000, ("acc_norm", "acc"), 42,
    )
    assert (reqs["mmlu"].fewshot, reqs["mmlu"].limit) == (5, 50)
    # explicit arguments override the set's protocol for every task
    reqs = {r.name: r for r in expand_requests(["finercut9"], sets=sets, limit=8, num_fewshot=0, seed=1)}
    assert (reqs["mmlu"].fewshot, reqs["mmlu"].limit, reqs["mmlu"].seed) == (0, 8, 1)
    # one task in two sets under one protocol runs once and remembers both sets
    both = {r.name: r for r in expand_requests("zeroshot7,cdmoe8", sets=sets)}
    assert len(both) == 9 and both["boolq"].sets == ("zeroshot7", "cdmoe8")
    conflict = (
        r"'openbookqa' is requested under two protocols "
        r"\(fewshot 0, limit None, seed 0 vs fewshot 0, limit 1000, seed 42\)"
    )
    with pytest.raises(EvaluationError, match=conflict):
        expand_requests(["zeroshot7", "finercut9"], sets=sets)


def test_parse_metrics_and_preference():
    entry = {"alias": "x", "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.6,
             "acc_norm_stderr,none": "N/A", "exact_match,strict-match": 0.25}
    assert parse_metrics(entry) == {
        "acc": {"value": 0.5, "stderr": 0.1},
        "acc_norm": {"value": 0.6, "stderr": None},
        "exact_match,strict-match": {"value": 0.25, "stderr": None},
    }
    raw = {"results": {"hellaswag": entry}, "versions": {"hellaswag": 1.0}, "n-shot": {"hellaswag": 0},
           "n-samples": {"hellaswag": {"original": 10042, "effective": 1000}}}
    finercut = TaskRequest("hellaswag", limit=1000, metrics=("acc_norm", "acc"))
    fc = normalise_task_result(raw, finercut, "hellaswag", ["hellaswag"])
    assert (fc["metric"], fc["value"], fc["n"], fc["version"]) == ("acc_norm", 0.6, 1000, "1.0")
    wanda = normalise_task_result(raw, TaskRequest("hellaswag", metrics=("acc",)), "hellaswag", ["hellaswag"])
    assert (wanda["metric"], wanda["value"], wanda["stderr"]) == ("acc", 0.5, 0.1)


def test_tag_without_aggregate_is_unweighted_mean_of_members():
    # FinerCut's "lambada" = mean of lambada_openai and lambada_standard (a tag in lm-eval 0.4.13)
    raw = {
        "results": {
            "lambada_openai": {"acc,none": 0.70, "perplexity,none": 4.0},
            "lambada_standard": {"acc,none": 0.60, "perplexity,none": 6.0},
        },
        "versions": {"lambada_openai": 1.0, "lambada_standard": 1.0},
        "n-samples": {"lambada_openai": {"effective": 1000}, "lambada_standard": {"effective": 1000}},
    }
    res = normalise_task_result(
        raw, TaskRequest("lambada", limit=1000, metrics=("acc_norm", "acc")), "lambada",
        ["lambada_openai", "lambada_standard"],
    )
    assert res["metric"] == "acc" and res["value"] == pytest.approx(0.65)
    assert res["aggregation"] == "mean-of-subtasks" and res["n"] == 2000
    assert res["subtasks"] == {"lambada_openai": 0.70, "lambada_standard": 0.60}
