"""The samplers: pure functions from a seeded RNG and tokenized texts to token sequences.

They draw from the RNG in exactly the order of the reference code (Wanda/SparseGPT ``get_c4``;
Bandari et al. ``get_gsm8k`` and siblings), so a ``random.Random(seed)`` reproduces the papers'
``random.seed(seed)`` samples for the same tokenizer and data:

* window: ``randint(0, ndocs - 1)`` per draw until the document has MORE than ``seqlen`` tokens,
  then ``randint(0, ntokens - seqlen - 1)`` for the window start. A one-document corpus skips the
  document draw (the reference WikiText-2 sampler draws only the start).
* qa pairs: ``randint(0, nrecords - 1)`` per pair; each pair is tokenized on its own (every pair
  carries its own BOS when the tokenizer adds one) and the token lists are concatenated.
  ``k == 0`` (reference ``concat``): append pairs until longer than ``seqlen``, then a random
  window as above. ``k > 0`` (``--num_incontext k``): k pairs, stopping early once longer than
  ``seqlen``; the result is padded to ``seqlen`` or cut on the padding side (the reference's
  negative ``F.pad``).

* prefix (no RNG): the first ``nsamples·seqlen`` tokens of the non-empty documents joined with
  ``" "`` (FinerCut's reference, methods.md §8.2), read from a prefix of the join
  (:func:`first_tokens_of_join`) so a large corpus is never tokenized whole.

``tokens_of(i)`` is a callback so that documents are tokenized lazily, one at a time.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence

import torch

from compresskit.errors import CalibrationError

TokensOf = Callable[[int], Sequence[int]]

#: Draws allowed for one sample before giving up (C4 at 2048 tokens needs ~30 on average).
MAX_DRAWS_PER_SAMPLE = 20_000


def random_window(rng: random.Random, tokens: Sequence[int], seqlen: int) -> list[int]:
    """A ``seqlen`` window of a sequence longer than ``seqlen``; start in [0, len - seqlen - 1]."""
    start = rng.randint(0, len(tokens) - seqlen - 1)
    return list(tokens[start : start + seqlen])


def sample_document_windows(
    rng: random.Random,
    num_docs: int,
    tokens_of: TokensOf,
    nsamples: int,
    seqlen: int,
    label: str = "source",
    max_draws: int = MAX_DRAWS_PER_SAMPLE,
) -> tuple[list[list[int]], list[list[int]]]:
    """``nsamples`` windows of ``seqlen`` tokens from documents longer than ``seqlen``.

    Returns the windows and, per window, the index of its document. Raises a CalibrationError
    (instead of looping forever) once every document is known to be too short, or after
    ``max_draws`` draws for one sample.
    """
    lengths: dict[int, int] = {}  # doc index -> token count, for documents known to be too short
    samples, used = [], []
    for _ in range(nsamples):
        for _draw in range(max_draws):
            index = 0 if num_docs == 1 else rng.randint(0, num_docs - 1)
            if index in lengths:
                continue
            tokens = tokens_of(index)
            if len(tokens) > seqlen:
                break
            lengths[index] = len(tokens)
            if len(lengths) == num_docs:
                raise _too_short(label, num_docs, max(lengths.values()), seqlen, every=True)
        else:
            raise _too_short(label, num_docs, max(lengths.values(), default=0), seqlen, every=False, draws=max_draws)
        samples.append(random_window(rng, tokens, seqlen))
        used.append([index])
    return samples, used


def _too_short(label: str, num_docs: int, longest: int, seqlen: int, every: bool, draws: int = 0) -> CalibrationError:
    if every:
        scope = "its one document has" if num_docs == 1 else f"all {num_docs} documents have"
    else:
        scope = f"the documents of {draws} draws have"
    hint = f"use --seqlen {longest - 1} or less" if longest > 1 else "use longer documents"
    return CalibrationError(
        f"calibration source {label}: {scope} at most {longest} tokens, but a window needs more than "
        f"--seqlen {seqlen}; {hint}"
    )


def concatenate_pairs(
    rng: random.Random,
    num_records: int,
    tokens_of: TokensOf,
    seqlen: int,
    k: int,
    label: str = "source",
    max_draws: int = MAX_DRAWS_PER_SAMPLE,
) -> tuple[list[int], list[int]]:
    """One ICL sample: pairs appended until ``k`` pairs (k > 0) or until longer than ``seqlen``.

    With ``k == 0`` the result is a random ``seqlen`` window of the concatenation; with ``k > 0``
    it is the concatenation itself (the caller pads or cuts it). Returns tokens and record indices.
    """
    tokens: list[int] = []
    used: list[int] = []
    limit = k if k > 0 else max_draws
    while len(used) < limit:
        index = rng.randint(0, num_records - 1)
        used.append(index)
        tokens.extend(tokens_of(index))
        if len(tokens) > seqlen:
            break
    else:
        if k == 0:
            raise CalibrationError(
                f"calibration source {label}: {max_draws} question-answer pairs give only {len(tokens)} tokens; "
                "use a smaller --seqlen"
            )
    if k == 0:
        return random_window(rng, tokens, seqlen), used
    return tokens, used


#: Tokens of a prefix that are never kept, before the cut (a cut word, an appended end token).
PREFIX_MARGIN_TOKENS = 64


class _JoinReader:
    """The join of the non-empty texts of ``documents`` (``(index, text)`` pairs), read only as far
    as asked: ``prefix(chars)`` is the first ``chars`` characters of the full join, plus whether
    that is the whole of it. Empty and whitespace-only documents are skipped (the reference
    filters WikiText-2's empty lines before joining)."""

    def __init__(self, documents: Iterable[tuple[int, str]], sep: str):
        self._documents = iter(documents)
        self._sep = sep
        self._parts: list[str] = []
        self._length = 0
        self._starts: list[tuple[int, int]] = []  # (character offset in the join, record index)
        self.exhausted = False

    def _read_past(self, chars: int) -> None:
        # one character more than asked, so that "the join is longer than chars" is known
        while self._length <= chars and not self.exhausted:
            item = next(self._documents, None)
            if item is None:
                self.exhausted = True
                break
            index, text = item
            if not text.strip():
                continue
            if self._parts:
                self._parts.append(self._sep)
                self._length += len(self._sep)
            self._starts.append((self._length, index))
            self._parts.append(text)
            self._length += len(text)
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]

    def prefix(self, chars: int) -> tuple[str, bool]:
        self._read_past(chars)
        text = self._parts[0] if self._parts else ""
        return text[:chars], self.exhausted and chars >= len(text)

    def documents_in(self, chars: int) -> list[int]:
        """Record indices of the documents that start within the first ``chars`` characters."""
        return [index for start, index in self._starts if start < chars]

    @property
    def count(self) -> int:
        return len(self._starts)


