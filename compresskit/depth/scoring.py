"""How far a candidate removal moves the model's output: distances over the calibration set.

FinerCut (methods.md §8.2) compares the vocabulary distributions of the pruned and the unpruned
model token by token. The reference logits ([nsamples, seqlen, vocab]) are computed once; each
candidate's logits are compared batch by batch and in row chunks, so at no time more than one
batch of candidate logits (and a chunk of their float64 copies) is in memory. The chunked sums
reproduce the whole-tensor values of ``analysis.distances`` exactly (up to summation order):
means over tokens are weighted by the tokens in each chunk, ``norm`` adds squared norms.
Under torchrun the sums and token counts of all ranks' batches are added before dividing
(``DistanceAccumulator.value``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable

import torch

from ..analysis.distances import DISTANCES, JS_FORMS, distance
from ..engine.distributed import all_reduce_floats

ROW_CHUNK = 64


def _chunks(ref: torch.Tensor, new: torch.Tensor, mask: torch.Tensor | None, rows: int = ROW_CHUNK):
    vocab = ref.shape[-1]
    if mask is not None:
        a, b = ref[mask.bool()], new[mask.bool()]
    else:
        a, b = ref.reshape(-1, vocab), new.reshape(-1, vocab)
    for start in range(0, a.shape[0], rows):
        yield a[start:start + rows], b[start:start + rows]


class DistanceAccumulator:
    """Accumulates one distance over (reference, candidate) logit batches.

    ``js`` / ``kl`` / ``angular``: the mean over real tokens (the code-form JS's extra ÷vocab is
    constant, so the mean over chunks weighted by rows equals the whole-tensor value). ``norm``:
    the Frobenius norm of all differences.
    """

    def __init__(self, name: str, js_form: str = "code"):
        if name not in DISTANCES:
            raise ValueError(f"unknown distance {name!r}; choose one of {DISTANCES}")
        if js_form not in JS_FORMS:
            raise ValueError(f"unknown js form {js_form!r}; choose one of {JS_FORMS}")
        self.name, self.js_form = name, js_form
        self.total = 0.0
        self.rows = 0

    def add(self, ref: torch.Tensor, new: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        for a, b in _chunks(ref, new, mask):
            n = a.shape[0]
            if n == 0:
                continue
            with warnings.catch_warnings():  # kl_div's note on reduction="mean": the code form means it
                warnings.simplefilter("ignore", UserWarning)
                value = float(distance(self.name, a, b, js_form=self.js_form))
            if self.name == "norm":
                self.total += value * value
            else:
                self.total += value * n
            self.rows += n

    def value(self) -> float:
        """The distance over all ranks' tokens (a collective under torchrun: every rank calls it).

        Data-parallel (``engine.distributed``): each rank's ``BlockReplay`` holds its share of
        the calibration batches, so ``total`` and ``rows`` are this rank's partial sums; they are
        summed over ranks in float64 (``all_reduce_floats``) and divided afterwards, so every
        rank gets the same distance and the greedy argmin picks the same candidate. One process:
        no reduction, the value is exactly as before.
        """
        total, rows = all_reduce_floats(self.total, self.rows)
        if self.name == "norm":
            return math.sqrt(total)
        return total / max(rows, 1)


def logits_distance(name: str, refs: Iterable[torch.Tensor], news: Iterable[torch.Tensor],
                    masks: Iterable[torch.Tensor | None], js_form: str = "code") -> float:
    """The distance between lists of logit batches (see :class:`DistanceAccumulator`)."""
    acc = DistanceAccumulator(name, js_form)
    for ref, new, mask in zip(refs, news, masks):
        acc.add(ref, new, mask)
    return acc.value()
