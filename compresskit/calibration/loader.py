"""``load_calibration``: spec + tokenizer -> ``CalibrationData`` (from the cache when possible)."""

from __future__ import annotations

import hashlib
import random
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from compresskit.calibration import cache, formats
from compresskit.calibration.corpus import Corpus, open_corpus
from compresskit.calibration.registry import parse_source
from compresskit.calibration.spec import CalibrationSpec


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
    """Draw the samples the spec asks for; returns ids, mask and the record indices per sample."""
    rng = random.Random(spec.seed)
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
    info["sample_documents"] = used
    info["pad_token_id"] = pad_id
    return info


def load_calibration(spec: CalibrationSpec, tokenizer, use_cache: bool = True) -> CalibrationData:
    """Build (or read from the cache) the calibration samples of ``spec`` for ``tokenizer``.

    A cache hit reads neither the source file nor the hub. Errors: ``CalibrationError``
    (source missing / unreachable / unsuitable), ``InputError`` (invalid spec values).
    """
    definition = parse_source(spec.source, text_field=spec.text_field, schema=spec.schema)
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
