"""The terminal consoles of every command: user text is never rendered as markup or emoji.

Paths, model ids, calibration sources and error messages are user text: ``[bold]`` in a folder
name or ``:train:`` in ``hf:allenai/c4:en:train:text`` must print exactly as typed. Every console
(and so every table title and cell printed on it) therefore has rich markup, emoji codes and
highlighting off; output that wants a style builds a ``rich.text.Text``.
"""

from __future__ import annotations

from rich.console import Console


def console(stderr: bool = False) -> Console:
    """A console on stdout (or stderr) that prints strings literally."""
    return Console(stderr=stderr, markup=False, emoji=False, highlight=False)
