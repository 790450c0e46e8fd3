"""The C helpers, and why each is C: the staging copy, the steady pause, the steady batch and
the uplink's delta.

**The staging copy** (``gather_pages``).

Replication gathers each epoch's dirty pages into the staging area while the guest is paused;
the uplink process then reads them on the other core. A plain copy (``np.take``, ``memcpy``)
first pulls every destination line into this core's cache, and the uplink still holds those
lines from the last time it read that slot, so each store waits for the other core to give
its copy up. Measured here (64 pages after a 150 µs guest run, uplink-like reader on the other
core): ``np.take`` 13-15 µs in some runs and 60-80 µs in most, memcpy the same, depending on
where the host puts our two vCPUs; non-temporal stores 11-12 µs in every run. That is up to
a third of a checkpoint's pause, and numpy has no non-temporal store, so this is C.

**The steady pause** (``PauseProgram``). With a steady hot set, a replication checkpoint's
pause is always the same work: GET each slot's dirty log and see it equal the last one, copy
the same pages into staging, read XSAVE and the TSC, lay regs/sregs/events into the state
blob. Done in Python right after the guest ran (caches cold) that took ~70 µs here, of which
the system calls and the copy are ~30 µs: the rest is Python's own bookkeeping. One C call
doing the same measured ~53 µs of pause against ~72 µs, and took a 64-page hot set at 150 µs
epochs from ~3,530 to ~3,780 committed checkpoints/s with the guest at 48 % instead of 44 % of
its speed. Whenever a log differs, the call copies nothing and the caller takes the Python path.

**The steady batch** (``EpochBatch``). Even with the pause in C, the Python around it (choose
the staging slot, run the program, encode the blob, tell the uplink, record statistics) cost
~40 µs per checkpoint right after each guest run: measured with a 64-page hot set at 150 µs
epochs, ~28 µs of Python before the program and ~14 µs after it, around ~40 µs of C. Python
right after KVM_RUN is several times slower than warm (this host's vCPU exit leaves its caches
and TLB cold). So the batch runs several epochs in one call: arm the timer, KVM_RUN until it
fires, the epoch's program, again; Python does the bookkeeping of all of them once, after.
Same host, same hour, 64-page hot set at 150 µs: pause p50 21-29 µs instead of 68-83 µs, and
~2,900/s with the guest at 35-37 % became 3,000-3,700/s at 46-53 %.

The pause stores the guest's TSC itself (``PauseProgram.tsc``: the host's plus the vCPU's TSC
offset, which the batch reads at its start and checks at its end) where KVM does not scale it:
KVM_GET_MSRS, like every vCPU ioctl here, costs ~7.5 µs, rdtsc ~0.1 µs. Pause p50 went ~6-8 µs
down in interleaved cells.

**The uplink's delta** (``sparse_delta``): see ``replication/uplink_process._delta``.

All are in ``native.c`` (~400 lines); what Python shares with it (the structs below, the
constants and result codes) is in ``native.h``, which ``tests/unit/machine/test_native_header.py``
checks against this module. Nothing is compiled at import: the first use of a native path
(``backend()``, or any function here that needs the helper) compiles both with the system's
gcc into the user's cache directory, keyed by their hash, and loads it. Without a compiler the
copy runs with numpy and checkpoints take the Python path (``backend()`` says which); the
classes that exist only in C then raise ``NativeUnavailable``.
"""
from __future__ import annotations

import ctypes as C
import hashlib
import os
import subprocess
import tempfile
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import NativeCallFailed, NativeDataInvalid, NativePageOutOfRange, NativeUnavailable

#: native.h's DR_PAGE.
PAGE = 4096
_SRC = Path(__file__).with_name("native.c")
_HEADER = Path(__file__).with_name("native.h")


