"""End-to-end checks of dirty tracking: a shadow copy of guest memory updated *only* from reported
pages must equal guest memory whenever the guest is paused after a harvest.

This catches every kind of loss (a kernel defect, a harvest bug, a VMM write not marked dirty),
which is why replication's verify mode, the test suite and ``dirtyring doctor`` all use it.

It also hosts the probe for the host's KVM_RESET_DIRTY_RINGS defect (``reset_defect_probe``).
The defect fires only when a signal arrives *while the kernel runs the reset*, so the stimulus
aims every signal there: the guest leaves KVM_RUN by itself (an ``out`` every ``exit_every``
pages), a periodic SIGALRM is kept blocked while the guest runs and unblocked only around harvest
+ reset. A storm that also interrupts KVM_RUN spends most of its signals outside the reset, and
said "not seen" on a host that has the defect (platform notes, "Still present on 6.18.44").
"""
from __future__ import annotations

import ctypes as C
import math
import os
import signal
import threading
import time
from dataclasses import dataclass

import numpy as np

from ..errors import DirtyringError, GuestCrashed, TrackingError
from ..guests.protocol import GuestParams, Pattern
from ..tracking import DirtySet, RingTracker
from .config import MachineConfig
from .memory import GuestMemory
from .exits import Exit, serve
from .vcpu import _itimerspec, _sigevent

PAGE = 4096


class ShadowCheck:
    """A shadow of guest memory, advanced only by reported dirty pages.

    Sparse, because guest memory is: a memfd page never written is a hole and reads as zero,
    and so does a never-written page of the shadow (made with ``np.zeros``, which costs
    nothing until written; ``zeros_like`` would write every byte). So the shadow starts as a
    copy of the populated pages only, and ``stale`` compares only the pages where either side
    can hold data: the memfd's populated pages and the pages the shadow was ever written.
    Every other page is zero on both sides. (Copying and comparing whole slots read every
    hole through the mapping, which makes the kernel allocate it: a 512 MiB Linux program's
    check cost ~0.5 s and ~750 MB here, for a few hundred pages of data.)
    """

    def __init__(self, memory: GuestMemory, slots: list[int] | None = None) -> None:
        self.memory = memory
        self.slots = slots if slots is not None else [s.info.slot for s in memory.slots]
        self._slots = {s.info.slot: s for s in memory.slots if s.info.slot in self.slots}
        self._views = {k: s.rows for k, s in self._slots.items()}
        self.shadow = {k: np.zeros(v.shape, v.dtype) for k, v in self._views.items()}
        #: Pages of each shadow that may be non-zero (written at least once).
        self._held = {k: np.zeros(len(v), bool) for k, v in self._views.items()}
        for k, s in self._slots.items():
            self._copy(k, s.populated_pages())

    def _copy(self, slot: int, pages: np.ndarray) -> None:
        self.shadow[slot][pages] = self._views[slot][pages]
        self._held[slot][pages] = True

    def apply(self, dirty: DirtySet) -> None:
        """Copy the reported pages from guest memory (guest paused, after the harvest)."""
        for slot, pages in dirty.items():
            if slot in self.shadow:
                self._copy(slot, pages)

    def stale(self) -> DirtySet:
        """Pages whose shadow differs from guest memory: writes tracking never reported."""
        parts = []
        for slot, view in self._views.items():
            held = self._held[slot].copy()
            held[self._slots[slot].populated_pages()] = True
            sh = self.shadow[slot]
            if held.all():  # dense: compare in place rather than gather every page
                diff = (sh.view(np.uint64) != view.view(np.uint64)).any(axis=1)
                parts.append((slot, np.flatnonzero(diff)))
                continue
            pages = np.flatnonzero(held)
            diff = (sh[pages].view(np.uint64) != view[pages].view(np.uint64)).any(axis=1)
            parts.append((slot, pages[diff]))
        return DirtySet.from_arrays(parts)


#: On a host that has the defect (6.18.44, this machine kind), the stimulus below found it within
#: this many epochs in every run: 5 runs in the platform notes, 20 runs of ``dirtyring doctor``.
FOUND_WITHIN_EPOCHS = 4_100


@dataclass(frozen=True, slots=True, kw_only=True)
class LostPage:
    """A page whose shadow differs from guest memory: written by the guest, never reported.

    ``word`` is the first 64-bit word that differs, ``shadow`` and ``memory`` its two values
    (for the dirtier's data pages word 2 is the guest's write count: ``memory > shadow`` means
    the page was reported once and written again since without being reported)."""

    slot: int
    page: int
    word: int
    shadow: int
    memory: int


