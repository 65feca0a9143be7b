"""Is the Hugging Face Hub reachable? Asked once per process, answered in at most a few seconds.

Offline machines must get a clear one-line error (and a hint at the local alternative) instead of
minutes of retries inside ``datasets`` / ``huggingface_hub``. The calibration loader, model
loading, perplexity and lm-eval all ask here.
"""

from __future__ import annotations

import os
import socket
import threading
from urllib.parse import urlparse

_TRUE = {"1", "true", "yes", "on"}
CONNECT_TIMEOUT_S = 3.0
_probed: dict[str, bool] = {}


def offline_forced() -> bool:
    """HF_HUB_OFFLINE / HF_DATASETS_OFFLINE / TRANSFORMERS_OFFLINE, read now (huggingface_hub reads
    its own constant only at import, so both are consulted)."""
    if any(os.environ.get(v, "").strip().lower() in _TRUE
           for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return False


def _hub_host() -> tuple[str, int]:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    return parsed.hostname or "huggingface.co", parsed.port or (80 if parsed.scheme == "http" else 443)


def _probe(host: str, port: int, timeout: float) -> bool:
    """TCP connect in a daemon thread: ``create_connection``'s timeout does not bound DNS."""
    result = {"ok": False}

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result["ok"] = True
        except OSError:
            pass

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout)
    return result["ok"]


def hub_reachable(timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """False when offline mode is set or the Hub endpoint does not answer within ``timeout``."""
    if offline_forced():
        return False
    host, port = _hub_host()
    key = f"{host}:{port}"
    if key not in _probed:
        _probed[key] = _probe(host, port, timeout)
    return _probed[key]
