"""Perplexity exactly as the pruning papers compute it (methods.md §1.4, §11).

WikiText-2 test: rows joined with "\\n\\n", tokenized once, cut into non-overlapping windows of
``seqlen`` tokens, remainder dropped, no BOS inserted per window. Per window the mean
cross-entropy of logits[:-1] vs ids[1:] is multiplied by ``seqlen`` (not seqlen-1: the
references' choice, kept for parity), summed, divided by windows·seqlen, exponentiated.

C4 validation (SparseGPT, WeLore): the first 1100 validation documents joined with a space,
truncated to 256·seqlen tokens, then the same windows.

Offline, WikiText-2 comes from a local copy of the raw test file; that copy is ``"".join(rows)``,
not ``"\\n\\n".join(rows)``, so the join used is recorded next to every number.

``demo`` is a public-domain excerpt of Moby Dick shipped inside the package (a DEMO, not
WikiText-2; its results say so in ``source``). ``auto`` is the quickstart's explicit fallback:
WikiText-2 (Hub, else the local copy), else ``demo``; the result is keyed and labelled by the
dataset actually used and records ``requested: auto`` and why WikiText-2 was skipped. An explicit
``wikitext2`` never falls back.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..demo_data import PERPLEXITY_FILE, PERPLEXITY_LABEL
from ..errors import EvaluationError, InputError
from ..hub import hub_reachable
from ..models.context import check_token_ids
from ..paths import shared_data_dir

WIKITEXT2_LOCAL = "wikitext-2-raw/wiki.test.raw"
C4_VALIDATION_FILE = "en/c4-validation.00000-of-00008.json.gz"
C4_REVISION = "607bd4c8450a42878aa9ddc051a65a055450ef87"


def _wikitext2_text() -> tuple[str, dict]:
    env = os.environ.get("COMPRESSKIT_WIKITEXT2_FILE")
    path = Path(env) if env else shared_data_dir() / WIKITEXT2_LOCAL
    hub_problem = "unreachable"
    if env is None and hub_reachable():
        from datasets import load_dataset

        try:
            rows = load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1", split="test")["text"]
            return "\n\n".join(rows), {"source": "hub:Salesforce/wikitext:wikitext-2-raw-v1:test", "join": "\\n\\n"}
        except Exception as exc:  # noqa: BLE001 - datasets raises many types; the local copy may still serve
            hub_problem = f"failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    if not path.exists():
        raise EvaluationError(
            f"WikiText-2 needs the Hugging Face Hub ({hub_problem}) or a local copy at {path}; "
            "set COMPRESSKIT_WIKITEXT2_FILE or use --ppl-file"
        )
    return path.read_text(encoding="utf-8"), {"source": str(path), "join": "file as-is (\"\".join(rows))"}


def _c4_ids(tokenizer, seqlen: int) -> tuple[torch.Tensor, dict]:
    if not hub_reachable():
        raise EvaluationError("C4 validation perplexity needs the Hugging Face Hub, which is unreachable; use --ppl-file")
    from datasets import load_dataset

    docs = load_dataset("allenai/c4", data_files={"validation": C4_VALIDATION_FILE}, split="validation",
                        revision=C4_REVISION)
    text = " ".join(docs[:1100]["text"])
    ids = tokenizer(text, return_tensors="pt").input_ids[:, : 256 * seqlen]
    return ids, {"source": f"hub:allenai/c4:{C4_VALIDATION_FILE}@{C4_REVISION[:8]}", "join": "' ' (1100 docs, 256*seqlen tokens)"}


def _file_text(path: Path) -> tuple[str, dict]:
    if not path.exists():
        raise EvaluationError(f"perplexity file {path} does not exist")
    if path.suffix == ".jsonl":
        import json

        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                record = json.loads(line)
                if "text" not in record:
                    raise EvaluationError(f"{path}:{n}: jsonl perplexity files need a 'text' field")
                rows.append(record["text"])
        return "\n\n".join(rows), {"source": str(path), "join": "\\n\\n (jsonl 'text' rows)"}
    try:
        return path.read_text(encoding="utf-8"), {"source": str(path), "join": "file as-is"}
    except UnicodeDecodeError:
        raise EvaluationError(f"perplexity file {path} is not UTF-8 text") from None


def _demo_text() -> tuple[str, dict]:
    return PERPLEXITY_FILE.read_text(encoding="utf-8"), {"source": PERPLEXITY_LABEL, "join": "file as-is"}


def perplexity_tokens(tokenizer, dataset: str, seqlen: int) -> tuple[torch.Tensor, dict]:
    """Token ids [1, N] of a perplexity corpus and where they came from.

    ``info`` holds ``source`` and ``join``; for ``auto`` also ``dataset`` (the one used),
    ``requested`` and, when it fell back to the demo text, ``fallback`` (why)."""
    if dataset == "auto":
        try:
            ids, info = perplexity_tokens(tokenizer, "wikitext2", seqlen)
            return ids, {**info, "dataset": "wikitext2", "requested": "auto"}
        except EvaluationError as exc:
            ids, info = perplexity_tokens(tokenizer, "demo", seqlen)
            return ids, {**info, "dataset": "demo", "requested": "auto", "fallback": f"wikitext2: {exc}"}
    if dataset == "demo":
        text, info = _demo_text()
    elif dataset == "wikitext2":
        text, info = _wikitext2_text()
    elif dataset == "c4":
        return _c4_ids(tokenizer, seqlen)
    elif dataset.startswith("file:") or Path(dataset).suffix in {".txt", ".raw", ".jsonl"}:
        text, info = _file_text(Path(dataset.removeprefix("file:")).expanduser())
    else:
        raise EvaluationError(f"unknown perplexity dataset '{dataset}'; use wikitext2, c4, demo, auto or file:PATH")
    ids = tokenizer(text, return_tensors="pt").input_ids
    return ids, info


@torch.no_grad()
def windowed_perplexity(model, ids: torch.Tensor, seqlen: int, batch_size: int = 1, device=None,
                        max_windows: int | None = None,
                        progress: Callable[[int, int], None] | None = None) -> dict:
    """The papers' non-overlapping-window perplexity over ``ids`` [1, N]."""
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 1:
        raise InputError(f"--seqlen must be an integer >= 1, got {seqlen!r}")
    if max_windows is not None and (isinstance(max_windows, bool) or not isinstance(max_windows, int) or max_windows < 1):
        raise InputError(f"--max-windows must be an integer >= 1 (or omitted for all windows), got {max_windows!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"--ppl-batch-size must be an integer >= 1, got {batch_size!r}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    n_windows = ids.numel() // seqlen
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows < 1:
        raise EvaluationError(f"the text has {ids.numel()} tokens, fewer than one window of {seqlen}; use a smaller --seqlen")
    windows = ids[0, : n_windows * seqlen].view(n_windows, seqlen)
    check_token_ids(model, windows, "the perplexity text")
    nll_sum = 0.0
    t0 = time.perf_counter()
    for start in range(0, n_windows, batch_size):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        for row in range(batch.shape[0]):
            loss = F.cross_entropy(logits[row, :-1].float(), batch[row, 1:], reduction="mean")
            nll_sum += loss.item() * seqlen
        if progress is not None:
            progress(min(start + batch_size, n_windows), n_windows)
    ppl = math.exp(nll_sum / (n_windows * seqlen))
    return {
        "value": ppl,
        "seqlen": seqlen,
        "n_windows": n_windows,
        "tokens": n_windows * seqlen,
        "total_tokens": int(ids.numel()),
        "seconds": time.perf_counter() - t0,
    }


def perplexity(model, tokenizer, dataset: str = "wikitext2", seqlen: int = 2048, batch_size: int = 1, device=None,
               max_windows: int | None = None, progress=None) -> dict:
    ids, info = perplexity_tokens(tokenizer, dataset, seqlen)
    result = windowed_perplexity(model, ids, seqlen, batch_size=batch_size, device=device,
                                 max_windows=max_windows, progress=progress)
    result.update({"dataset": dataset, **info})
    return result