@dataclass(frozen=True, slots=True, kw_only=True)
class DefectProbe:
    """What one run of :func:`reset_defect_probe` saw."""

    protected: bool  # the tracker blocked signals during the reset (dirtyring's protection)
    epochs: int  # epochs run (each: guest runs to its own exit, harvest + reset, check)
    seconds: float  # time spent running epochs (machine build and teardown excluded)
    budget_s: float
    lost_epoch: int | None  # the epoch at whose check stale pages were first found
    lost: tuple[LostPage, ...]
    #: After the loss, ``confirm_epochs`` more epochs with the protection on: every lost page
    #: was written again by the guest and is still unreported (the defect's signature: those
    #: pages stay writable and are never reported again). None if nothing was lost.
    still_lost: bool | None
    guest_writes: int  # the guest's write counter at the end: the stimulus really ran
    signalled_epochs: int  # epochs whose timer signal was pending when unblocked for harvest
    resyncs: int  # harvests that raised TrackingError (e.g. EINTR surfaced) and were resynced
    hot_pages: int  # the stimulus: pages the guest rewrites in order,
    exit_every: int  # ... leaving KVM_RUN after this many,
    period_us: int  # ... the signal's period

    @property
    def verdict(self) -> str:
        return "present" if self.lost else "not seen"


_libc = C.CDLL(None, use_errno=True)
_libc.pthread_sigmask.argtypes = [C.c_int, C.c_void_p, C.c_void_p]
_libc.sigpending.argtypes = [C.c_void_p]
_libc.timer_create.argtypes = [C.c_int, C.POINTER(_sigevent), C.POINTER(C.c_void_p)]
_libc.timer_settime.argtypes = [C.c_void_p, C.c_int, C.POINTER(_itimerspec), C.c_void_p]
_libc.timer_delete.argtypes = [C.c_void_p]
_SIGSET = C.c_uint8 * 128  # glibc's sigset_t
_SIGEV_THREAD_ID = 4
_CLOCK_MONOTONIC = 1


