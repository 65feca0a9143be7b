"""Progress for command modules (which must not import ``compresskit.cli``): one row per phase
(``measure``, ``prune``, ``ppl wikitext2``, ``finetune``, ...), always on stderr so stdout stays clean.

On a terminal each phase is a rich progress bar. When stderr is a file or a pipe (CI logs,
``| tee``) a bar would print nothing until the end, so plain lines are written instead, one per
item (block, window, step) but at most one per ``interval`` seconds per phase; the first and the
last item of a phase are always written::

    prune (wanda): 7/30 model.layers.6 · 12.4s

``enabled=False`` (``--quiet`` / ``--json``) prints nothing at all.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

#: At most one plain line per phase per this many seconds (the last item of a phase is always shown).
PLAIN_INTERVAL_S = 1.0


class PhaseProgress:
    def __init__(self, enabled: bool, *, eta: bool = False, interval: float = PLAIN_INTERVAL_S,
                 stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic):
        self.enabled = enabled
        self.eta = eta
        self.interval = interval
        self._stream = stream
        self._clock = clock
        self._progress = None
        self._plain = False
        self._tasks: dict[str, int] = {}
        self._started: dict[str, float] = {}
        self._last_line: dict[str, float] = {}
        self._last_done: dict[str, int] = {}
        self._finished: set[str] = set()

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stderr  # looked up now: tests redirect it

    def _is_terminal(self) -> bool:
        from .console import console

        if self._stream is not None:
            return bool(getattr(self._stream, "isatty", lambda: False)())
        return console(stderr=True).is_terminal

    def __enter__(self) -> PhaseProgress:
        if not self.enabled:
            return self
        if not self._is_terminal():
            self._plain = True
            return self
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        from .console import console

        columns = [TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[label]}", markup=False), TimeElapsedColumn()]
        if self.eta:
            columns.append(TimeRemainingColumn())
        self._progress = Progress(*columns, console=console(stderr=True))
        self._progress.__enter__()
        return self

    def __call__(self, phase: str, done: int, total: int, label: str = "") -> None:
        if self._plain:
            self._line(phase, done, total, label)
            return
        if self._progress is None:
            return
        if phase not in self._tasks:
            self._tasks[phase] = self._progress.add_task(phase, total=total, label=label)
        self._progress.update(self._tasks[phase], completed=done, total=total, label=label)

    def _line(self, phase: str, done: int, total: int, label: str) -> None:
        now = self._clock()
        previous = self._last_done.get(phase)
        if previous is not None and (done < previous or phase in self._finished):
            # the same phase again (the baseline's perplexity, then the checkpoint's): a new run
            self._finished.discard(phase)
            self._started.pop(phase, None)
            self._last_line.pop(phase, None)
        start = self._started.setdefault(phase, now)
        last = self._last_line.get(phase)
        self._last_done[phase] = done
        finished = bool(total) and done >= total
        if finished:
            self._finished.add(phase)
        if last is not None and not finished and now - last < self.interval:
            return
        self._last_line[phase] = now
        elapsed = now - start
        parts = [f"{phase}: {done}/{total}" if total else f"{phase}: {done}"]
        if label:
            parts.append(label)
        timing = f"{elapsed:.1f}s"
        if self.eta and total and 0 < done < total:
            timing += f", eta {elapsed / done * (total - done):.0f}s"
        text = " ".join(parts) + f" · {timing}"
        try:
            self.stream.write(text + "\n")
            self.stream.flush()
        except (BrokenPipeError, ValueError):  # a closed log pipe must not stop the work
            self._plain = False

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