def cache_dirs() -> list[Path]:
    """Where the built helper may live: the user's cache, else a private temporary one."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return [Path(base) / "dirtyring",
            Path(tempfile.gettempdir()) / f"dirtyring-{os.getuid()}"]


def _source_key() -> bytes:
    """What the built helper is keyed by: the source and the header it includes."""
    return _SRC.read_bytes() + b"\0" + _HEADER.read_bytes()


def _build_in(folder: Path, src: bytes) -> C.CDLL | None:
    lib = folder / f"native-{hashlib.sha256(src).hexdigest()[:16]}.so"
    if not lib.exists():
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
        os.close(fd)
        try:
            p = subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", tmp, str(_SRC)],
                               capture_output=True, check=False)
            if p.returncode != 0:
                return None
            os.replace(tmp, lib)  # atomic: concurrent first uses each build, one wins
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return C.CDLL(str(lib), use_errno=True)


def _build() -> C.CDLL | None:
    """The compiled helper, built if needed; None if it cannot be (no gcc, nowhere to put it)."""
    src = _source_key()
    for folder in cache_dirs():
        try:
            dll = _build_in(folder, src)
        except (OSError, subprocess.SubprocessError):
            continue
        if dll is None:
            return None  # gcc is there but refused the source: no point trying elsewhere
        fn = dll.dirtyring_gather_nt
        fn.argtypes = [C.c_void_p, C.c_void_p, C.c_void_p, C.c_int64, C.c_int64]
        fn.restype = C.c_int
        prog = dll.dirtyring_program
        prog.argtypes = [C.c_void_p]
        prog.restype = C.c_int
        batch = dll.dirtyring_batch
        batch.argtypes = [C.c_void_p]
        batch.restype = C.c_int
        delta = dll.dirtyring_sparse_delta
        delta.argtypes = [C.c_void_p] * 3 + [C.c_int64] + [C.c_void_p] * 2 + [C.c_int64]
        delta.restype = C.c_int64
        take = dll.dirtyring_take_words
        take.argtypes = [C.c_void_p, C.c_int64, C.c_int64, C.c_void_p, C.c_void_p, C.c_void_p,
                         C.c_void_p]
        take.restype = C.c_int
        return dll
    return None


# The helper's entry points: set by _load(), on the first use of a native path (never at
# import: importing the machine layer must not run a compiler). Each stays None without one.
_LOADED = False
_GATHER: C._NamedFuncPointer | None = None
_PROGRAM: C._NamedFuncPointer | None = None
_BATCH: C._NamedFuncPointer | None = None
_DELTA: C._NamedFuncPointer | None = None
_TAKE: C._NamedFuncPointer | None = None
_RDTSC: C._NamedFuncPointer | None = None
_BACKEND = "numpy"


def _load() -> None:
    """Build (if needed) and load the helper, once per process."""
    global _LOADED, _GATHER, _PROGRAM, _BATCH, _DELTA, _TAKE, _RDTSC, _BACKEND
    if _LOADED:
        return
    lib = _build()
    if lib is not None:
        _GATHER, _PROGRAM, _BATCH = lib.dirtyring_gather_nt, lib.dirtyring_program, \
            lib.dirtyring_batch
        _DELTA, _TAKE, _RDTSC = lib.dirtyring_sparse_delta, lib.dirtyring_take_words, \
            lib.dirtyring_rdtsc
        _RDTSC.restype = C.c_uint64
        _BACKEND = "c-nt"
    _LOADED = True


def backend() -> str:
    """"c-nt" (compiled: non-temporal stores, the steady pause) or "numpy" (no compiler here).
    The first call builds the helper if it is not in the cache yet."""
    _load()
    return _BACKEND


if TYPE_CHECKING:
    #: What ``backend()`` returns (read as an attribute; computed on first access).
    BACKEND: str
else:
    def __getattr__(name: str) -> str:
        # ``native.BACKEND``: what ``backend()`` returns, computed (and the helper built) on
        # first access rather than at import. (Hidden from mypy, which would otherwise accept
        # any attribute of this module.)
        if name == "BACKEND":
            return backend()
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: Fewer pages than this are copied by numpy.
SMALL = 8
#: A delta gather keeps at most this many changed words per page, an eighth of them (native.h
#: DR_DELTA_WORDS).
DELTA_WORDS = PAGE // 8 // 8


def _unavailable() -> NativeUnavailable:
    return NativeUnavailable("the native helper (machine/native.c) could not be built: no gcc "
                             "on PATH, or no writable cache directory; this path has no Python "
                             "fallback (install gcc, or check native.backend() first)")


def gather_pages(dst: np.ndarray, pages_view: np.ndarray, pages: np.ndarray) -> None:
    """``dst[i] = pages_view[pages[i]]``. ``pages_view`` is guest memory as (n, 4096) uint8
    rows, ``dst`` C-contiguous uint8 (k, 4096) with k == len(pages), ``pages`` int64."""
    if not _LOADED:
        _load()
    n = len(pages)
    # A few pages are not worth the call's own overhead (~4 µs here against ~1 µs for numpy);
    # non-temporal stores need 16-byte alignment (staging slots are page-aligned).
    if _GATHER is None or n < SMALL or dst.ctypes.data % 16:
        np.take(pages_view, pages, axis=0, out=dst, mode="clip")
        return
    assert dst.flags.c_contiguous and pages_view.flags.c_contiguous and dst.shape[0] == n
    idx = pages if pages.dtype == np.int64 and pages.flags.c_contiguous else \
        np.ascontiguousarray(pages, np.int64)
    if _GATHER(dst.ctypes.data, pages_view.ctypes.data, idx.ctypes.data, n,
               pages_view.shape[0]) != 0:
        raise NativePageOutOfRange("page index outside guest memory slot")


def sparse_delta(staged: np.ndarray, shadow: np.ndarray, pages: np.ndarray,
                 most: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The words of ``staged`` (k, 4096) that differ from ``shadow`` rows ``pages``, as
    (offsets into ``staged`` as int64 words, XOR values), with the shadow brought up to date
    at those words. None, with the shadow untouched, if more than ``most`` words differ or
    there is no compiled helper. Indices are the caller's own (the uplink's staging)."""
    if not _LOADED:
        _load()
    if _DELTA is None:
        return None
    assert staged.flags.c_contiguous and shadow.flags.c_contiguous
    assert pages.dtype == np.int64 and pages.flags.c_contiguous
    where = np.empty(most, np.int64)
    diff = np.empty(most, np.uint64)
    k = _DELTA(staged.ctypes.data, shadow.ctypes.data, pages.ctypes.data, len(pages),
               where.ctypes.data, diff.ctypes.data, most)
    return None if k < 0 else (where[:k], diff[:k])


