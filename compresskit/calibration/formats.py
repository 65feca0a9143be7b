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

``tokens_of(i)`` is a callback so that documents are tokenized lazily, one at a time.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

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
