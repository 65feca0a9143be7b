"""What calibration data to build: the `CalibrationSpec` value object and its cache key.

The defaults are the papers' protocol (Wanda / SparseGPT / OWL / AlphaPruning, methods.md §1.2):
128 random windows of 2048 tokens from C4, seed 0. The question-answer formats follow the
calibration-data study (Bandari et al. 2024, methods.md §9.1).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from typing import Any

from compresskit.errors import InputError

#: Bump when the sampling algorithm changes, so cached samples of older versions are not reused.
SAMPLER_VERSION = 1

#: ``window``: random token windows of documents (pre-training text).
#: ``prefix``: the FIRST nsamples·seqlen tokens of the non-empty documents joined with " " and
#: tokenized once, cut into rows (FinerCut's reference, methods.md §8.2; no sampling, no seed).
#: ``icl``: question-answer pairs concatenated (in-context learning); ``cot`` the same with
#: rationales; ``single``: one pair per sample; ``zero``: the question only.
FORMATS = ("window", "prefix", "icl", "cot", "single", "zero")
QA_FORMATS = ("icl", "cot", "single", "zero")
PAD_SIDES = ("left", "right")


@dataclass(frozen=True)
class CalibrationSpec:
    """Everything that decides which calibration samples are produced.

    ``num_incontext`` (icl / cot only): k pairs per sample, padded to ``seqlen``; 0 means the
    reference's default ``concat`` mode (pairs appended until the sequence is longer than
    ``seqlen``, then a random ``seqlen`` window, no padding).
    ``text_field`` overrides the text column of file / hf sources (auto-detected: ``text``).
    ``schema`` names a registered source whose question/answer field mapping is applied to a
    ``file:`` or ``hf:`` source (e.g. a local copy of GSM8K with ``schema="gsm8k"``).
    """

    source: str = "c4"
    format: str = "window"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    num_incontext: int = 5
    pad_side: str = "left"
    text_field: str | None = None
    schema: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source.strip():
            raise InputError("calibration source is empty; use e.g. c4, wikitext2 or file:PATH")
        if self.format not in FORMATS:
            raise InputError(f"unknown calibration format {self.format!r}; choose one of {', '.join(FORMATS)}")
        for name in ("nsamples", "seqlen"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"calibration {name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.num_incontext, int) or self.num_incontext < 0:
            raise InputError(f"num_incontext must be an integer >= 0 (0 = fill the window), got {self.num_incontext!r}")
        if self.pad_side not in PAD_SIDES:
            raise InputError(f"pad_side must be 'left' or 'right', got {self.pad_side!r}")

    @property
    def is_qa(self) -> bool:
        return self.format in QA_FORMATS

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for manifests and JSON output."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CalibrationSpec:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"unknown calibration field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**data)

    def sample_fields(self) -> dict[str, Any]:
        """The fields that change the samples; irrelevant ones are left out so caches are shared
        (``num_incontext`` / ``pad_side`` do nothing for ``window``, nor ``seed`` for ``prefix``,
        ``num_incontext`` nothing for ``single`` / ``zero``)."""
        data = self.to_dict()
        if self.format == "window":
            del data["num_incontext"], data["pad_side"]
        elif self.format == "prefix":
            del data["num_incontext"], data["pad_side"], data["seed"]
        elif self.format in ("single", "zero"):
            del data["num_incontext"]
        return data

    def key(self, tokenizer_id: str = "", source_id: str = "") -> str:
        """Short stable hash of the samples' recipe: the sample-changing fields, the tokenizer
        identity and the resolved source definition (both passed in at load time)."""
        payload = {
            "version": SAMPLER_VERSION,
            "spec": self.sample_fields(),
            "tokenizer": tokenizer_id,
            "source": source_id,
        }
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