def take_words(staged: int, n: int, words: int, pages: int,
               shadow: int) -> tuple[np.ndarray, np.ndarray]:
    """The (offsets, XORs) a delta gather staged for ``n`` pages at address ``staged`` (their
    indices, int64, at ``pages``), copied out, and applied to the rows at ``shadow`` (like
    guest memory's) unless that is 0. Addresses, not arrays: each ``ndarray.ctypes`` costs
    ~1 µs, as much as the work. Only where the helper is built (delta gathers need it)."""
    if _TAKE is None:
        _load()
        if _TAKE is None:
            raise _unavailable()
    out = np.empty(2 * words, np.int64)
    at = out.ctypes.data
    if _TAKE(staged, n, words, pages, shadow or None, at, at + 8 * words) != 0:
        raise NativeDataInvalid("staged words lie outside their pages, or are too many")
    return out[:words], out[words:].view(np.uint64)


class _Op(C.Structure):
    _fields_ = [("fd", C.c_int), ("expect", C.c_int), ("request", C.c_ulong),
                ("arg", C.c_void_p), ("offset", C.c_void_p)]


_TSC_OP = 0  # an op's request that stores the guest's TSC (native.h's DR_OP_TSC)


def rdtsc() -> int:
    """The host's TSC now (the helper must be built)."""
    if _RDTSC is None:
        _load()
        if _RDTSC is None:
            raise _unavailable()
    return int(_RDTSC())


