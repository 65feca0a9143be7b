"""Where compresskit finds shared offline data and keeps its caches.

``COMPRESSKIT_SHARED_DIR`` overrides the shared data folder (real texts, WikiText-2, PIQA, the
trained MoE models); by default it is ``../shared`` beside the repository checkout.
``COMPRESSKIT_CACHE_DIR`` overrides the cache (converted models, calibration samples, spectra).
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    env = os.environ.get("COMPRESSKIT_SHARED_DIR")
    if env:
        return Path(env).expanduser()
    return (REPO_ROOT.parent / "shared").resolve()


def shared_data_dir() -> Path:
    return shared_dir() / "data"


def shared_models_dir() -> Path:
    return shared_dir() / "models"


def cache_dir() -> Path:
    env = os.environ.get("COMPRESSKIT_CACHE_DIR")
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "compresskit"
    path.mkdir(parents=True, exist_ok=True)
    return path


def calibration_defs_dir() -> Path:
    """Declarative calibration sources / formats (YAML), package data of ``compresskit.calibration``
    (so a wheel install has them too); ``COMPRESSKIT_CALIBRATION_DIR`` overrides."""
    env = os.environ.get("COMPRESSKIT_CALIBRATION_DIR")
    return Path(env).expanduser() if env else Path(__file__).resolve().parent / "calibration" / "definitions"
