"""Streaming input statistics for the pruners, fed by the engine's forward hooks (no hooks here).

Both statistics follow the reference ``add_batch`` (methods.md §2.2, §2.3): an input of shape
``[batch, seq, in]`` counts as ``batch`` samples, a 2-D ``[tokens, in]`` input as one sample.

The reference keeps a *running average* (rescale the old value by ``n/(n+b)``, then add the new
batch scaled by ``1/(n+b)``). That equals "total over all tokens / number of samples", which is
what we store: a sum and a sample count, divided once in ``value()``. Fewer roundings, same
number (tests check the equivalence against the reference loops).

Precision. Each batch's contribution is computed as the reference computes it (the input cast
to float32; SparseGPT's ``x xᵀ`` as one fp32 matmul with TF32 off; Wanda's ``Σ x²`` in float64,
a vector), and the contributions are summed over batches in **float64**; ``value()`` scales the
fp64 sum and casts it to float32 once. Why: under data parallelism (``engine.distributed``)
each rank sums its own batches and the rank sums are added with an fp64 ``all_reduce``. Adding
the same fp32 batch terms in another order changes an fp64 sum by ~1e-16 relative (usually not
at all: fp32 terms of similar magnitude add exactly in fp64), so the fp32 statistic is
bit-identical to one process's in practice. An fp32 running sum differed by ~1e-7 relative
between 1 and N processes, enough to flip SparseGPT decisions in bf16 models (a changed fp32
update flips a bf16 rounding of the weight, which changes the next block's inputs): 99.26 % of
mask entries agreed with 2 processes before, 100 % now.

Padding: the reference feeds every token, pad tokens included. ``add`` does the same unless a
``token_mask`` is given (``[batch, seq]``, True / 1 = real token, i.e. an ``attention_mask``);
masked tokens then contribute nothing, while the sample count is still the batch size, so a
padded sample weighs like any other. Whether to pass the mask is the engine's decision.
"""

from __future__ import annotations

import torch

from compresskit.pruning.precision import full_fp32_matmul


def _token_rows(x: torch.Tensor, in_features: int, token_mask: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """``x`` as float32 ``[tokens, in]`` with masked tokens zeroed, and its number of samples."""
    if x.shape[-1] != in_features:
        raise ValueError(f"input has {x.shape[-1]} features, the statistic expects {in_features}")
    samples = x.shape[0] if x.dim() >= 3 else 1
    rows = x.detach().reshape(-1, in_features).float()
    if token_mask is not None:
        keep = token_mask.detach().to(device=rows.device).reshape(-1).bool()
        if keep.numel() != rows.shape[0]:
            raise ValueError(
                f"token_mask has {keep.numel()} entries for {rows.shape[0]} tokens (input shape {tuple(x.shape)})"
            )
        # where(), not a product: a pad position holding inf/NaN must not leak in as 0 * inf.
        rows = torch.where(keep.unsqueeze(1), rows, rows.new_zeros(()))
    return rows, samples


class _InputStat:
    """A float64 running sum over calibration batches of some function of the input rows.

    Subclasses say what is summed (``_zeros``, ``_accumulate``) and how the sum becomes the
    statistic (``_scale``); counting samples, masking pads and the empty check live here once.
    """

    def __init__(self, in_features: int) -> None:
        self.in_features = in_features
        self.nsamples = 0
        self._total: torch.Tensor | None = None

    @torch.no_grad()
    def add(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> None:
        rows, samples = _token_rows(x, self.in_features, token_mask)
        if self._total is None:
            self._total = self._zeros(rows.device)
        self._accumulate(rows)
        self.nsamples += samples

    def running_sum(self, device: torch.device | str) -> torch.Tensor:
        """The float64 sum itself, for summing over data-parallel ranks (``engine.distributed``).

        Created as zeros on ``device`` if nothing was added (a rank whose tokens never reached
        this linear), so every rank can take part in the reduction. Sum it and ``nsamples`` over
        ranks, then ``value()`` is the statistic over all ranks' samples.
        """
        if self._total is None:
            self._total = self._zeros(torch.device(device))
        return self._total

    def value(self) -> torch.Tensor:
        """The statistic in float32: the fp64 sum times the scale, rounded to fp32 once."""
        if self._total is None or self.nsamples == 0:
            raise RuntimeError(f"{type(self).__name__}.value() called before any input was added")
        return (self._total * self._scale()).float()

    def _zeros(self, device: torch.device) -> torch.Tensor:
        raise NotImplementedError

    def _accumulate(self, rows: torch.Tensor) -> None:
        raise NotImplementedError

    def _scale(self) -> float:
        raise NotImplementedError


class SquaredNormStat(_InputStat):
    """Wanda's ``scaler_row``: per input column, mean over samples of ``sum_tokens x_j^2`` (fp32 value)."""

    def _zeros(self, device: torch.device) -> torch.Tensor:
        return torch.zeros(self.in_features, dtype=torch.float64, device=device)

    def _accumulate(self, rows: torch.Tensor) -> None:
        self._total += rows.double().square().sum(dim=0)

    def _scale(self) -> float:
        return 1.0 / self.nsamples


class HessianStat(_InputStat):
    """SparseGPT's ``H = (2 / nsamples) * sum_tokens x x^T``: per batch one fp32 ``xᵀx`` (TF32 off,
    as the reference), summed over batches in fp64; ``value()`` is fp32."""

    def _zeros(self, device: torch.device) -> torch.Tensor:
        return torch.zeros(self.in_features, self.in_features, dtype=torch.float64, device=device)

    def _accumulate(self, rows: torch.Tensor) -> None:
        with full_fp32_matmul():
            batch = rows.T @ rows
        self._total += batch

    def _scale(self) -> float:
        return 2.0 / self.nsamples
