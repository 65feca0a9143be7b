"""Resumable training state and memory measurement for ``compresskit heal`` / ``finetune``.

The state holds only what the trained weights depend on: the trainable tensors, the AdamW state,
the step (the learning-rate schedule is a pure function of it) and the RNG state, plus the
settings and input checkpoint it belongs to so that a resume with other settings fails loudly
instead of silently mixing two runs. It is written to a temporary file and renamed, so a crash
while saving leaves the previous state intact.

Peak memory: on CUDA ``max_memory_allocated`` since a reset; on CPU the resident-set high-water
mark (``VmHWM``), reset through ``/proc/self/clear_refs`` where Linux allows it, otherwise the
whole process's peak (labelled as such).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError

STATE_VERSION = 1
STATE_FILE = "state.pt"
#: fp32 gradient (4 bytes) + AdamW's two fp32 moments (8 bytes) per trainable parameter.
BYTES_PER_TRAINABLE = 12


def state_dir_for(out: str | Path) -> Path:
    """``<out>.train-state/``: beside the output, never inside it (the output is written atomically)."""
    out = Path(out).expanduser().resolve()
    return out.parent / f"{out.name}.train-state"


def remove_train_state(directory: Path, *, strict: bool = True) -> None:
    """Delete the training state ``directory``: the files ``save_train_state`` writes (``state.pt``
    and its ``*.tmp`` temporaries), then the folder once empty. Nothing else in it is ever deleted:
    ``strict`` (``--force`` before a run) refuses with one line naming the first such entry; after a
    finished run (``strict=False``) those entries simply stay, with the folder."""
    directory = Path(directory)
    if directory.is_symlink() or not directory.is_dir():
        if strict:
            raise InputError(f"{directory} is not a training state folder; --force does not delete it: move it away")
        return
    entries = sorted(directory.iterdir())
    ours = [e for e in entries if e.is_file() and not e.is_symlink() and (e.name == STATE_FILE or e.name.endswith(".tmp"))]
    foreign = [e for e in entries if e not in ours]
    if foreign and strict:
        raise InputError(f"{directory} also holds {foreign[0].name}, which is not part of a training state; "
                         "--force never deletes it: move it away")
    try:
        for entry in ours:
            entry.unlink(missing_ok=True)
        if not foreign:
            directory.rmdir()
    except OSError as exc:
        if strict:
            raise InputError(f"cannot remove the training state {directory}: {exc.strerror or exc}") from None


def training_memory_bytes(trainable: int) -> int:
    """Gradient + optimizer-state bytes of ``trainable`` fp32 parameters under AdamW (weights and
    activations excluded): the part of training memory that LRC-only fine-tuning shrinks."""
    return BYTES_PER_TRAINABLE * trainable


def save_train_state(directory: Path, *, step: int, key: dict, source: str, factors: dict[str, torch.Tensor],
                     optimizer: torch.optim.Optimizer, losses: list[float], evals: list,
                     extra: dict | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    state = {
        "version": STATE_VERSION,
        "step": step,
        "key": key,
        "source": source,
        "factors": {name: t.detach().to("cpu", copy=True) for name, t in factors.items()},
        "optimizer": optimizer.state_dict(),
        "rng": rng,
        "losses": list(losses),
        "evals": list(evals),
        "extra": dict(extra or {}),  # e.g. healing's per-step loss parts
    }
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, directory / STATE_FILE)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return directory / STATE_FILE


def load_train_state(directory: Path, key: dict, source: str) -> dict[str, Any] | None:
    """The saved state, or None when there is none (a fresh start); errors if it belongs elsewhere."""
    path = directory / STATE_FILE
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise InputError(f"cannot read the training state {path} ({type(exc).__name__}); "
                         "delete it or pass --force to start over") from None
    if state.get("version") != STATE_VERSION:
        raise InputError(f"{path} was written by another compresskit version; pass --force to start over")
    if state["source"] != source:
        raise InputError(f"the training state in {directory} belongs to {state['source']}, not {source}; "
                         "pass --force to start over")
    for name, value in key.items():
        saved = state["key"].get(name)
        if (list(saved) if isinstance(saved, tuple) else saved) != (list(value) if isinstance(value, tuple) else value):
            raise InputError(f"the training state in {directory} used --{name.replace('_', '-')} {saved!r}, "
                             f"not {value!r}; resume with the same settings or pass --force to start over")
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state


def _proc_status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory of a stretch of work on ``device`` (bytes)."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.kind = ""
        self.baseline = 0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda_max_memory_allocated"
            self.baseline = torch.cuda.memory_allocated(self.device)
            return
        try:  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
            Path("/proc/self/clear_refs").write_text("5")
            self.kind = "cpu_rss_peak"
        except OSError:
            self.kind = "cpu_rss_peak_since_process_start"
        self.baseline = (_proc_status_kb("VmRSS") or 0) * 1024

    def stop(self) -> dict[str, Any]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            hwm = _proc_status_kb("VmHWM")
            if hwm is None:
                import resource

                hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                self.kind = "cpu_rss_peak_since_process_start"
            peak = hwm * 1024
        return {"kind": self.kind, "peak_bytes": int(peak), "baseline_bytes": int(self.baseline),
                "increase_bytes": int(max(0, peak - self.baseline))}