def first_tokens_of_join(
    documents: Iterable[tuple[int, str]],
    tokenize: Callable[[str], Sequence[int]],
    count: int,
    label: str = "source",
    what: str = "",
    sep: str = " ",
    margin: int = PREFIX_MARGIN_TOKENS,
) -> tuple[list[int], list[int]]:
    """``tokenize(sep.join(non-empty texts))[:count]`` without tokenizing the whole join.

    Returns the tokens and the record indices of the documents the tokenized prefix covered.

    Why this is exact: a Hugging Face tokenizer normalizes and pre-tokenizes text into pieces
    (words with their leading space, whitespace runs, digit groups, punctuation) and encodes each
    piece on its own; the only other change is a start token (the same for any prefix) and an
    end token a post-processor may append. Cutting the text at character k therefore changes only
    the pieces that reach k — the last few tokens — and the appended end token. We keep tokens only
    when the prefix gives at least ``count + margin`` tokens, and accept ``tokens[:count]`` only
    when a second, longer cut gives the same ``count`` tokens: a piece long enough to reach back
    over ``margin`` tokens (one "word" of hundreds of tokens) would change with the cut and is
    caught, and the prefix then grows (at worst to the whole join, tokenized once as the reference
    does). Raises a one-line ``CalibrationError`` when the whole join has fewer than ``count`` tokens.
    """
    reader = _JoinReader(documents, sep)
    chars = 6 * (count + margin)  # ~4-5 characters a token in English: one try usually suffices
    agreed: list[int] | None = None  # the first `count` tokens of the previous cut
    while True:
        text, whole = reader.prefix(chars)
        tokens = list(tokenize(text))
        if whole:
            if len(tokens) < count:
                docs = "has no non-empty document" if reader.count == 0 else (
                    f"has only {len(tokens)} tokens (its {reader.count} non-empty document(s) joined)")
                raise CalibrationError(
                    f"calibration source {label} {docs}, but format 'prefix' needs {what or count} tokens; "
                    "use a longer source, fewer --nsamples or a shorter --seqlen"
                )
            return tokens[:count], reader.documents_in(len(text))
        if len(tokens) >= count + margin:
            if agreed is not None and agreed == tokens[:count]:
                return agreed, reader.documents_in(chars)
            agreed = tokens[:count]
            chars += chars // 4 + 256  # the confirming, longer cut
        else:
            chars *= 2


def pick_single(rng: random.Random, num_records: int, tokens_of: TokensOf) -> tuple[list[int], list[int]]:
    """One record per sample (``single`` and ``zero`` formats)."""
    index = rng.randint(0, num_records - 1)
    return list(tokens_of(index)), [index]


def fit_to_length(tokens: Sequence[int], seqlen: int, pad_id: int, side: str) -> tuple[list[int], int]:
    """Pad (or cut) on ``side`` to exactly ``seqlen`` tokens; returns tokens and the pad count."""
    if len(tokens) >= seqlen:
        kept = tokens[len(tokens) - seqlen :] if side == "left" else tokens[:seqlen]
        return list(kept), 0
    pad = [pad_id] * (seqlen - len(tokens))
    return (pad + list(tokens) if side == "left" else list(tokens) + pad), len(pad)


def stack_padded(
    sequences: Sequence[Sequence[int]], seqlen: int, pad_id: int, side: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``[n, seqlen]`` input ids and an attention mask (1 real, 0 pad), or None when nothing was padded."""
    rows, masks, padded = [], [], False
    for tokens in sequences:
        row, n_pad = fit_to_length(tokens, seqlen, pad_id, side)
        real = seqlen - n_pad
        rows.append(row)
        masks.append([0] * n_pad + [1] * real if side == "left" else [1] * real + [0] * n_pad)
        padded = padded or n_pad > 0
    ids = torch.tensor(rows, dtype=torch.long)
    mask = torch.tensor(masks, dtype=torch.long) if padded else None
    return ids, mask


def pad_token_id(tokenizer) -> int:
    """Pad with a token the vocabulary already has (methods.md §9.3: never resize embeddings):
    the tokenizer's pad token, else EOS, else UNK, else id 0. The attention mask marks pads."""
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0
