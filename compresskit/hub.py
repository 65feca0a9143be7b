"""Is the Hugging Face Hub reachable? Asked once per process, answered in at most a few seconds.

Offline machines must get a clear one-line error (and a hint at the local alternative) instead of
minutes of retries inside ``datasets`` / ``huggingface_hub``.
"""

from __future__ import annotations

import functools
import os
import socket

_TRUE = {"1", "true", "yes", "on"}


def offline_forced() -> bool:
    return any(os.environ.get(v, "").lower() in _TRUE for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


@functools.lru_cache(maxsize=1)
def _probe(host: str, timeout: float) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def hub_reachable(timeout: float = 3.0) -> bool:
    if offline_forced():
        return False
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    return _probe(host, timeout)