class _Same(C.Structure):
    _fields_ = [("a", C.c_void_p), ("b", C.c_void_p), ("n", C.c_int64)]


class _Gather(C.Structure):
    _fields_ = [("dst", C.c_void_p), ("dst_idx", C.c_void_p), ("src", C.c_void_p),
                ("idx", C.c_void_p), ("n", C.c_int64), ("src_pages", C.c_int64),
                ("shadow", C.c_void_p), ("count", C.c_void_p)]


class _Copy(C.Structure):
    _fields_ = [("dst", C.c_void_p), ("src", C.c_void_p), ("n", C.c_int64)]


class _Program(C.Structure):
    _fields_ = [("ops", C.c_void_p), ("same", C.c_void_p), ("gathers", C.c_void_p),
                ("copies", C.c_void_p), ("nops", C.c_int), ("nsame", C.c_int),
                ("ngathers", C.c_int), ("ncopies", C.c_int)]


class PauseProgram:
    """One call: ioctls, then "each pair of buffers is equal", then page gathers (with their
    indices) and plain copies that run only if every pair was. A program can be run again as
    it is (the steady pause keeps one per staging slot).

    Arguments are addresses: the caller keeps what they point into alive (``keep``) and
    computes them once (``ndarray.ctypes.data`` alone costs ~1 µs, a tenth of the call)."""

    def __init__(self, size: int = 32) -> None:
        _load()
        if _PROGRAM is None:
            raise _unavailable()
        self._ops, self._same, self._gathers = (_Op * size)(), (_Same * size)(), (_Gather * size)()
        self._copies = (_Copy * size)()
        self._p = _Program(C.addressof(self._ops), C.addressof(self._same),
                           C.addressof(self._gathers), C.addressof(self._copies), 0, 0, 0, 0)
        #: The program's own address, for a batch (``EpochBatch``).
        self.address = C.addressof(self._p)
        self._size = size
        #: What the program's addresses point into, kept alive for as long as the program.
        self.keep: list[object] = []

    def ioctl(self, fd: int, request: int, arg: int, expect: int = -1) -> None:
        """``ioctl(fd, request, arg)``: it fails unless it returns >= 0 (``expect`` if >= 0)."""
        o = self._ops[self._slot(self._p.nops)]
        o.fd, o.expect, o.request, o.arg = fd, expect, request, arg
        self._p.nops += 1

    def tsc(self, dst: int, offset: int) -> None:
        """Store the guest's TSC at ``dst`` (8 bytes): the host's plus the int64 at ``offset``,
        which a batch fills in (``EpochBatch.run``) and checks. No ioctl: see native.c."""
        o = self._ops[self._slot(self._p.nops)]
        o.fd, o.expect, o.request, o.arg, o.offset = -1, -1, _TSC_OP, dst, offset
        self._p.nops += 1

    def same(self, a: int, b: int, n: int) -> None:
        """``n`` bytes at ``a`` must equal those at ``b`` (checked after every ioctl)."""
        s = self._same[self._slot(self._p.nsame)]
        s.a, s.b, s.n = a, b, n
        self._p.nsame += 1

    def gather(self, dst: int, dst_idx: int, rows: int, pages: int, n: int,
               src_pages: int, shadow: int = 0, count: int = 0) -> None:
        """Pages ``pages[0:n]`` (int64) of ``rows`` (``src_pages`` of them) to ``dst`` (16-byte
        aligned), their indices to ``dst_idx`` (int64), if every check held.

        With ``shadow`` (rows like ``rows``, as they were at the last checkpoint), only the
        64-bit words that changed since go to ``dst``: their offsets into the n pages as
        int64 at ``dst``, their XORs as uint64 ``n * DELTA_WORDS`` words after, how many as an
        int64 at ``count``, and the shadow is brought up to date. If more than
        ``n * DELTA_WORDS`` changed, the pages go as without a shadow (and into it) and the
        count is -1."""
        g = self._gathers[self._slot(self._p.ngathers)]
        g.dst, g.dst_idx, g.src, g.idx, g.n, g.src_pages = dst, dst_idx, rows, pages, n, src_pages
        g.shadow, g.count = shadow or None, count or None
        self._p.ngathers += 1

    def copy(self, dst: int, src: int, n: int) -> None:
        """``n`` bytes from ``src`` to ``dst``, after the gathers, if every check held."""
        c = self._copies[self._slot(self._p.ncopies)]
        c.dst, c.src, c.n = dst, src, n
        self._p.ncopies += 1

    def retarget(self, same: list[tuple[int, int]],
                 gathers: list[tuple[int, int, int, int]]) -> None:
        """Point compare ``i`` at ``same[i]`` (b, n) and gather ``i`` at ``gathers[i]`` (dst,
        dst_idx, pages, n), all else as it was: the steady pause's program when the hot set
        moved but kept its shape (Python builds a program in ~90 µs right after the guest
        ran, and a moved set needs one per staging slot)."""
        if len(same) != self._p.nsame or len(gathers) != self._p.ngathers:
            raise NativeDataInvalid("a retargeted program keeps its compares and gathers")
        for i, (b, n) in enumerate(same):
            self._same[i].b, self._same[i].n = b, n
        for i, (dst, dst_idx, pages, n) in enumerate(gathers):
            g = self._gathers[i]
            g.dst, g.dst_idx, g.idx, g.n = dst, dst_idx, pages, n

    def _slot(self, i: int) -> int:
        if i >= self._size:
            raise NativeDataInvalid(f"pause program is full ({self._size} entries of a kind)")
        return i

    def run(self) -> bool:
        """True: all done. False: a check failed and nothing was gathered (the ioctls ran)."""
        assert _PROGRAM is not None
        rc = _PROGRAM(self.address)
        if rc == PROGRAM_DONE:
            return True
        if rc == PROGRAM_CHANGED:
            return False
        raise program_error(rc, C.get_errno())


