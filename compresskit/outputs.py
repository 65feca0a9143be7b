"""Output-path safety: every command that writes checks its outputs here, before any compute.

An ``OutputGuard`` is given the paths a command reads (model directory, checkpoint, calibration
and perplexity files, task files, recipe, results files) and then each output it will write. An
output is refused with one line (``OutputError``, exit 2) when it

* is one of the inputs, contains one, or lies inside an input directory — except that results
  files (``*.json``, ``*.md``, ``*.png``, ``*.txt`` with names no loader reads) may go beside the
  weights of a compresskit checkpoint the command reads (``eval ck --json ck/eval.json``);
* is a file output naming a directory, or a directory output naming a file;
* is an existing file that compresskit did not write (see below), or was written by compresskit
  but is of another kind (``eval --json ck/compresskit.json``);
* is the same path as another output of the same command (``--json X --baseline-json X``);
* cannot be written: its nearest existing parent is not a writable directory;
* (directories) already exists: only with ``force``, and then only a compresskit checkpoint or an
  empty directory is replaced — never the current directory or one of its ancestors. A checkpoint
  is recognised by its manifest's content, not its name (``is_checkpoint_dir``), and is replaced only
  when everything in it is a file of the checkpoint layout (``CHECKPOINT_LAYOUT``) or an output
  compresskit recognises as its own: a foreign file inside it (notes, a script, a folder) refuses
  the replacement rather than being deleted with it (``check_replaceable``).

Every path an option reads is an input: ``option_inputs`` walks option values (method options
included), so a path option (``--from-order``) needs no registration of its own. Plots go through
``OutputGuard.png`` and are written with ``save_png``.

How compresskit recognises a file it wrote (content, not name):

* ``results`` JSON (``eval --json``, ``baseline.json``, run's ``eval.json``): a JSON object with
  ``schema_version`` and ``compresskit_version``;
* ``report`` JSON (run's ``report.json``): a JSON object with ``"written_by": "compresskit"``;
* ``markdown`` (``compare --out``, run's ``report.md``): first line ``<!-- written by compresskit -->``;
* ``png`` (``analyze --plot``): a ``tEXt`` chunk ``Software`` whose value starts with ``compresskit``.

``write_text`` writes a file atomically (temporary sibling + rename) and turns ``OSError`` (disk
full, permissions) into ``OutputError``. This module imports nothing of compresskit but ``errors``.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import socket
import struct
import tempfile
from pathlib import Path
from typing import Iterable

from .errors import OutputError

MANIFEST_NAME = "compresskit.json"  # the checkpoint manifest (checkpoint/manifest.py uses the same name)
MARKDOWN_MARKER = "<!-- written by compresskit -->"
PNG_SOFTWARE = "compresskit"
WRITTEN_BY = "compresskit"
KINDS = ("results", "report", "markdown", "png")
RESULT_SUFFIXES = {".json", ".md", ".png", ".txt"}
# Files in a model / checkpoint directory that transformers or compresskit read: never outputs.
_LOADER_FILES = {
    MANIFEST_NAME, "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.json",
    "preprocessor_config.json", "processor_config.json", "tokenizer.model",
}
_MAX_JSON_BYTES = 64 << 20
#: What a checkpoint directory holds (``save_checkpoint``: weights, index, config, tokenizer, manifest);
#: ``check_replaceable`` deletes nothing else but compresskit's own results files.
CHECKPOINT_LAYOUT = (
    MANIFEST_NAME, "config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
    "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
    "sentencepiece.bpe.model", "*.tiktoken", "chat_template.jinja", "chat_template.json",
    "preprocessor_config.json", "processor_config.json",
)
#: The manifest fields (and their JSON types) every compresskit checkpoint has.
_MANIFEST_FIELDS = {"format_version": int, "created": str, "base_model": str, "method": str, "versions": dict}
#: The ``Software`` text chunk of every PNG compresskit draws.
PNG_METADATA = {"Software": PNG_SOFTWARE}


def _abs(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


def _within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a compresskit checkpoint, by content: its ``compresskit.json`` is a JSON
    object with the manifest's fields and types, written by compresskit (``written_by``, or the
    compresskit version that ``versions`` records). Any file that is merely named so is not."""
    manifest = _json_object(Path(path) / MANIFEST_NAME) if Path(path).is_dir() else None
    if manifest is None:
        return False
    for name, kind in _MANIFEST_FIELDS.items():
        value = manifest.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            return False
    return str(manifest.get("written_by", "")).startswith(WRITTEN_BY) or "compresskit" in manifest["versions"]


