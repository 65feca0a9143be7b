"""Float32 matmul precision control.

The SparseGPT reference disables TF32 (``allow_tf32 = False``) for its Hessians and OBS updates:
TF32 keeps 10 mantissa bits, enough to make a near-singular damped Hessian's Cholesky fail and to
blur the small weight updates. The switch only affects CUDA, so the code path is identical on CPU.

torch >= 2.9 has two APIs for this flag, the legacy one (``set_float32_matmul_precision`` /
``allow_tf32``) and the per-backend ``torch.backends.cuda.matmul.fp32_precision``; once a program
has used the new one, the legacy getters raise ("mix of the legacy and new APIs"), and the other
way round. So we speak whichever API the caller's process already uses, and restore its value.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def full_fp32_matmul() -> Iterator[None]:
    """Run the block with TF32 off for float32 matmuls, restoring the caller's setting afterwards."""
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:  # the process already uses the per-backend API
        legacy = None
    if legacy is not None:
        torch.set_float32_matmul_precision("highest")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(legacy)
        return
    matmul = torch.backends.cuda.matmul
    previous = matmul.fp32_precision
    matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision = previous
