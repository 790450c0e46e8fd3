"""End-to-end checks of dirty tracking: a shadow copy of guest memory updated *only* from reported
pages must equal guest memory whenever the guest is paused after a harvest.

This catches every kind of loss (a kernel defect, a harvest bug, a VMM write not marked dirty),
which is why replication's verify mode, the test suite and ``dirtyring doctor`` all use it.
It also hosts the self-test for the host's KVM_RESET_DIRTY_RINGS defect.
"""
from __future__ import annotations

import ctypes as C
import signal
import time
from dataclasses import dataclass

import numpy as np

from ..guests.protocol import GuestParams, Pattern
from ..tracking import DirtySet
from .config import MachineConfig
from .epoch import EpochDriver
from .memory import GuestMemory

PAGE = 4096


class ShadowCheck:
    """A shadow of guest memory, advanced only by reported dirty pages."""

    def __init__(self, memory: GuestMemory, slots: list[int] | None = None) -> None:
        self.memory = memory
        self.slots = slots if slots is not None else [s.info.slot for s in memory.slots]
        self._views = {s.info.slot: s.rows for s in memory.slots
                       if s.info.slot in self.slots}
        self.shadow = {k: v.copy() for k, v in self._views.items()}

    def apply(self, dirty: DirtySet) -> None:
        """Copy the reported pages from guest memory (guest paused, after the harvest)."""
        for slot, pages in dirty.items():
            if slot in self.shadow:
                self.shadow[slot][pages] = self._views[slot][pages]

    def stale(self) -> DirtySet:
        """Pages whose shadow differs from guest memory: writes tracking never reported."""
        parts = []
        for slot, view in self._views.items():
            sh = self.shadow[slot]
            diff = (sh.view(np.uint64) != view.view(np.uint64)).any(axis=1)
            parts.append((slot, np.flatnonzero(diff)))
        return DirtySet.from_arrays(parts)


@dataclass(frozen=True, slots=True, kw_only=True)
class ResetDefectResult:
    """What the reset-defect self-test saw, one run per protection setting."""

    protected: bool
    epochs: int
    lost_epoch: int | None  # first epoch at which stale pages were found
    stale_pages: int
    seconds: float

    @property
    def lost(self) -> bool:
        return self.lost_epoch is not None


def reset_defect_run(*, protected: bool, epochs: int, storm_us: int = 20, first_us: int = 5,
                     interval: float = 0.0001, hot_pages: int = 64,
                     stop_on_loss: bool = True) -> ResetDefectResult:
    """Run a 64-page hot-set dirtier under ring tracking with a SIGALRM storm (every
    ``storm_us`` µs) armed only around harvest + reset, checking the shadow every epoch.

    With ``protected`` False the tracker does not block signals during KVM_RESET_DIRTY_RINGS,
    which on an affected kernel loses pages; with it True no page may ever go stale.
    Must run on the main thread (signal handlers).
    """
    from .vm import Machine

    cfg = MachineConfig(guest="dirtier", tracker="ring", ring_entries=4096,
                        data_slots=(hot_pages * PAGE,), block_signals_in_reset=protected,
                        params=GuestParams(pattern=Pattern.HOT, hot_pages=hot_pages))
    old = signal.getsignal(signal.SIGALRM)
    # Inline machines keep SIGALRM blocked in this thread (see machine/vcpu.py); the storm must
    # reach the thread that resets the rings, so unblock it for the duration.
    old_mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGALRM})
    _install_c_noop(signal.SIGALRM)
    m = Machine(cfg)
    t0 = time.monotonic()
    lost_at: int | None = None
    stale = 0
    try:
        drv = EpochDriver(m)
        assert m.memory is not None
        m.pause_all()
        drv.tracker.full()
        # Each epoch compares the data slot (the hot set); all memory is compared at the end.
        check = ShadowCheck(m.memory, slots=[1])
        whole = ShadowCheck(m.memory)
        n = 0
        for n in range(1, epochs + 1):
            m.resume_all()
            if interval:
                m.attention.wait(interval)
            m.pause_all()
            signal.setitimer(signal.ITIMER_REAL, first_us / 1e6, storm_us / 1e6)
            try:
                dirty, resync = drv.harvest_paused()
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            check.apply(dirty)
            whole.apply(dirty)
            s = check.stale()
            if s:
                stale = max(stale, len(s))
                if lost_at is None:
                    lost_at = n
                if stop_on_loss:
                    break
            m.check()
        if lost_at is None:
            s = whole.stale()
            if s:
                lost_at, stale = n, len(s)
        return ResetDefectResult(protected=protected, epochs=n, lost_epoch=lost_at,
                                 stale_pages=stale, seconds=time.monotonic() - t0)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        m.close()
        signal.signal(signal.SIGALRM, old if old is not None else signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def _install_c_noop(signum: int) -> None:
    """Install a C-level handler that does nothing for ``signum``.

    A Python-level handler runs in the main thread for every signal; at one signal per 20 µs
    that alone stalls the thread doing the harvest. Any async-signal-safe libc function taking
    one int and ignoring it serves as a C no-op; we use getpid. (glibc's signal() installs it
    with SA_RESTART; the kernel's reset still sees the pending signal, which is the point.)
    """
    libc = C.CDLL(None)
    handler = C.cast(libc.getpid, C.c_void_p).value
    libc.signal.restype = C.c_void_p
    libc.signal.argtypes = [C.c_int, C.c_void_p]
    libc.signal(signum, handler)