_is_checkpoint_dir = is_checkpoint_dir


def _layout_file(entry: Path) -> bool:
    return entry.is_file() and not entry.is_symlink() and any(fnmatch.fnmatchcase(entry.name, p) for p in CHECKPOINT_LAYOUT)


def _own_output(entry: Path) -> bool:
    return entry.is_file() and not entry.is_symlink() and any(written_by_compresskit(entry, kind) for kind in KINDS)


def check_replaceable(out: Path, label: str | None = None) -> None:
    """Refuse (``OutputError``) to replace the existing directory ``out`` unless it is empty or a
    compresskit checkpoint holding only files of the checkpoint layout and compresskit's own
    results / reports / plots. Foreign files are never deleted with a checkpoint: the replacement is
    refused and the first such file named (move it away, or choose another directory)."""
    what = label or str(out)
    try:
        entries = sorted(out.iterdir())
    except OSError as exc:
        raise OutputError(f"cannot replace {what}: {exc.strerror or exc}") from None
    if not entries:
        return
    if not is_checkpoint_dir(out):
        raise OutputError(
            f"output {out} exists and is neither a compresskit checkpoint nor empty; choose a new directory "
            "(--force only replaces an earlier checkpoint)"
        )
    foreign = [e for e in entries if not (_layout_file(e) or _own_output(e))]
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise OutputError(
            f"output {out} is a compresskit checkpoint but also holds {foreign[0].name}{more}, which compresskit "
            "did not write; --force never deletes such files: move them away or choose a new directory"
        )


def option_inputs(*values) -> list[str]:
    """Every string or path inside option values (dicts, lists, tuples and sets walked), for an
    ``OutputGuard``'s inputs: a path that any option reads (``--calib file:...``, ``--from-order``,
    future path options of a method config) is then an input no output may be, hold or lie in,
    with no registration of its own. Strings naming no existing path are ignored by ``add_input``."""
    found: list[str] = []
    stack = list(values)
    while stack:
        value = stack.pop(0)
        if isinstance(value, dict):
            stack[:0] = list(value.values())
        elif isinstance(value, (list, tuple, set, frozenset)):
            stack[:0] = list(value)
        elif isinstance(value, (str, os.PathLike)):
            found.append(os.fspath(value))
    return found


def _describe_input(path: Path) -> str:
    if _is_checkpoint_dir(path):
        return "input checkpoint"
    if (path / "config.json").is_file():
        return "input model"
    return "input directory" if path.is_dir() else "input file"


# ----------------------------------------------------------------------------- recognising our files
def _json_object(path: Path) -> dict | None:
    try:
        if path.stat().st_size > _MAX_JSON_BYTES:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _png_software(path: Path) -> str | None:
    """The ``Software`` tEXt value of a PNG (chunks before the image data), else None."""
    try:
        with open(path, "rb") as fh:
            if fh.read(8) != b"\x89PNG\r\n\x1a\n":
                return None
            while True:
                head = fh.read(8)
                if len(head) < 8:
                    return None
                length, ctype = struct.unpack(">I4s", head)
                if ctype in (b"IDAT", b"IEND") or length > 1 << 20:
                    return None
                body = fh.read(length)
                fh.read(4)  # crc
                if ctype == b"tEXt" and b"\0" in body:
                    key, value = body.split(b"\0", 1)
                    if key == b"Software":
                        return value.decode("latin-1")
    except OSError:
        return None