def _sigset(signum: int) -> C.Array[C.c_uint8]:
    s = _SIGSET()
    s[(signum - 1) // 8] = 1 << ((signum - 1) % 8)
    return s


class _PeriodicAlarm:
    """A periodic SIGALRM aimed at the calling thread (a POSIX timer with SIGEV_THREAD_ID).

    Like ``setitimer``, but another thread of the process (a test runner's, a sender's) can
    never take the signal instead of the thread that resets the rings."""

    def __init__(self, period_s: float) -> None:
        ev = _sigevent(sigev_signo=int(signal.SIGALRM), sigev_notify=_SIGEV_THREAD_ID,
                       sigev_notify_thread_id=threading.get_native_id())
        self._id = C.c_void_p()
        if _libc.timer_create(_CLOCK_MONOTONIC, C.byref(ev), C.byref(self._id)) != 0:
            raise DirtyringError(f"timer_create failed: {os.strerror(C.get_errno())}")
        spec = _itimerspec()
        ns = max(int(period_s * 1e9), 1000)
        for ts in (spec.it_interval, spec.it_value):
            ts.tv_sec, ts.tv_nsec = divmod(ns, 1_000_000_000)
        if _libc.timer_settime(self._id, 0, C.byref(spec), None) != 0:
            err = C.get_errno()
            self.close()
            raise DirtyringError(f"timer_settime failed: {os.strerror(err)}")

    def close(self) -> None:
        if self._id is not None:
            _libc.timer_delete(self._id)
            self._id = None  # type: ignore[assignment]


def _lost_page(check: ShadowCheck, slot: int, page: int) -> LostPage:
    a = check.shadow[slot][page].view(np.uint64)
    b = check._views[slot][page].view(np.uint64)
    w = int(np.flatnonzero(a != b)[0])
    return LostPage(slot=slot, page=page, word=w, shadow=int(a[w]), memory=int(b[w]))


def reset_defect_probe(*, protected: bool = False, seconds: float = 5.0,
                       max_epochs: int | None = None, period_us: int = 100, hot_pages: int = 64,
                       exit_every: int = 16, stop_on_loss: bool = True) -> DefectProbe:
    """Look for the KVM_RESET_DIRTY_RINGS signal defect with signals aimed at the reset.

    One vCPU run in this thread under ring tracking. The dirtier rewrites ``hot_pages`` pages
    in order and leaves KVM_RUN by itself (``out`` TICK) after every ``exit_every`` pages: an
    epoch. A periodic SIGALRM (every ``period_us``) is blocked while the guest runs, so it
    never interrupts KVM_RUN, and unblocked only around harvest + KVM_RESET_DIRTY_RINGS, so
    the signals land in the reset. A shadow updated only from reported pages is compared with
    the data pages after every epoch (all memory at the end). With ``protected`` False the
    tracker's own protection (blocking signals inside the reset) is switched off; with it
    True nothing may ever be lost.

    Runs until ``seconds`` have passed or ``max_epochs`` epochs ran, or (``stop_on_loss``)
    as soon as a page is lost; then confirms the loss (see ``DefectProbe.still_lost``).
    Must run on the main thread (it swaps the SIGALRM handler).
    """
    if threading.current_thread() is not threading.main_thread():
        raise DirtyringError("the reset-defect probe must run on the main thread")
    from .vm import Machine

    cfg = MachineConfig(guest="dirtier", tracker="ring", ring_entries=4096,
                        data_slots=(hot_pages * PAGE,), block_signals_in_reset=protected,
                        params=GuestParams(pattern=Pattern.HOT, hot_pages=hot_pages,
                                           exit_every=exit_every))
    alrm = _sigset(signal.SIGALRM)
    pending = _SIGSET()
    byte, bit = (signal.SIGALRM - 1) // 8, 1 << ((signal.SIGALRM - 1) % 8)
    old_handler = signal.getsignal(signal.SIGALRM)
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    m: Machine | None = None
    timer: _PeriodicAlarm | None = None
    try:
        # Inline: no vCPU thread; SIGALRM stays blocked in this thread, so KVM_RUN (which runs
        # with the thread's mask: no KVM_SET_SIGNAL_MASK here) never sees it.
        m = Machine(cfg, threaded=False)
        assert m.memory is not None and isinstance(m.tracker, RingTracker)
        rt, r = m.tracker, m.runners[0]
        run = r.fd.run
        rows = m.memory.slots[1].rows
        check = ShadowCheck(m.memory, slots=[1])
        whole = ShadowCheck(m.memory)
        _install_c_noop(signal.SIGALRM)
        limit = max_epochs if max_epochs is not None else 1 << 62
        n = signalled = resyncs = 0

        def guest_epoch() -> None:
            """Run the guest until it leaves KVM_RUN by itself (a port or a full ring)."""
            while True:
                reason = run()
                r.exits[reason] += 1
                x = serve(r, reason)  # a full ring: the tracker notes it (Machine.on_ring_full)
                if x is Exit.CRASHED:
                    raise GuestCrashed(f"reset-defect probe: {r.crash}")
                if x is not Exit.SIGNAL:
                    r.ring_full = False
                    return

        def harvest(open_window: bool) -> DirtySet:
            nonlocal resyncs
            if open_window:
                _libc.pthread_sigmask(signal.SIG_UNBLOCK, alrm, None)
            try:
                return rt.harvest()
            except TrackingError:
                resyncs += 1
                _libc.pthread_sigmask(signal.SIG_BLOCK, alrm, None)
                return rt.full()
            finally:
                _libc.pthread_sigmask(signal.SIG_BLOCK, alrm, None)

        lost_at: int | None = None
        stale = DirtySet()
        timer = _PeriodicAlarm(period_us / 1e6)
        t0 = time.monotonic()
        deadline = t0 + seconds
        while n < limit and time.monotonic() < deadline:
            guest_epoch()
            n += 1
            _libc.sigpending(pending)
            if pending[byte] & bit:
                signalled += 1
            dirty = harvest(True)
            check.apply(dirty)
            whole.apply(dirty)
            s = check.stale()
            if s:
                stale = stale | s
                if lost_at is None:
                    lost_at = n
                if stop_on_loss:
                    break
        elapsed = time.monotonic() - t0
        timer.close()
        timer = None
        if lost_at is None:
            stale = whole.stale()
            if stale:
                lost_at = n
        lost = tuple(_lost_page(whole, sl, int(p)) for sl, pages in stale.items() for p in pages)
        still: bool | None = None
        if lost:
            # Confirm with signals blocked and the protection on: each lost data page is
            # written again (two passes of the hot set) and still never reported.
            rt.block_signals = True
            before = {p.page: int(rows[p.page].view(np.uint64)[2]) for p in lost if p.slot == 1}
            for _ in range(math.ceil(2 * hot_pages / exit_every)):
                guest_epoch()
                d = harvest(False)
                check.apply(d)
                whole.apply(d)
            after = whole.stale()
            still = all((p.slot, p.page) in after for p in lost) and all(
                int(rows[pg].view(np.uint64)[2]) > c for pg, c in before.items())
        return DefectProbe(protected=protected, epochs=n, seconds=elapsed, budget_s=seconds,
                           lost_epoch=lost_at, lost=lost, still_lost=still,
                           guest_writes=m.progress(), signalled_epochs=signalled,
                           resyncs=resyncs, hot_pages=hot_pages, exit_every=exit_every,
                           period_us=period_us)
    finally:
        if timer is not None:
            timer.close()
        signal.sigtimedwait({signal.SIGALRM}, 0)  # drop a signal the timer left pending
        if m is not None:
            m.close()
        signal.signal(signal.SIGALRM, old_handler if old_handler is not None else signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def _install_c_noop(signum: int) -> None:
    """Install a C-level handler that does nothing for ``signum``.

    A Python-level handler runs in the main thread for every signal, which alone would stretch
    the harvest the signals are aimed at. Any async-signal-safe libc function taking one int
    and ignoring it serves as a C no-op; we use getpid. (glibc's signal() installs it with
    SA_RESTART; the kernel's reset still sees the pending signal, which is the point.)
    """
    libc = C.CDLL(None)
    handler = C.cast(libc.getpid, C.c_void_p).value
    libc.signal.restype = C.c_void_p
    libc.signal.argtypes = [C.c_int, C.c_void_p]
    libc.signal(signum, handler)
