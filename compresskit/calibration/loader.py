"""``load_calibration``: spec + tokenizer -> ``CalibrationData`` (from the cache when possible).

A ``fallbacks`` source (``auto``) is resolved here: its candidates are tried in order, skipping
those that are unavailable (a file that does not exist, a Hub source while the Hub is
unreachable) or fail to load; the data says which one was used and why the others were skipped.
"""

from __future__ import annotations

import hashlib
import random
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from compresskit.calibration import cache, formats
from compresskit.calibration.corpus import Corpus, open_corpus
from compresskit.calibration.registry import SourceDefinition, expand_fallback, parse_source
from compresskit.calibration.spec import CalibrationSpec
from compresskit.errors import CalibrationError
from compresskit.calibration.readers import LOCAL_BUILDERS
from compresskit.hub import hub_reachable


@dataclass
class CalibrationData:
    """``input_ids [nsamples, seqlen]``; ``attention_mask`` (1 real, 0 pad) only if padded.

    ``hash`` identifies the samples (sha256 of the ids, 16 hex digits) for checkpoint manifests;
    ``source_info`` says where they came from (dataset / path, revision, record count, the
    record indices each sample used, the pad id).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    spec: CalibrationSpec
    hash: str
    source_info: dict[str, Any] = field(default_factory=dict)
    from_cache: bool = False

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def provenance(self) -> dict[str, Any]:
        """Manifest fields saying which data was really used, when the spec's ``source`` alone
        does not: the source a fallback chain chose (``source_used``, ``fallback_skipped``) and
        the label of shipped demo data (``source_label``). Empty for ordinary sources."""
        info = self.source_info
        out: dict[str, Any] = {}
        if info.get("requested"):
            out["source_used"] = info.get("used")
            out["fallback_skipped"] = list(info.get("skipped") or [])
        if info.get("label"):
            out["source_label"] = info["label"]
        return out


def samples_hash(input_ids: torch.Tensor) -> str:
    return hashlib.sha256(input_ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]


def _tokenizer_fn(tokenizer, text_of, keep: int | None):
    """Lazy tokenization of one text at a time (with the tokenizer's special tokens, as the
    reference's ``tokenizer(text)``), remembering the last ``keep`` results (all when None):
    a one-document corpus is tokenized once, while C4's thousands of drawn documents are not
    all held in memory (the sampler itself remembers which ones are too short)."""
    memo: OrderedDict[int, list[int]] = OrderedDict()

    def tokens_of(index: int) -> list[int]:
        if index in memo:
            memo.move_to_end(index)
        else:
            memo[index] = list(tokenizer(text_of(index), verbose=False)["input_ids"])
            if keep is not None and len(memo) > keep:
                memo.popitem(last=False)
        return memo[index]

    return tokens_of


def build_samples(spec: CalibrationSpec, corpus: Corpus, tokenizer) -> tuple[torch.Tensor, torch.Tensor | None, list]:
    """Draw the samples the spec asks for; returns ids, mask and the record indices per sample
    (``prefix``: one entry, the records whose joined text the tokenized prefix covered)."""
    rng = random.Random(spec.seed)
    if spec.format == "prefix":  # no RNG: the first nsamples·seqlen tokens of the joined documents
        _ = corpus.text_column  # fail before reading when the source has no text

        def tokenize(text: str) -> list[int]:  # with the special tokens, as the reference's tokenizer(text)
            return list(tokenizer(text, verbose=False)["input_ids"])

        count = spec.nsamples * spec.seqlen
        tokens, used = formats.first_tokens_of_join(
            corpus.row_texts(), tokenize, count, corpus.label,
            what=f"--nsamples {spec.nsamples} × --seqlen {spec.seqlen} = {count}",
        )
        return torch.tensor(tokens, dtype=torch.long).view(spec.nsamples, spec.seqlen), None, [used]
    if spec.format == "window":
        _ = corpus.text_column  # fail before drawing when the source has no text
        tokens_of = _tokenizer_fn(tokenizer, corpus.document, keep=4)
        windows, used = formats.sample_document_windows(
            rng, len(corpus), tokens_of, spec.nsamples, spec.seqlen, corpus.label
        )
        return torch.tensor(windows, dtype=torch.long), None, used

    corpus.check_format(spec.format)
    pair_tokens = _tokenizer_fn(tokenizer, lambda i: corpus.prompt(i, spec.format), keep=None)
    sequences, used = [], []
    for _ in range(spec.nsamples):
        if spec.format in ("icl", "cot"):
            tokens, indices = formats.concatenate_pairs(
                rng, len(corpus), pair_tokens, spec.seqlen, spec.num_incontext, corpus.label
            )
        else:
            tokens, indices = formats.pick_single(rng, len(corpus), pair_tokens)
        sequences.append(tokens)
        used.append(indices)
    ids, mask = formats.stack_padded(sequences, spec.seqlen, formats.pad_token_id(tokenizer), spec.pad_side)
    return ids, mask, used


def _source_info(corpus: Corpus, used: list, pad_id: int | None) -> dict[str, Any]:
    d = corpus.definition
    info: dict[str, Any] = {"source": d.name, "kind": d.kind, "num_documents": len(corpus)}
    if d.kind == "file":
        info["path"] = d.path
    else:
        info.update(dataset=d.dataset, config=d.config, split=d.split, revision=d.revision, data_files=d.data_files)
    if d.label:
        info["label"] = d.label
    info["sample_documents"] = used
    info["pad_token_id"] = pad_id
    return info


def load_calibration(spec: CalibrationSpec, tokenizer, use_cache: bool = True) -> CalibrationData:
    """Build (or read from the cache) the calibration samples of ``spec`` for ``tokenizer``.

    A cache hit reads neither the source file nor the hub. Errors: ``CalibrationError``
    (source missing / unreachable / unsuitable), ``InputError`` (invalid spec values).
    """
    definition = parse_source(spec.source, text_field=spec.text_field, schema=spec.schema)
    if definition.kind == "fallback":
        return _load_first_available(spec, definition, tokenizer, use_cache)
    key = spec.key(cache.tokenizer_identity(tokenizer), definition.fingerprint())
    stamp = cache.file_stamp(definition.path) if definition.kind == "file" else None
    if use_cache:
        entry = cache.read_entry(key, stamp)
        if entry is not None:
            return CalibrationData(
                input_ids=entry["input_ids"],
                attention_mask=entry["attention_mask"],
                spec=spec,
                hash=entry["hash"],
                source_info=dict(entry["source_info"]),
                from_cache=True,
            )
    corpus = open_corpus(definition)
    ids, mask, used = build_samples(spec, corpus, tokenizer)
    pad_id = formats.pad_token_id(tokenizer) if mask is not None else None
    data = CalibrationData(ids, mask, spec, samples_hash(ids), _source_info(corpus, used, pad_id))
    if use_cache:
        cache.write_entry(
            key,
            {
                "input_ids": ids,
                "attention_mask": mask,
                "hash": data.hash,
                "source_info": data.source_info,
                "spec": spec.to_dict(),
                "file_stamp": stamp,
            },
        )
    return data


def unavailable_reason(definition: SourceDefinition) -> str | None:
    """Why a fallback candidate cannot be used right now (None: try it). Reads no data."""

    if definition.kind == "file":
        return None if Path(definition.path or "").is_file() else f"no file at {definition.path}"
    if definition.kind == "hub" and definition.dataset not in LOCAL_BUILDERS and not hub_reachable():
        return "the Hugging Face Hub is unreachable"
    return None


def _load_first_available(spec: CalibrationSpec, chain: SourceDefinition, tokenizer, use_cache: bool) -> CalibrationData:
    skipped: list[str] = []
    for candidate in chain.fallbacks:
        source = expand_fallback(candidate)
        try:
            reason = unavailable_reason(parse_source(source, text_field=spec.text_field, schema=spec.schema))
            if reason is None:
                data = load_calibration(replace(spec, source=source), tokenizer, use_cache=use_cache)
        except CalibrationError as exc:
            reason = str(exc)
        if reason is not None:
            skipped.append(f"{source}: {reason}")
            continue
        data.spec = spec
        data.source_info = {**data.source_info, "requested": spec.source, "used": source, "skipped": skipped}
        return data
    raise CalibrationError(f"calibration source {spec.source!r}: none of its sources is available ({'; '.join(skipped)})")