def written_by_compresskit(path: str | os.PathLike, kind: str) -> bool:
    """Whether the existing file ``path`` is a compresskit output of ``kind`` (see the module docstring)."""
    path = Path(path)
    if kind == "results":
        data = _json_object(path)
        return data is not None and "schema_version" in data and "compresskit_version" in data
    if kind == "report":
        data = _json_object(path)
        return data is not None and str(data.get("written_by", "")).startswith(WRITTEN_BY)
    if kind == "markdown":
        try:
            with open(path, encoding="utf-8") as fh:
                return fh.readline().strip() == MARKDOWN_MARKER
        except (OSError, UnicodeDecodeError):
            return False
    if kind == "png":
        return (_png_software(path) or "").startswith(PNG_SOFTWARE)
    raise ValueError(f"unknown output kind {kind!r}; one of {KINDS}")


# ----------------------------------------------------------------------------- writability
def check_writable(path: Path, what: str) -> None:
    """The nearest existing parent of ``path`` must be a writable directory."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"cannot write {what} {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {what} {path}: {parent} is not writable")


# ----------------------------------------------------------------------------- the guard
class OutputGuard:
    """Collects a command's inputs, then checks each output against them and against each other."""

    def __init__(self, inputs: Iterable[str | os.PathLike | None] = ()):
        self.inputs: list[Path] = []
        self.outputs: dict[Path, tuple[str, bool]] = {}  # resolved path -> (how it was named, is a directory)
        for item in inputs:
            self.add_input(item)

    def add_input(self, item: str | os.PathLike | None) -> None:
        """A path the command reads; strings that are no existing local path (hub ids, dataset names,
        ``file:`` prefixes are stripped) are ignored."""
        if item is None:
            return
        text = str(item)
        text = text[len("file:"):] if text.startswith("file:") else text
        if not text or text == "-":
            return
        path = Path(text).expanduser()
        if path.exists():
            self.inputs.append(path.resolve())

    # -- shared checks
    def _claim(self, path: Path, label: str, is_dir: bool) -> None:
        """Two outputs may not be one path, nor one directory output inside another (a results
        file inside the command's own output directory is fine: run's eval.json)."""
        if path in self.outputs:
            raise OutputError(f"{label} and {self.outputs[path][0]} are the same path; give each output its own path")
        for other, (other_label, other_dir) in self.outputs.items():
            if is_dir and other_dir and (_within(path, other) or _within(other, path)):
                raise OutputError(f"{label} and {other_label} overlap; give each output its own directory")
        self.outputs[path] = (label, is_dir)

    def _against_inputs(self, path: Path, label: str, *, results_file: bool) -> None:
        for src in self.inputs:
            what = _describe_input(src)
            if path == src:
                raise OutputError(f"refusing to write {label}: it is the {what} {src}")
            if src in path.parents:
                if results_file and _is_checkpoint_dir(src) and self._results_name(path, src):
                    continue
                hint = " (only results files such as eval.json may go beside a checkpoint's weights)" \
                    if results_file and _is_checkpoint_dir(src) else ""
                raise OutputError(f"refusing to write {label}: it is inside the {what} {src}{hint}")
            if path in src.parents:
                raise OutputError(f"refusing to write {label}: it holds the {what} {src}")

    @staticmethod
    def _results_name(path: Path, checkpoint: Path) -> bool:
        if path.parent != checkpoint:
            return False
        name = path.name
        return path.suffix in RESULT_SUFFIXES and name not in _LOADER_FILES and not name.endswith(".index.json")

    # -- outputs
    def file(self, path: str | os.PathLike, *, kind: str, flag: str) -> Path:
        """A file output of ``kind`` (results | report | markdown | png), named on the command line as ``flag``."""
        if kind not in KINDS:
            raise ValueError(f"unknown output kind {kind!r}")
        out = _abs(path)
        label = f"{flag} {path}" if flag else str(path)
        self._against_inputs(out, label, results_file=True)
        if out.is_dir():
            raise OutputError(f"{label} is a directory; give a file path")
        if out.exists() and not written_by_compresskit(out, kind):
            raise OutputError(
                f"refusing to overwrite {out}: it exists and is not a compresskit {kind} file; remove it or choose another path"
            )
        check_writable(out, label.split(" ", 1)[0] if flag else "output")
        self._claim(out, label, is_dir=False)
        return out

    def directory(self, path: str | os.PathLike, *, force: bool, flag: str = "--out") -> Path:
        """A checkpoint-like output directory, replaced only with ``force`` and only when safe."""
        out = _abs(path)
        label = f"{flag} {path}" if flag else str(path)
        self._against_inputs(out, label, results_file=False)
        cwd = Path.cwd().resolve()
        if _within(cwd, out):
            raise OutputError(f"refusing to write {label}: it is the current directory or one of its parents")
        if out.exists() or out.is_symlink():
            if not out.is_dir():
                raise OutputError(f"output {out} exists and is not a directory")
            check_replaceable(out)
            if not force:
                raise OutputError(f"output {out} already exists; pass --force to replace it")
            check_writable(out, "output")
        else:
            check_writable(out, "output")
        self._claim(out, label, is_dir=True)
        return out

    def png(self, path: str | os.PathLike, *, flag: str = "--plot") -> Path:
        """The PNG file a ``--plot`` option will write (``analyze --plot``, ``inspect --plot``): a name
        without a suffix gets ``.png`` (callers report the real path), a directory or another suffix
        is refused, then the path is checked as a ``png`` file output (``file``)."""
        text = os.fspath(path)
        candidate = Path(text).expanduser()
        if candidate.is_dir() or text.endswith(("/", os.sep)):
            raise OutputError(f"{flag} {text} is a directory; give a PNG file such as "
                              f"{candidate.with_name(candidate.name + '.png')}")
        if not candidate.suffix:
            candidate = candidate.with_name(candidate.name + ".png")
        elif candidate.suffix.lower() != ".png":
            raise OutputError(f"{flag} writes a PNG image; give a .png file name, got {text}")
        return self.file(candidate, kind="png", flag=flag)


