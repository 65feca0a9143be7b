"""Harness for hostile-input tests: run one CLI row and prove nothing was written or changed.

Used by ``tests/test_hostile_inputs.py`` (faults, data loss) and ``tests/test_hostile_messages.py``
(wrong or misleading messages). Stable API:

* ``Row(id, args, exit_code=2, needle=None, setup=None, patch=None, cwd=None, watch=(), changes=False)``
  — one table row. ``args`` is a list whose string items may use ``{model}``, ``{ckpt}``,
  ``{tmp}``, ``{calib}``, ``{text}`` (paths of the ``Ctx``), or a callable ``ctx -> list``.
  ``setup(ctx)`` prepares files (it may return extra paths to watch); ``patch(monkeypatch, ctx)``
  injects faults; ``cwd`` (a placeholder string or callable) is the working directory of the run.
* ``Ctx(tmp, model, ckpt, calib, text)`` — a fresh ``tmp`` per row plus shared read-only inputs.
* ``run_row(row, ctx, monkeypatch=None) -> CliResult`` — runs the row through ``run_cli``, asserts
  the exit code, a one-line ``error:`` message (containing ``needle``), no traceback, and that
  every watched tree (the input model, the checkpoint, ``tmp``, every path named on the command
  line, or the nearest existing parent of a path that does not exist) hashes the same before and
  after (unless ``changes=True``).
* ``make_inputs(root, model) -> Ctx`` — shared inputs: calibration jsonl, text, a magnitude
  checkpoint, and as extra placeholders ``{welore}`` (a low-rank checkpoint) and ``{results}`` (an
  eval results JSON).
* ``run_checked(args, *, exit_code=2, needle=None, watch=(), cwd=None) -> CliResult`` — the same
  for a plain argument list, without a ``Ctx``.
* ``assert_one_error_line(res, exit_code=2, needle=None)``, ``tree_digest(path)``,
  ``snapshot(paths)``, ``watched_paths(args)``.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conftest import CliResult, run_cli

MAX_TREE_ENTRIES = 5000


@dataclass
class Ctx:
    """Paths a row may use. ``tmp`` is fresh per row; the others are shared and must stay unchanged."""

    tmp: Path
    model: Path | None = None  # a tiny model directory (config, safetensors, tokenizer)
    ckpt: Path | None = None  # a tiny compresskit checkpoint of ``model``
    calib: Path | None = None  # a small calibration jsonl
    text: Path | None = None  # a small perplexity text file
    extra: dict[str, Path] = field(default_factory=dict)  # more placeholders: {name}

    def placeholders(self) -> dict[str, str]:
        names = {"tmp": self.tmp, "model": self.model, "ckpt": self.ckpt, "calib": self.calib, "text": self.text,
                 **self.extra}
        return {k: str(v) for k, v in names.items() if v is not None}

    def format(self, value: Any) -> str:
        return str(value).format(**self.placeholders()) if isinstance(value, str) else str(value)


@dataclass
class Row:
    id: str
    args: Sequence[Any] | Callable[[Ctx], Sequence[Any]]
    exit_code: int = 2
    needle: str | None = None  # a substring of the one error line
    setup: Callable[[Ctx], Iterable[Path] | None] | None = None
    patch: Callable[[Any, Ctx], None] | None = None  # (monkeypatch, ctx)
    cwd: str | Callable[[Ctx], Path] | None = None
    watch: Sequence[str] = ()  # more paths (placeholders allowed) to hash before and after
    changes: bool = False  # the row is allowed to write (an "ok" control row)

    def __str__(self) -> str:  # pytest ids
        return self.id


# ----------------------------------------------------------------------------- shared inputs
CALIB_TEXT = "The committee met on a rainy Tuesday to discuss the budget, the harbour and the new school. "


def make_inputs(root: Path, model: Path) -> Ctx:
    """Shared inputs under ``root``: a calibration jsonl, a perplexity text file and a magnitude-50 %
    checkpoint of ``model`` (no calibration, so it builds in about a second). ``ctx.tmp`` is ``root``:
    replace it per row with ``dataclasses.replace(ctx, tmp=tmp_path)``."""
    import json

    import compresskit

    root.mkdir(parents=True, exist_ok=True)
    calib = root / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": f"{i}: " + CALIB_TEXT * 8}) + "\n" for i in range(8)))
    text = root / "val.txt"
    text.write_text(CALIB_TEXT * 40)
    ckpt = root / "ckpt"
    compresskit.prune(str(model), "magnitude", sparsity=0.5, out=ckpt, device="cpu")
    welore = root / "shared-welore"  # low-rank factors: a rank map in the manifest (a name other setups won't use)
    compresskit.prune(str(model), "welore", out=welore, device="cpu", method_options={"rank_reduction": 0.5})
    from compresskit.evaluation.results import EvalResult, ModelInfo, PerplexityResult

    results = root / "shared-dense.json"  # a results file (schema v1) for compare / --json rows
    EvalResult(model=ModelInfo(path="dense"), perplexity={
        "val": PerplexityResult(value=12.5, seqlen=16, n_windows=2, tokens=32)}).save(results)
    return Ctx(tmp=root, model=model, ckpt=ckpt, calib=calib, text=text,
               extra={"welore": welore, "results": results})


# ----------------------------------------------------------------------------- hashing
def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tree_digest(path: str | Path) -> dict[str, str]:
    """Relative path → kind, mode and content hash of everything under ``path`` (hidden files too)."""
    root = Path(path)
    out: dict[str, str] = {}
    try:
        st = root.lstat()
    except FileNotFoundError:
        return {".": "missing"}
    entries = [root]
    if stat.S_ISDIR(st.st_mode):
        entries += sorted(root.rglob("*"))
    if len(entries) > MAX_TREE_ENTRIES:
        raise AssertionError(f"{root} holds {len(entries)} entries: watch a smaller folder (use tmp paths)")
    for p in entries:
        rel = str(p.relative_to(root)) if p != root else "."
        s = p.lstat()
        mode = oct(stat.S_IMODE(s.st_mode))
        if stat.S_ISLNK(s.st_mode):
            out[rel] = f"link {os.readlink(p)}"
        elif stat.S_ISDIR(s.st_mode):
            out[rel] = f"dir {mode}"
        elif stat.S_ISREG(s.st_mode):
            try:
                out[rel] = f"file {mode} {_file_digest(p)}"
            except PermissionError:
                out[rel] = f"file {mode} unreadable {s.st_size} {s.st_mtime_ns}"
        else:
            out[rel] = f"other {mode}"
    return out


def snapshot(paths: Iterable[str | Path]) -> dict[str, dict[str, str]]:
    return {str(p): tree_digest(p) for p in dict.fromkeys(Path(p) for p in paths)}


def _path_like(arg: str) -> Path | None:
    text = arg.split("=", 1)[1] if arg.startswith("--") and "=" in arg else arg
    text = text.removeprefix("file:")
    if not text or text.startswith("-"):
        return None
    if os.sep not in text and not Path(text).exists():
        return None  # a plain word (method name, number), not a path
    return Path(text)


def watched_paths(args: Iterable[Any], cwd: Path | None = None) -> list[Path]:
    """Every path named on the command line: itself when it exists, else its nearest existing parent."""
    found: list[Path] = []
    for arg in args:
        p = _path_like(str(arg))
        if p is None:
            continue
        if not p.is_absolute():
            p = (cwd or Path.cwd()) / p
        p = Path(os.path.abspath(p))
        while not p.exists() and not p.is_symlink() and p != p.parent:
            p = p.parent
        if p == p.parent:
            continue  # nothing of it exists up to the root
        found.append(p)
    return found


# ----------------------------------------------------------------------------- assertions
def assert_one_error_line(res: CliResult, exit_code: int = 2, needle: str | None = None) -> str:
    """Exit code as expected, stderr exactly one ``error: ...`` line, no traceback. Returns the line."""
    assert res.exit_code == exit_code, (res.exit_code, res.stdout[-2000:], res.stderr[-4000:])
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{res.stderr}"
    assert lines[0].startswith("error: "), lines[0]
    if needle is not None:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def _compare(before: dict, after: dict) -> None:
    for root, tree in before.items():
        new = after[root]
        if tree != new:
            added = sorted(set(new) - set(tree))
            removed = sorted(set(tree) - set(new))
            changed = sorted(k for k in set(tree) & set(new) if tree[k] != new[k])
            raise AssertionError(f"{root} changed: added {added[:5]}, removed {removed[:5]}, changed {changed[:5]}")


def run_checked(args: Sequence[Any], *, exit_code: int = 2, needle: str | None = None, watch: Iterable[Path] = (),
                cwd: Path | None = None, changes: bool = False) -> CliResult:
    """Run ``compresskit *args``; assert a one-line error (for exit codes ≠ 0) and that nothing changed."""
    old_cwd = Path.cwd()
    args = [str(a) for a in args]
    paths = [*watch, *watched_paths(args, cwd)]
    before = snapshot(paths)
    try:
        if cwd is not None:
            os.chdir(cwd)
        res = run_cli(*args)
    finally:
        os.chdir(old_cwd)
    if exit_code == 0:
        assert res.exit_code == 0, (res.stdout[-2000:], res.stderr[-4000:])
    else:
        assert_one_error_line(res, exit_code, needle)
    if not changes:
        _compare(before, snapshot(paths))
    return res


def run_row(row: Row, ctx: Ctx, monkeypatch=None) -> CliResult:
    """Set up and run one table row (see the module docstring)."""
    made = row.setup(ctx) if row.setup is not None else None
    made = [made] if isinstance(made, (str, Path)) else list(made or [])
    extra = [p for p in made if isinstance(p, (str, Path))]  # setups may return a path, paths, or anything
    if row.patch is not None:
        assert monkeypatch is not None, f"row {row.id} patches: pass monkeypatch"
        row.patch(monkeypatch, ctx)
    args = row.args(ctx) if callable(row.args) else row.args
    args = [ctx.format(a) for a in args]
    cwd = row.cwd(ctx) if callable(row.cwd) else (Path(ctx.format(row.cwd)) if row.cwd else None)
    watch = [p for p in (ctx.model, ctx.ckpt, ctx.calib, ctx.text, ctx.tmp, *ctx.extra.values()) if p is not None]
    watch += [Path(ctx.format(w)) for w in row.watch] + [Path(p) for p in extra]
    return run_checked(args, exit_code=row.exit_code, needle=row.needle, watch=watch, cwd=cwd, changes=row.changes)
