"""The search state on disk: ``<out>.search-state/state.json``, rewritten atomically every generation.

Beside the output, never inside it (the checkpoint is written atomically at the end). The file
holds the ``EvolutionState`` (the random generator's state included) and the *key* of the
search: everything its results depend on (model weights, database, levels, seeds, schedule
shape, search seed). ``--resume`` continues only a state with the same key; anything else is
one line naming the first setting that differs.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from ..errors import InputError
from .evolution import EvolutionState

STATE_VERSION = 1
STATE_FILE = "state.json"


def state_dir_for(out: str | Path) -> Path:
    out = Path(out).expanduser().resolve()
    return out.parent / f"{out.name}.search-state"


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=1)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_search_state(directory: Path, key: dict, state: EvolutionState, generations: int) -> Path:
    """Write ``state`` (``generations``: the run's total, so a finished search is recognised)."""
    path = Path(directory) / STATE_FILE
    write_json_atomic(path, {"version": STATE_VERSION, "key": json.loads(json.dumps(key, default=str)),
                             "generations": int(generations), "state": state.to_dict()})
    return path


def unfinished_search(directory: Path) -> bool:
    """Whether ``directory`` holds a search state that stopped before its last generation."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        return False
    try:
        data = json.loads(path.read_text())
        return int(data["state"]["generation"]) < int(data["generations"])
    except (OSError, ValueError, KeyError, TypeError):
        return True  # unreadable: never overwrite it silently


def load_search_state(directory: Path, key: dict) -> EvolutionState | None:
    """The saved state, None when there is none; ``InputError`` when it belongs to another search."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        state = EvolutionState.from_dict(data["state"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"cannot read the search state {path} ({type(exc).__name__}); delete it to start over") from None
    if data.get("version") != STATE_VERSION:
        raise InputError(f"{path} was written by another compresskit version; delete it to start over")
    saved = data.get("key", {})
    normal = json.loads(json.dumps(key, default=str))
    for name, value in normal.items():
        if saved.get(name) != value:
            raise InputError(f"the search state in {directory} was made with {name} {saved.get(name)!r}, not "
                             f"{value!r}: resume with the same settings, or delete {directory} to start over")
    return state


def remove_search_state(directory: Path) -> None:
    """Delete the state file (and the folder when nothing else is in it) after a finished search."""
    directory = Path(directory)
    (directory / STATE_FILE).unlink(missing_ok=True)
    for tmp in directory.glob(f".{STATE_FILE}.*.tmp") if directory.is_dir() else []:
        tmp.unlink(missing_ok=True)
    try:
        directory.rmdir()
    except OSError:
        pass
