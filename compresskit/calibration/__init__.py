"""Calibration data: sources x formats x seeded sampler x on-disk cache.

Sources and prompt frames are declared as YAML in the top-level ``calibration/`` folder
(``compresskit.paths.calibration_defs_dir()``); see ``definitions/README.md`` there.
"""

from __future__ import annotations

from compresskit.calibration.loader import CalibrationData, load_calibration
from compresskit.calibration.registry import SourceDefinition, available_sources, parse_source
from compresskit.calibration.spec import FORMATS, CalibrationSpec

__all__ = [
    "FORMATS",
    "CalibrationData",
    "CalibrationSpec",
    "SourceDefinition",
    "available_sources",
    "load_calibration",
    "parse_source",
]
