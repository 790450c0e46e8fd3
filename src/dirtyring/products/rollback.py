"""Fast in-memory rollback to a root point, as snapshot fuzzers do: mark a root, run the guest,
restore only the pages the tracker reports dirty plus the vCPU state, and again, and again.

Theory of operation
-------------------
``mark()`` (guest paused) re-arms tracking for every page (``tracker.full()``), copies all guest
memory and captures the machine state: from then on every page that differs from the root is
in the tracker's next harvest, whoever wrote it (the guest, KVM on its behalf, or a VMM device,
which marks its writes dirty).

``rollback()`` (guest paused) harvests, *then* copies the root's pages over the harvested ones,
then loads the root's vCPU and device state. The order matters: the harvest re-arms write
protection of the pages it reports, so the next guest write to a page we just restored is seen
again. Our own copy is a VMM write that restores the root's contents; it is deliberately not
marked dirty (the page no longer differs from the root). With the hot-set tracker, recently
dirtied pages are left writable and reported by every harvest whether written or not; they are
simply restored every time, which is correct and avoids a write-protect fault per page per
iteration (~2.2 µs each here): that is why it is the fastest tracker for this loop.

The vCPU state is restored in one of two ways:

* fast (default): only what code at CPL3 can change. General registers, segment registers and
  pending events go into kvm_run's sync-regs area with ``kvm_dirty_regs`` set, so KVM loads them
  on the next KVM_RUN without an ioctl; XSAVE (x87/SSE/AVX) costs one KVM_SET_XSAVE. Control
  registers, descriptor tables, XCR0, MSRs, the LAPIC and the MP state can only be changed by
  CPL0 code or the VMM, and our guests run at CPL3. The TSC is not rewound (a guest reading it
  sees time go on). A vCPU that crashed is restored exactly.
* exact: ``Machine.restore_state`` (every ioctl, TSC included): about 8 ioctls more.

Use ``Machine(config, threaded=False)`` for speed: the vCPU then runs in the calling thread
(``run()`` calls ``run_inline``), and a pause costs nothing.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .._bindings import _uapi as U
from ..errors import ConfigError, TrackingError
from ..machine.state import MachineState
from ..machine.vm import Machine
from ..tracking import DirtySet
from .snapshot import fingerprint, populated_pages

PAGE = 4096
_SYNC_ALL = U.KVM_SYNC_X86_REGS | U.KVM_SYNC_X86_SREGS | U.KVM_SYNC_X86_EVENTS
#: Copy run by run (slices) up to this many runs; beyond, one numpy gather/scatter.
_MAX_SLICE_RUNS = 16


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class RollbackPoint:
    """The root: a copy of all guest memory (per slot, pages x 4096), the machine state, and
    the memory fingerprint (``snapshot.fingerprint``) to check a rollback against."""

    memory: tuple[np.ndarray, ...]
    state: MachineState
    digest: bytes
    progress: int


@dataclass(frozen=True, slots=True, kw_only=True)
class RollbackStats:
    rollbacks: int
    pages_restored: int
    full_restores: int  # tracking could not vouch for a harvest: all memory was copied
    harvest_us: float  # cumulative
    copy_us: float
    state_us: float


class _FastState:
    """The root's vCPU state as ready-made kernel structs, for the fast restore."""

    def __init__(self, machine: Machine, state: MachineState) -> None:
        self.vcpus = []
        for r, v in zip(machine.runners, state.vcpus):
            self.vcpus.append((r, U.kvm_regs.from_buffer_copy(v.regs),
                               U.kvm_sregs.from_buffer_copy(v.sregs),
                               U.kvm_vcpu_events.from_buffer_copy(v.events),
                               U.kvm_xsave.from_buffer_copy(v.xsave), v.finished))
        self.devices = [(d, {x.name: x.data for x in state.devices}.get(d.name))
                        for d in machine.devices]