#: A program's results (native.h DR_PROGRAM_*): done; a compared pair differed; (at or below,
#: ``PROGRAM_BAD_PAGE - k``) gather k names a page outside its slot. -(i+1): op i failed.
PROGRAM_DONE, PROGRAM_CHANGED, PROGRAM_BAD_PAGE = 0, 1, -1000


def program_error(rc: int, err: int) -> NativeCallFailed | NativePageOutOfRange:
    """The error a program's result ``rc`` < 0 stands for."""
    if rc == NO_TSC_OFFSET:
        return NativeCallFailed(err, f"reading the vCPU's TSC offset failed: {os.strerror(err)}")
    if rc <= PROGRAM_BAD_PAGE:
        return NativePageOutOfRange(f"pause gather {PROGRAM_BAD_PAGE - rc} names a page "
                                    f"outside its slot")
    return NativeCallFailed(err, f"pause ioctl {-rc - 1} failed: "
                                 f"{os.strerror(err) if err else 'unexpected result'}")


#: native.h DR_MAX_BATCH.
MAX_BATCH = 64


class BatchWhy(IntEnum):
    """Why a batch returned (``EpochBatch.why``; native.h's DR_* of the same names).
    ``machine/exits.py`` ``BATCH_STOPS`` says what each means for the epoch that ended it."""

    ALL_DONE = 0
    EXIT = 1
    CHANGED = 2
    PROGRAM_FAILED = 3
    RUN_FAILED = 4