# ----------------------------------------------------------------------------- writing
def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` atomically (temporary sibling, then rename); ``OSError`` becomes ``OutputError``."""
    path = Path(path)

    def write(fh) -> None:
        fh.write(text.encode("utf-8"))
        fh.flush()
        os.fsync(fh.fileno())

    return _write_atomically(path, write, f"cannot write {path}")


def save_png(fig, path: str | os.PathLike, *, dpi: int = 110, flag: str = "--plot") -> Path:
    """Write a matplotlib figure as a PNG marked as compresskit's (``PNG_METADATA``), atomically
    (temporary sibling, then rename); ``OSError`` becomes one ``OutputError`` line."""
    path = Path(path)
    return _write_atomically(path, lambda fh: fig.savefig(fh, dpi=dpi, format="png", metadata=PNG_METADATA),
                             f"cannot write {flag} {path}")


def _write_atomically(path: Path, write, what: str) -> Path:
    """``write(binary file)`` into a temporary sibling of ``path``, then rename it into place with
    the umask's mode; nothing is left behind on failure, and ``OSError`` becomes one line ``what: reason``."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"{what}: {exc.strerror or exc}") from None
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise
    return path


def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: This host's name as it appears in compresskit's temporary names (``.NAME.tmp-HOST-PID-*``, spills).
HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


def remove_dead_process_dirs(root: Path, pattern: "re.Pattern[str]") -> list[Path]:
    """Delete the directories in ``root`` whose name matches ``pattern`` (group 1: a pid of this host)
    and whose process is gone: what a killed run left. A live process's (this one's included) and
    other hosts' (shared disks) are never touched."""
    removed = []
    try:
        entries = list(Path(root).iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = pattern.match(entry.name)
        if m is None or int(m.group(1)) == os.getpid() or pid_alive(int(m.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed

