"""Where the weights of a lazily loaded model live between uses, and how they come and go.

Design (the contract of ``models.placement.onload`` for a model whose blocks stay on disk):

* **Sources are tied to tensor objects, not module paths.** Every at-rest block tensor is a
  ``meta`` tensor carrying a :class:`LazyRef` (attribute ``_compresskit_lazy``) that names its
  bytes: an :class:`OriginalSource` (a recipe over the checkpoint's safetensors keys, converted
  exactly as ``from_pretrained`` converts them) or a :class:`SpillSource` (a tensor in a spill
  file). Methods may replace submodules, delete and renumber blocks or move modules around:
  the reference travels with the tensor, so nothing is looked up by name.
* **Materialise** (entering ``onload``): every meta tensor with a reference under the module is
  read onto the device as a *new* Parameter / buffer; tensors that were already real (modules a
  method built in memory) are moved to the device like ``module.to`` would.
* **Release** (leaving ``onload``, also after an exception): every real tensor under the module
  goes back to ``meta``. A tensor is released to its *original* reference only when it is
  provably unchanged: the very object that was materialised, same ``_version``, same dtype and
  shape and bit-identical to the pristine read it was copied from (kept by the session until
  release: a version check alone is not enough, because pruners write through ``weight.data``,
  which bumps no version counter; keeping the read instead of reading the source again halves
  the disk reads and conversions of a block; the peak is still two copies of one block, now
  held while the block is in use rather than only while it is released). Anything else — an
  in-place edit, a replaced submodule's new tensors, tensors of a module built in memory — is *spilled*: written
  to a safetensors file in a private temporary directory and re-pointed there. So a change is
  never silently reloaded from the original, and host memory holds about one block at a time.
  Tensors that were real before the context (moved, not materialised) return to their home
  device unchanged.

**The sources must not change underneath.** Before a block's first read from the checkpoint,
the store asks the loader to confirm its weight files are the ones it opened (size, modification
time, inode: ``models.lazy._Files.check_unchanged``); a shard overwritten during the run stops it
with one line instead of mixing old and new weights. A spill that cannot be written (disk full, a
folder that cannot be created) is one line too; either way the spills made so far are deleted.

Spill files are reference-counted and deleted when nothing points to them any more. The spill
directory (``.compresskit-spill-HOST-PID-*``, made at the first spill) lives under the store's
``spill_root``: ``api.prune`` puts it beside the output checkpoint (the disk that must hold the
result anyway), else ``$COMPRESSKIT_SPILL_DIR`` or ``<cache dir>/spill`` — never TMPDIR, which is
often a small tmpfs. It is removed when the store is garbage-collected or the process exits
(normally or by an exception); directories of killed processes are removed by the next lazy
load whose spill root is the same.

**Replay-heavy callers keep converted reads.** A search that re-runs blocks many times
(``engine.replay.BlockReplay``: FinerCut, CD-MoE's layer search, EvoPress's candidates) would read
and convert every block from the checkpoint at every replay (safetensors reads, transformers'
converters, dtype casts: the FinerCut search of the DeepSeek fixture took 2.5x its in-memory time).
``hold_reads(budget)`` keeps each recipe's converted read in host memory while some holder is
open, up to ``budget`` bytes (default: half the memory available when the first holder opens, or
``$COMPRESSKIT_READ_CACHE`` — a size such as ``2GB``, ``0`` turns it off): reads are kept in the
order they come and never evicted, so a cyclic replay of more blocks than fit still hits the ones
held (least-recently-used would miss every time). A kept read is the pristine copy
``materialise`` copies from and ``release`` compares against, so it costs no memory beyond itself;
tensors are still handed out as private copies, and a changed block is still spilled. Without a
holder (the sequential pass of Wanda / SparseGPT) nothing is kept: host memory stays at about
one block.

**Host memory really goes back.** glibc's malloc raises its mmap threshold to the size of the
largest block it has freed (up to 32 MiB), after which every block tensor is carved out of the
heap, and the heap fragments: a 4-then-8-then-16-block run measured RSS growing by about one block
per block *read* (a pass that only measures kept every block's pages). Creating a store pins the
threshold at 1 MiB (``mallopt(M_MMAP_THRESHOLD)``, which also turns the dynamic raise off), so each
tensor of ≥ 1 MiB is its own mapping and is returned to the system the moment it is freed. A
``MALLOC_MMAP_THRESHOLD_`` set in the environment is left alone; other C libraries are untouched.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import sys
import tempfile
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..compat import parse_size, tensor_version
from ..errors import InputError, OutputError
from ..outputs import HOST, remove_dead_process_dirs
from ..paths import cache_dir
from .weight_files import SafetensorError

ATTR = "_compresskit_lazy"
_SOURCES_CHECKED = "sources checked"  # a key of materialise's read cache (recipe keys are ints)


SPILL_PREFIX = ".compresskit-spill-"
SPILL_DIR_ENV = "COMPRESSKIT_SPILL_DIR"
def default_spill_root() -> Path:
    """``$COMPRESSKIT_SPILL_DIR``, else ``<cache dir>/spill`` (never TMPDIR: often a small tmpfs, and
    the spilled blocks of a pruned model add up to the model's size)."""
    env = os.environ.get(SPILL_DIR_ENV)
    return Path(env).expanduser() if env else cache_dir() / "spill"


def remove_stale_spills(root: str | Path) -> list[Path]:
    """Delete spill directories under ``root`` left by dead processes of this host (a killed prune).
    A live process's directory, and other hosts' (shared disks), are never touched."""
    pattern = re.compile(rf"^{re.escape(SPILL_PREFIX)}{re.escape(HOST)}-(\d+)-")
    return remove_dead_process_dirs(Path(root), pattern)


MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
_threshold_pinned = False


def pin_malloc_mmap_threshold(size: int = MMAP_THRESHOLD) -> bool:
    """Serve (and return) every allocation of ``size`` bytes or more with its own mapping (glibc).
    True when the threshold is pinned by this call or an earlier one."""
    global _threshold_pinned
    if _threshold_pinned:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    _threshold_pinned = bool(mallopt(_M_MMAP_THRESHOLD, size))
    if _threshold_pinned:
        global mmap_threshold
        mmap_threshold = size
    return _threshold_pinned


#: glibc's largest dynamic threshold on 64-bit (``DEFAULT_MMAP_THRESHOLD_MAX``): the heap serves
#: allocations below it, as it does when nothing is pinned
HELD_MMAP_THRESHOLD = 32 << 20
#: the threshold this process set (None: never set, glibc's dynamic one)
mmap_threshold: int | None = None


_M_TRIM_THRESHOLD = -1
_DEFAULT_TRIM_THRESHOLD = 128 << 10  # glibc's default


def _set_mmap_threshold(size: int) -> None:
    """Move a threshold ``pin_malloc_mmap_threshold`` pinned (nothing when none is pinned), and the
    trim threshold with it as glibc's dynamic rule does (twice the mmap threshold; the default when
    back at 1 MiB): with a raised mmap threshold but the 128 KiB trim threshold, a freed temporary
    at the top of the heap is handed back at once and the next one faults its pages in again."""
    global mmap_threshold
    if not _threshold_pinned:
        return
    mallopt = ctypes.CDLL(None).mallopt
    if mallopt(_M_MMAP_THRESHOLD, size):
        mmap_threshold = size
        mallopt(_M_TRIM_THRESHOLD, 2 * size if size > MMAP_THRESHOLD else _DEFAULT_TRIM_THRESHOLD)


def _return_free_heap() -> None:
    """Give the heap's free pages back to the system (glibc ``malloc_trim``)."""
    if _threshold_pinned:
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):
            pass


READ_CACHE_ENV = "COMPRESSKIT_READ_CACHE"


def available_host_memory() -> int | None:
    """Bytes the kernel reports as available to new allocations (``MemAvailable``), else free pages;
    None when neither can be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def default_read_budget() -> int:
    """``$COMPRESSKIT_READ_CACHE`` (a size: ``512MB``, ``2GB``, bytes; ``0``: keep nothing), else half
    the host memory available now, shared by the processes ``torchrun`` started on this host
    (``LOCAL_WORLD_SIZE``: every rank reads the same model); 0 when that cannot be read."""
    env = os.environ.get(READ_CACHE_ENV)
    if env:
        text = env.strip()
        try:
            return int(text) if text.isdigit() else parse_size(text)
        except (ValueError, TypeError):
            raise InputError(f"${READ_CACHE_ENV} must be a size such as 512MB, 2GB or 0, got {env!r}") from None
    available = available_host_memory()
    try:
        ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        ranks = 1
    return available // (2 * ranks) if available else 0


class ReadCache:
    """Converted recipe reads kept in host memory while replay-heavy callers hold them (``LazyStore.hold_reads``).

    First come, first kept, never evicted: a search that replays blocks ``s .. n-1`` over and over
    hits every block that fits, where least-recently-used would miss them all once the blocks do
    not fit."""

    def __init__(self, budget: int):
        self.budget = int(budget)
        self.values: dict[int, dict[str, torch.Tensor]] = {}
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self.holders = 0

    def get(self, recipe: int) -> dict[str, torch.Tensor] | None:
        values = self.values.get(recipe)
        if values is None:
            self.misses += 1
        else:
            self.hits += 1
        return values

    def offer(self, recipe: int, values: dict[str, torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in values.values())
        if self.nbytes + size <= self.budget:
            self.values[recipe] = values
            self.nbytes += size

    def clear(self) -> None:
        self.values.clear()
        self.nbytes = 0


class ReadHold:
    """One holder of a store's read cache; ``close()`` (or leaving the ``with``) lets it go, and the
    cache is emptied when its last holder goes."""

    def __init__(self, store: "LazyStore | None"):
        self._store = store

    @property
    def cache(self) -> ReadCache | None:
        return None if self._store is None else self._store._read_cache

    def close(self) -> None:
        store, self._store = self._store, None
        if store is not None:
            store._let_go()

    def __enter__(self) -> "ReadHold":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class OriginalSource:
    recipe: int  # index into the store's recipes
    target: str  # target name the recipe produces (the full name at load time)


@dataclass(frozen=True)
class SpillSource:
    file: str
    key: str


class LazyRef:
    """What a meta tensor points to; shared, never copied (``deepcopy`` of a module keeps it)."""

    __slots__ = ("store", "source")

    def __init__(self, store: "LazyStore", source: OriginalSource | SpillSource):
        self.store, self.source = store, source

    def __deepcopy__(self, memo):
        return self


def lazy_ref(tensor: torch.Tensor | None) -> LazyRef | None:
    if tensor is None or not tensor.is_meta:
        return None
    return getattr(tensor, ATTR, None)


def tensor_slots(module: nn.Module) -> Iterator[tuple[nn.Module, str, str, torch.Tensor]]:
    """(owner module, "_parameters" | "_buffers", name, tensor) for every tensor under ``module``."""
    for owner in module.modules():
        for kind in ("_parameters", "_buffers"):
            for name, tensor in list(getattr(owner, kind).items()):
                if tensor is not None:
                    yield owner, kind, name, tensor


def store_of(module: nn.Module) -> "LazyStore | None":
    """The store of the first lazily held tensor under ``module`` (None: nothing under it is lazy)."""
    for _, _, _, tensor in tensor_slots(module):
        ref = lazy_ref(tensor)
        if ref is not None:
            return ref.store
    return None


def _meta_like(tensor: torch.Tensor, ref: LazyRef, parameter: bool, requires_grad: bool) -> torch.Tensor:
    meta = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
    if parameter:
        meta = nn.Parameter(meta, requires_grad=requires_grad)
    setattr(meta, ATTR, ref)
    return meta


_FLOAT_BITS = {torch.float16: (5, 10), torch.bfloat16: (8, 7), torch.float32: (8, 23), torch.float64: (11, 52)}


def exact_cast(source: torch.dtype, target: torch.dtype) -> bool:
    """Every value of ``source`` is exactly a value of ``target`` (bf16 / fp16 -> fp32 -> fp64)."""
    if source == target:
        return True
    a, b = _FLOAT_BITS.get(source), _FLOAT_BITS.get(target)
    return a is not None and b is not None and a[0] <= b[0] and a[1] <= b[1]


def retype(module: nn.Module, want: Callable[[str, torch.Tensor], torch.dtype]) -> dict[str, torch.dtype]:
    """Give every lazily held floating tensor under ``module`` the dtype ``want(name, tensor)`` without
    reading it: its placeholder changes, and each later ``materialise`` casts the read (a cast that
    keeps every value, such as bf16 -> fp32, releases to the same source: nothing is spilled).
    Returns ``{name: old dtype}`` of the tensors it looked at. Real tensors are left alone."""
    old: dict[str, torch.dtype] = {}
    done: dict[int, torch.Tensor] = {}
    names = {id(t): n for n, t in [*module.named_parameters(remove_duplicate=False),
                                    *module.named_buffers(remove_duplicate=False)]}
    for owner, kind, name, tensor in tensor_slots(module):
        ref = lazy_ref(tensor)
        if ref is None or not tensor.is_floating_point():
            continue
        if id(tensor) not in done:
            full = names.get(id(tensor), name)
            old[full] = tensor.dtype
            dtype = want(full, tensor)
            if dtype == tensor.dtype:
                done[id(tensor)] = tensor
            else:
                meta = torch.empty(tensor.shape, dtype=dtype, device="meta")
                if kind == "_parameters":
                    meta = nn.Parameter(meta, requires_grad=tensor.requires_grad)
                setattr(meta, ATTR, ref)  # the same reference: the source is unchanged, and so are its counts
                done[id(tensor)] = meta
        getattr(owner, kind)[name] = done[id(tensor)]
    return old


@dataclass
class Session:
    """What one ``materialise`` did, so ``release`` can undo it."""

    #: id(materialised tensor) -> (source, its _version then, the tensor, the pristine read it was copied from)
    loaded: dict[int, tuple[OriginalSource | SpillSource, int, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    moved: dict[int, torch.device] = field(default_factory=dict)  # id(tensor) -> home device


class LazyStore:
    """Reads, releases and spills the block tensors of one lazily loaded model.

    ``read_recipe(i)`` returns ``{target name: CPU tensor}`` for recipe ``i``, converted exactly as
    ``from_pretrained`` would (see ``models.lazy``).
    """

    def __init__(self, read_recipe: Callable[[int], dict[str, torch.Tensor]], spill_root: str | Path | None = None,
                 check_sources: Callable[[], None] | None = None):
        self._read_recipe = read_recipe
        #: raises when the files the recipes read changed since loading; run before each block's first read
        self._check_sources = check_sources
        #: where the spill directory goes (made at the first spill); None: ``default_spill_root()``
        self.spill_root = Path(spill_root) if spill_root is not None else None
        self.spill_dir: str | None = None
        self._spill_refs: dict[str, int] = {}
        self._spill_count = 0
        self.spilled_tensors = 0
        #: how many times a recipe was read and converted from the checkpoint (the cost a read cache saves)
        self.recipe_reads = 0
        self._read_cache: ReadCache | None = None
        pin_malloc_mmap_threshold()
        remove_stale_spills(self.spill_root or default_spill_root())  # a killed earlier run's

    def discard_spills(self) -> None:
        """Delete the spill directory now (a failed save: the model is abandoned, its spills with it)."""
        if self.spill_dir is not None:
            shutil.rmtree(self.spill_dir, ignore_errors=True)

    def _spill_directory(self) -> str:
        if self.spill_dir is None:
            root = self.spill_root or default_spill_root()
            try:
                root.mkdir(parents=True, exist_ok=True)
                self.spill_dir = tempfile.mkdtemp(prefix=f"{SPILL_PREFIX}{HOST}-{os.getpid()}-", dir=root)
            except OSError as exc:
                hint = f", set {SPILL_DIR_ENV}" if self.spill_root is None else ""
                raise OutputError(f"cannot create a spill folder under {root} ({exc.strerror or exc}): a lazily "
                                  f"loaded model spills its changed blocks there; make it writable{hint} or use "
                                  "--load in-memory") from None
            weakref.finalize(self, shutil.rmtree, self.spill_dir, True)
        return self.spill_dir

    # ------------------------------------------------------------------ read cache
    def hold_reads(self, budget: int | None = None) -> ReadHold:
        """Keep converted reads in host memory (up to ``budget`` bytes, default ``default_read_budget()``)
        until the returned hold is closed; holds nest and share one cache (the first one sizes it).

        While held, the heap serves allocations below 32 MiB again (``HELD_MMAP_THRESHOLD``): a search
        allocates and frees the same temporaries (its distances' softmax, fp64 copies) thousands of
        times, and with every one of them a fresh mapping the kernel zeroes page by page, FinerCut's
        distances ran 2.5-5x slower lazily than in memory. The last hold's close restores the 1 MiB
        threshold and hands the heap's free pages back (``malloc_trim``), so the flat memory of the
        sequential pass is what it was."""
        if self._read_cache is None:
            self._read_cache = ReadCache(default_read_budget() if budget is None else budget)
            _set_mmap_threshold(HELD_MMAP_THRESHOLD)
        self._read_cache.holders += 1
        return ReadHold(self)

    def _let_go(self) -> None:
        cache = self._read_cache
        if cache is not None:
            cache.holders -= 1
            if cache.holders <= 0:
                cache.clear()
                self._read_cache = None
                _set_mmap_threshold(MMAP_THRESHOLD)
                _return_free_heap()

    # ------------------------------------------------------------------ sources
    def ref(self, source: OriginalSource | SpillSource) -> LazyRef:
        if isinstance(source, SpillSource):
            self._spill_refs[source.file] = self._spill_refs.get(source.file, 0) + 1
        return LazyRef(self, source)

    def _drop(self, source: OriginalSource | SpillSource) -> None:
        if isinstance(source, SpillSource):
            left = self._spill_refs.get(source.file, 1) - 1
            self._spill_refs[source.file] = left
            if left <= 0:
                self._spill_refs.pop(source.file, None)
                try:
                    os.remove(source.file)
                except FileNotFoundError:
                    pass

    def read(self, source: OriginalSource | SpillSource, cache: dict | None = None) -> torch.Tensor:
        if isinstance(source, SpillSource):
            from safetensors import safe_open

            with safe_open(source.file, framework="pt") as handle:
                return handle.get_tensor(source.key)
        if cache is not None and source.recipe in cache:
            return cache[source.recipe][source.target]
        kept = self._read_cache.get(source.recipe) if self._read_cache is not None else None
        if kept is not None:
            if cache is not None:
                cache[source.recipe] = kept
            return kept[source.target]
        if self._check_sources is not None and (cache is None or not cache.get(_SOURCES_CHECKED)):
            try:
                self._check_sources()
            except Exception:
                self.discard_spills()  # the run stops: what it spilled can never be used
                raise
            if cache is not None:
                cache[_SOURCES_CHECKED] = True
        values = self._read_recipe(source.recipe)
        self.recipe_reads += 1
        if self._read_cache is not None:
            self._read_cache.offer(source.recipe, values)
        if cache is not None:
            cache[source.recipe] = values
        return values[source.target]

    # ------------------------------------------------------------------ materialise
    @torch.no_grad()
    def materialise(self, module: nn.Module, device: torch.device) -> Session:
        session = Session()
        done: dict[int, torch.Tensor] = {}  # id(old tensor) -> replacement (tied tensors stay tied)
        cache: dict = {}
        for owner, kind, name, tensor in tensor_slots(module):
            if id(tensor) in done:
                getattr(owner, kind)[name] = done[id(tensor)]
                continue
            ref = lazy_ref(tensor)
            if ref is not None and ref.store is self:
                # Always a private copy: safetensors hands out tensors backed by its (copy-on-write)
                # file mapping, and an edit there would show through every later read of the source.
                raw = self.read(ref.source, cache)
                # The placeholder's dtype is the one the module wants: a retyped placeholder (see
                # ``retype``) reads its source and casts, instead of holding a changed copy.
                want = tensor.dtype if raw.is_floating_point() and tensor.is_floating_point() else raw.dtype
                value = raw.to(device, dtype=want, copy=True)
                if kind == "_parameters":
                    value = nn.Parameter(value, requires_grad=tensor.requires_grad)
                session.loaded[id(value)] = (ref.source, tensor_version(value), value, raw)
                new = value
            elif tensor.is_meta:
                new = tensor  # a meta tensor nobody can read (not ours): leave it
            else:
                session.moved[id(tensor)] = tensor.device
                if kind == "_parameters":
                    tensor.data = tensor.data.to(device)
                    new = tensor
                else:
                    new = tensor.to(device)
                    session.moved[id(new)] = tensor.device
            done[id(tensor)] = new
            getattr(owner, kind)[name] = new
        return session

    # ------------------------------------------------------------------ release
    @torch.no_grad()
    def release(self, module: nn.Module, session: Session) -> None:
        done: dict[int, torch.Tensor] = {}
        to_spill: list[tuple[nn.Module, str, str, torch.Tensor, OriginalSource | SpillSource | None]] = []
        for owner, kind, name, tensor in tensor_slots(module):
            if id(tensor) in done:
                getattr(owner, kind)[name] = done[id(tensor)]
                continue
            if tensor.is_meta:
                continue
            if id(tensor) in session.moved and id(tensor) not in session.loaded:
                home = session.moved[id(tensor)]
                if kind == "_parameters":
                    tensor.data = tensor.data.to(home)
                    new = tensor
                else:
                    new = tensor.to(home)
                done[id(tensor)] = new
                getattr(owner, kind)[name] = new
                continue
            entry = session.loaded.get(id(tensor))
            if entry is not None and entry[2] is tensor and self._unchanged(tensor, entry):
                new = _meta_like(tensor, self.ref(entry[0]), kind == "_parameters", tensor.requires_grad)
                done[id(tensor)] = new
                getattr(owner, kind)[name] = new
                continue
            to_spill.append((owner, kind, name, tensor, entry[0] if entry is not None else None))
        if to_spill:
            self._spill(to_spill, done)
        # The sources the released tensors were materialised from are no longer referenced by them.
        for source, *_ in session.loaded.values():
            self._drop(source)
        session.loaded.clear()

    @staticmethod
    def _unchanged(tensor: torch.Tensor, entry) -> bool:
        _, version, _, original = entry
        if tensor_version(tensor) != version or original.shape != tensor.shape:
            return False
        if original.dtype != tensor.dtype and not exact_cast(original.dtype, tensor.dtype):
            return False  # a lossy cast of the source is a change: spilled
        return bool(torch.equal(original.to(tensor.device, tensor.dtype), tensor))

    def _spill(self, items, done: dict[int, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        self._spill_count += 1
        path = os.path.join(self._spill_directory(), f"spill-{self._spill_count:06d}.safetensors")
        tensors: dict[str, torch.Tensor] = {}
        storages: set[int] = set()
        keys: dict[int, str] = {}
        for owner, kind, name, tensor, _ in items:
            if id(tensor) in keys:
                continue
            value = tensor.detach().to("cpu").contiguous()
            if value.untyped_storage().data_ptr() in storages:
                value = value.clone()  # safetensors refuses tensors that share storage
            storages.add(value.untyped_storage().data_ptr())
            keys[id(tensor)] = key = f"t{len(tensors)}"
            tensors[key] = value
        tmp = path + ".tmp"
        try:
            save_file(tensors, tmp)
            os.replace(tmp, path)
        except (OSError, SafetensorError) as exc:  # disk full, folder removed: the run cannot go on
            self.discard_spills()
            reason = getattr(exc, "strerror", None) or (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise OutputError(f"cannot spill a changed block of the lazily loaded model to {self.spill_dir} "
                              f"({reason}); free space there or use --load in-memory") from None
        tensors.clear()
        self.spilled_tensors += len(keys)
        for owner, kind, name, tensor, _ in items:
            if id(tensor) not in done:
                ref = self.ref(SpillSource(path, keys[id(tensor)]))
                done[id(tensor)] = _meta_like(tensor, ref, kind == "_parameters", tensor.requires_grad)
            getattr(owner, kind)[name] = done[id(tensor)]
