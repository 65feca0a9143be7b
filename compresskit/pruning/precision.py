"""Float32 matmul precision control.

The SparseGPT reference disables TF32 (``allow_tf32 = False``) for its Hessians and OBS updates:
TF32 keeps 10 mantissa bits, enough to make a near-singular damped Hessian's Cholesky fail and to
blur the small weight updates. ``torch.set_float32_matmul_precision("highest")`` is the documented
switch for the same flag; it only affects CUDA, so the code path is identical on CPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def full_fp32_matmul() -> Iterator[None]:
    """Run the block with TF32 off for float32 matmuls, restoring the caller's setting afterwards."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)