class Rollback:
    """Roll ``machine`` back to a root point again and again (see the module docstring).

    Args:
        machine: built with a tracker for dirty-page rollback; with ``tracker="none"`` every
            rollback copies all memory (the baseline a tracker is measured against).
        exact: restore the vCPU state with every ioctl instead of the fast CPL3 subset.
    """

    def __init__(self, machine: Machine, *, exact: bool = False) -> None:
        if machine.memory is None:
            raise ConfigError("rollback needs a built machine")
        self.m = machine
        self.tracker = machine.tracker
        sync = all(r.run_struct.kvm_valid_regs & _SYNC_ALL == _SYNC_ALL for r in machine.runners)
        self.exact = exact or not sync
        self._views = [s.view.reshape(-1, PAGE) for s in machine.memory.slots]
        self.root: RollbackPoint | None = None
        self._fast: _FastState | None = None
        self._pending = DirtySet()
        self._n = self._pages = self._full = 0
        self._h = self._c = self._s = 0.0

    # --- root ------------------------------------------------------------------------------------
    def mark(self) -> RollbackPoint:
        """Make the current state the root (pauses the guest; a threaded one stays paused)."""
        m = self.m
        assert m.memory is not None
        m.pause_all()
        if self.tracker is not None:
            self.tracker.full()  # every page armed: any later change is harvested
        self._pending = DirtySet()
        # Copy only what the memfds hold: holes read as zero, and reading them would allocate
        # them (np.zeros, unlike zeros_like, stays unallocated until written).
        mem = []
        for s, v in zip(m.memory.slots, self._views):
            root = np.zeros(v.shape, v.dtype)
            _copy_pages(root, v, populated_pages(s), max_slice_runs=1 << 30)
            mem.append(root)
        state = m.capture_state()
        self.root = RollbackPoint(memory=tuple(mem), state=state, digest=fingerprint(m.memory),
                                  progress=m.progress())
        self._fast = _FastState(m, state)
        return self.root

    # --- running ---------------------------------------------------------------------------------
    def run(self, seconds: float = 1.0) -> str:
        """Run the guest until it stops (finishes or crashes) or ``seconds`` pass, and leave it
        paused. A ring that fills is harvested into the next rollback's set and the guest goes
        on. Returns "stopped" or "interval"."""
        m = self.m
        end = time.perf_counter() + seconds
        while True:
            left = end - time.perf_counter()
            if left <= 0:
                return "interval"
            if m.threaded:
                m.resume_all()
                m.attention.wait(left)
                m.pause_all()
                why = "stopped" if m.stopped_event.is_set() else (
                    "budget" if any(r.ring_full for r in m.runners) else "interval")
                if why == "interval" and end - time.perf_counter() > 0:
                    continue  # woken with nothing to do (a stale wake-up): keep running
            else:
                why = m.runners[0].run_inline(left)
            if why == "budget":
                self._pending = self._pending | self._harvest()
                continue
            return "stopped" if why == "stopped" else "interval"

    def _harvest(self) -> DirtySet:
        assert self.tracker is not None
        try:
            return self.tracker.harvest()
        except TrackingError:
            self._full += 1
            return self.tracker.full()

    # --- rolling back ----------------------------------------------------------------------------
    def rollback(self, *, full: bool = False) -> int:
        """Restore the root (the guest must be paused: after ``run()``, or ``pause_all()``).
        ``full`` copies all memory instead of the dirty pages. Returns the pages restored."""
        root, fast = self.root, self._fast
        if root is None or fast is None:
            raise ConfigError("rollback() before mark()")
        m = self.m
        m.pause_all()
        t0 = time.perf_counter()
        if self.tracker is not None:
            dirty = self._harvest()  # collect + re-arm first, then copy: no write is missed
            if self._pending:
                dirty, self._pending = dirty | self._pending, DirtySet()
        t1 = time.perf_counter()
        n = 0
        if full or self.tracker is None:
            for v, r in zip(self._views, root.memory):
                np.copyto(v, r)
                n += len(v)
        else:
            for slot, pages in dirty.items():
                _copy_pages(self._views[slot], root.memory[slot], pages)
                n += len(pages)
        t2 = time.perf_counter()
        if self.exact or any(r.crash for r in m.runners):
            m.restore_state(root.state)
        else:
            self._restore_fast(fast)
        t3 = time.perf_counter()
        self._n += 1
        self._pages += n
        self._h += t1 - t0
        self._c += t2 - t1
        self._s += t3 - t2
        return n

    def _restore_fast(self, fast: _FastState) -> None:
        for r, regs, sregs, events, xsave, finished in fast.vcpus:
            rs = r.run_struct
            # SAFETY: the vCPU is out of KVM_RUN (paused); KVM reads the sync area on entry.
            sync = rs.s.regs
            sync.regs = regs
            sync.sregs = sregs
            sync.events = events
            rs.kvm_dirty_regs = _SYNC_ALL
            r.fd.set_xsave(xsave)
            r.finished = finished
            r.crash = None
            r.fd.sync_valid = True  # the sync area holds the state the vCPU resumes with
        for d, data in fast.devices:
            if data is not None:
                d.restore(data)
        self.m.stopped_event.clear()

    def statistics(self) -> RollbackStats:
        return RollbackStats(rollbacks=self._n, pages_restored=self._pages,
                             full_restores=self._full, harvest_us=self._h * 1e6,
                             copy_us=self._c * 1e6, state_us=self._s * 1e6)


def _copy_pages(dst: np.ndarray, src: np.ndarray, pages: np.ndarray, *,
                max_slice_runs: int = _MAX_SLICE_RUNS) -> None:
    """dst[pages] = src[pages] for sorted unique page indices, by runs when there are few."""
    n = len(pages)
    if n <= 4:
        for p in pages.tolist():
            dst[p] = src[p]
        return
    first, last = int(pages[0]), int(pages[-1])
    if last - first + 1 == n:
        dst[first:last + 1] = src[first:last + 1]
        return
    breaks = np.flatnonzero(np.diff(pages) != 1)
    if len(breaks) >= max_slice_runs:
        dst[pages] = src[pages]
        return
    start = 0
    for b in breaks.tolist() + [n - 1]:
        a, z = int(pages[start]), int(pages[b]) + 1
        dst[a:z] = src[a:z]
        start = b + 1
