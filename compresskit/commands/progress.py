"""Progress bars for command modules (which must not import ``compresskit.cli``): one row per
phase (``measure``, ``prune``, ``ppl wikitext2``, ...), drawn on stderr so stdout stays clean."""

from __future__ import annotations


class PhaseProgress:
    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._progress = None
        self._tasks: dict[str, int] = {}

    def __enter__(self) -> PhaseProgress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[label]}"), TimeElapsedColumn(), console=Console(stderr=True),
            )
            self._progress.__enter__()
        return self

    def __call__(self, phase: str, done: int, total: int, label: str = "") -> None:
        if self._progress is None:
            return
        if phase not in self._tasks:
            self._tasks[phase] = self._progress.add_task(phase, total=total, label=label)
        self._progress.update(self._tasks[phase], completed=done, total=total, label=label)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