ALL_DONE, EXIT, CHANGED = BatchWhy.ALL_DONE, BatchWhy.EXIT, BatchWhy.CHANGED
PROGRAM_FAILED, RUN_FAILED = BatchWhy.PROGRAM_FAILED, BatchWhy.RUN_FAILED
#: ``EpochBatch.detail`` of a ``CHANGED`` that was the watched counter, not a dirty log.
VMM_WROTE = 2
#: ``EpochBatch.detail`` of a ``PROGRAM_FAILED`` before any epoch: the TSC offset's read.
NO_TSC_OFFSET = -999


class _Batch(C.Structure):
    _fields_ = [("vcpu_fd", C.c_int), ("n", C.c_int), ("run", C.c_void_p), ("timer", C.c_void_p),
                ("interval_ns", C.c_int64), ("watch", C.c_void_p), ("watch_value", C.c_int64),
                ("progs", C.c_void_p * MAX_BATCH), ("tsc_offset", C.c_void_p),
                ("done", C.c_int), ("why", C.c_int), ("detail", C.c_int), ("err", C.c_int),
                ("intr", C.c_int), ("enter_ns", C.c_int64 * MAX_BATCH),
                ("exit_ns", C.c_int64 * MAX_BATCH), ("tsc_moved", C.c_int)]


class EpochBatch:
    """Several epochs of one inline vCPU in one call: arm the epoch timer, run the guest until
    it fires, run that epoch's ``PauseProgram``, and again, returning at the first thing that
    needs Python. ``VcpuRunner.run_batch`` drives it; the fields say what happened."""

    def __init__(self, vcpu_fd: int, run_address: int, timer_id: int) -> None:
        _load()
        if _BATCH is None:
            raise _unavailable()
        self._b = _Batch(vcpu_fd=vcpu_fd, run=run_address, timer=timer_id)
        self._address = C.addressof(self._b)

    def run(self, interval: float, programs: list[PauseProgram],
            watch: np.ndarray | None = None, watch_value: int = 0, tsc_offset: int = 0) -> None:
        """Up to ``len(programs)`` epochs of ``interval`` seconds (the GIL is released). An
        epoch whose run ends with ``watch[0]`` (int64) no longer ``watch_value`` stops the
        batch before its program (``CHANGED``, detail ``VMM_WROTE``).

        ``tsc_offset``: the address of the int64 the programs' ``tsc`` ops add; the batch
        reads the vCPU's TSC offset into it first, and if the offset is different at the end,
        no epoch counts (``done`` 0, ``tsc_moved``; the last one is over and paused)."""
        assert _BATCH is not None and 0 < len(programs) <= MAX_BATCH
        b = self._b
        b.n, b.interval_ns = len(programs), max(int(interval * 1e9), 1000)
        b.tsc_offset = tsc_offset or None
        if watch is None:
            b.watch = None
        else:
            assert watch.dtype == np.int64
            b.watch, b.watch_value = int(watch.ctypes.data), watch_value
        for i, p in enumerate(programs):
            b.progs[i] = p.address
        _BATCH(self._address)

    @property
    def done(self) -> int:
        """Epochs run and paused with their program done."""
        return int(self._b.done)

    @property
    def why(self) -> int:
        return int(self._b.why)

    @property
    def detail(self) -> int:
        """The exit reason (``EXIT``) or the program's result (``CHANGED``, ``PROGRAM_FAILED``)."""
        return int(self._b.detail)

    @property
    def err(self) -> int:
        return int(self._b.err)

    @property
    def tsc_moved(self) -> bool:
        return bool(self._b.tsc_moved)

    @property
    def intr(self) -> int:
        return int(self._b.intr)

    def all_times(self, n: int) -> tuple[list[float], list[float]]:
        """When the first ``n`` epochs' runs began and ended, read at once: (entered, exited),
        CLOCK_MONOTONIC seconds (``time.monotonic``). (Plain
        lists: right after the guest ran, two numpy operations cost ~25 µs here.)"""
        b = self._b
        return [t * 1e-9 for t in b.enter_ns[:n]], [t * 1e-9 for t in b.exit_ns[:n]]
