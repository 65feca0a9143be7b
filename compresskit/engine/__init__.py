"""Sequential block-by-block execution over calibration data (see sequential.py)."""

from .capture import CapturedInputs, capture_block_inputs
from .collect import InputStatsCollector
from .sequential import BlockContext, RunTimings, SequentialRunner

__all__ = [
    "BlockContext",
    "CapturedInputs",
    "InputStatsCollector",
    "RunTimings",
    "SequentialRunner",
    "capture_block_inputs",
]
