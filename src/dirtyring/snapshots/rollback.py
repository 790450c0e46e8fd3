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
  pending events are written with one memmove into kvm_run's sync-regs area with
  ``kvm_dirty_regs`` set, so KVM loads them on the next KVM_RUN without an ioctl; XSAVE
  (x87/SSE/AVX, which the compiled guests do use) costs one KVM_SET_XSAVE. Control registers,
  descriptor tables, XCR0, MSRs, the LAPIC and the MP state can only be changed by CPL0 code or
  the VMM, and our guests run at CPL3. The TSC is not rewound (a guest reading it sees time go
  on). A vCPU that crashed is restored exactly. Until the next KVM_RUN the kernel still holds
  the old registers: ``VcpuFd``'s getters return the pending copy, and its setters supersede it
  (they clear the ``kvm_dirty_regs`` bit), so an exact restore after a fast one is not undone.
* exact: ``Machine.restore_state`` (every ioctl, TSC included): about 8 ioctls more.

Use ``Machine(config, threaded=False)`` for speed: the vCPU then runs in the calling thread and
a pause costs nothing. ``run()`` then drives KVM_RUN itself rather than through
``VcpuRunner.run_inline``; for a guest that runs from the root to its DONE this cut the run
part of an iteration from ~57 to ~43 µs here (the whole iteration from ~110 to ~92 µs):

* The guest's DONE (``out`` to the control port) goes straight to the control device, without
  the generic port dispatch (~4 µs).
* The timer that bounds the run is armed by one C call with prebuilt arguments (~2 µs).
* The DONE instruction is not completed by a second KVM_RUN with ``immediate_exit`` (~8 µs):
  the rollback rewinds RIP anyway. On hardware KVM a port ``out`` exits with RIP still on the
  instruction and completes on the next KVM_RUN, which first loads the sync area and then runs
  ``complete_fast_pio_out``; that only skips the instruction if the linear RIP is still the
  one of the ``out`` (``kvm_is_linear_rip``), so after a rollback to another RIP it does
  nothing. When the root's RIP *is* that address, we complete the I/O before restoring
  (``_settle_io``). An emulated ``out`` (this host's kvm_pvm) completes before the exit, and
  KVM leaves nothing pending. ``mark()`` always completes it first, so a root never holds a
  half-done instruction; code that saves the vCPU state between ``run()`` and ``rollback()``
  should call ``complete_io()`` first.

Any other first exit (a port the guest ticks, the run's time running out, a full ring, a
crash) is served by ``VcpuRunner.inline_exit`` (``machine/exits.py``: the one dispatch of every
run loop), and the run goes on in ``run_inline``.

Where an iteration's time goes now (64-page hot set, p50 here, each step slower right after
a guest run than alone: the world switch leaves caches and TLB cold): KVM_RUN ~34 µs (27 µs
round trip plus the guest's writes), timer and DONE ~9, hot-set harvest ~17 (two
KVM_GET_DIRTY_LOG), page copy ~11, KVM_SET_XSAVE ~8, device restores ~4, the rest ~9 of Python.
"""
from __future__ import annotations

import ctypes as C
import threading
import time
from dataclasses import dataclass

import numpy as np

from .._bindings import _uapi as U
from ..errors import ConfigError, TrackingError
from ..guests.protocol import Port
from ..machine.exits import BUDGET, INTERVAL, STOPPED, StopReason, out_value
from ..machine.state import MachineState
from ..machine.vcpu import (ThreadTimer, VcpuRunner, disarm, install_alarm_handler,
                             thread_timer)
from ..machine.vm import Machine
from ..tracking import DirtySet
from ..machine.fingerprint import fingerprint

_SYNC_ALL = U.KVM_SYNC_X86_REGS | U.KVM_SYNC_X86_SREGS | U.KVM_SYNC_X86_EVENTS
#: struct kvm_sync_regs is regs, sregs, events back to back: the fast restore is one copy.
_SYNC_BYTES = C.sizeof(U.kvm_regs) + C.sizeof(U.kvm_sregs) + C.sizeof(U.kvm_vcpu_events)
assert U.kvm_sync_regs.events.offset + C.sizeof(U.kvm_vcpu_events) == _SYNC_BYTES
#: Copy run by run (slices) up to this many runs; beyond, one numpy gather/scatter.
_MAX_SLICE_RUNS = 16
_DONE = int(Port.DONE)
_EFER_LMA = 1 << 10


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class RollbackPoint:
    """The root: a copy of all guest memory (per slot, pages x 4096), the machine state, and
    the memory fingerprint (``fingerprint.fingerprint``) to check a rollback against.

    Example::

        root = rb.mark()
        rb.run(0.01); rb.rollback()
        assert dirtyring.fingerprint(m.memory) == root.digest
    """

    memory: tuple[np.ndarray, ...]
    state: MachineState
    digest: bytes
    progress: int


@dataclass(frozen=True, slots=True, kw_only=True)
class RollbackStats:
    """Counters of a :class:`Rollback` (cumulative times in microseconds).

    Example::

        st = rb.statistics()
        print(st.rollbacks, st.pages_restored / st.rollbacks, st.copy_us / st.rollbacks)
    """

    rollbacks: int
    pages_restored: int
    full_restores: int  # tracking could not vouch for a harvest: all memory was copied
    harvest_us: float  # cumulative
    copy_us: float
    state_us: float
    #: A guest's last ``out`` completed by an extra KVM_RUN (root RIP on it, or ``mark()``).
    io_completions: int = 0


def _linear_rip(rip: int, efer: int, cs_base: int, cs_long: int) -> int:
    """KVM's ``kvm_get_linear_rip``: RIP in 64-bit mode, else (CS.base + RIP) mod 2^32. The
    pending completion of an ``out`` acts only while this still equals its value at the exit."""
    if efer & _EFER_LMA and cs_long:
        return rip
    return (cs_base + rip) & 0xFFFFFFFF


class _ExitRip:
    """The linear RIP at the last exit, read from kvm_run's sync area through scalar views
    (no struct copies: ~0.7 µs instead of ~1.7 µs right after a guest run)."""

    def __init__(self, run: U.kvm_run) -> None:
        base = C.addressof(run.s.regs)
        sregs = base + U.kvm_sync_regs.sregs.offset
        cs = sregs + U.kvm_sregs.cs.offset
        # SAFETY: every view lies inside the sync area of the live kvm_run mapping.
        self.rip = C.c_uint64.from_address(base + U.kvm_regs.rip.offset)
        self.efer = C.c_uint64.from_address(sregs + U.kvm_sregs.efer.offset)
        self.cs_base = C.c_uint64.from_address(cs + U.kvm_segment.base.offset)
        self.cs_l = C.c_uint8.from_address(cs + U.kvm_segment.l.offset)

    def value(self) -> int:
        return _linear_rip(self.rip.value, self.efer.value, self.cs_base.value, self.cs_l.value)


class _VcpuRoot:
    """One vCPU's root state, ready for the fast restore."""

    __slots__ = ("runner", "sync_addr", "sync", "xsave", "finished", "linear_rip")

    def __init__(self, runner: VcpuRunner, regs: bytes, sregs: bytes, events: bytes,
                 xsave: bytes, finished: bool) -> None:
        self.runner = runner
        self.sync_addr = C.addressof(runner.run_struct.s.regs)
        self.sync = regs + sregs + events  # laid out as struct kvm_sync_regs
        assert len(self.sync) == _SYNC_BYTES
        self.xsave = U.kvm_xsave.from_buffer_copy(xsave)
        self.finished = finished
        sr = U.kvm_sregs.from_buffer_copy(sregs)
        self.linear_rip = _linear_rip(U.kvm_regs.from_buffer_copy(regs).rip, sr.efer,
                                      sr.cs.base, sr.cs.l)


class _FastState:
    """The root's vCPU and device state as ready-made kernel structs and bound restores."""

    def __init__(self, machine: Machine, state: MachineState) -> None:
        self.vcpus = [_VcpuRoot(r, v.regs, v.sregs, v.events, v.xsave, v.finished)
                      for r, v in zip(machine.runners, state.vcpus)]
        data = {x.name: x.data for x in state.devices}
        self.devices = [(d.restore, data[d.name]) for d in machine.devices if d.name in data]


class Rollback:
    """Roll ``machine`` back to a root point again and again (see the module docstring).

    Args:
        machine: built with a tracker for dirty-page rollback; with ``tracker="none"`` every
            rollback copies all memory (the baseline a tracker is measured against).
        exact: restore the vCPU state with every ioctl instead of the fast CPL3 subset.

    Example::

        cfg = dirtyring.MachineConfig(tracker="hotset", data_slots=(1 << 20,))
        m = dirtyring.Machine(cfg, threaded=False)
        rb = dirtyring.Rollback(m)
        rb.mark()                                # the root
        for _ in range(1000):
            m.set_control("seed", random.getrandbits(62))   # this run's input
            m.set_control("max_writes", 200)     # the dirtier says DONE after 200 writes
            rb.run(1.0)                          # until the guest's DONE
            rb.rollback()                        # back to the root
    """

    def __init__(self, machine: Machine, *, exact: bool = False) -> None:
        if machine.memory is None:
            raise ConfigError("rollback needs a built machine")
        self.m = machine
        self.tracker = machine.tracker
        sync = all(r.run_struct.kvm_valid_regs & _SYNC_ALL == _SYNC_ALL for r in machine.runners)
        self.exact = exact or not sync
        self._views = [s.rows for s in machine.memory.slots]
        self.root: RollbackPoint | None = None
        self._fast: _FastState | None = None
        self._pending: DirtySet | None = None  # harvested during run() (ring full)
        self._n = self._pages = self._full = self._completions = 0
        self._h = self._c = self._s = 0.0
        # The inline driver (single vCPU, see the module docstring).
        self._runner = machine.runners[0]
        self._io = self._runner.run_struct.u.io  # a view into kvm_run
        self._run_addr = C.addressof(self._runner.run_struct)
        self._exit_rip = _ExitRip(self._runner.run_struct)
        self._control = machine.control
        assert _DONE in self._control.ports
        self._inline_thread = 0  # the thread whose signal setup the inline run made
        self._timer: ThreadTimer  # that thread's timer (set with _inline_thread)
        #: The last run ended on DONE whose ``out`` KVM may still complete on the next KVM_RUN.
        self._open_io = False

    # --- root ------------------------------------------------------------------------------------
    def mark(self) -> RollbackPoint:
        """Make the current state the root (pauses the guest; a threaded one stays paused)."""
        m = self.m
        assert m.memory is not None
        m.pause_all()
        self.complete_io()
        if self.tracker is not None:
            self.tracker.full()  # every page armed: any later change is harvested
        self._pending = None
        # Copy only what the memfds hold: holes read as zero, and reading them would allocate
        # them (np.zeros, unlike zeros_like, stays unallocated until written).
        mem = []
        for s, v in zip(m.memory.slots, self._views):
            root = np.zeros(v.shape, v.dtype)
            _copy_pages(root, v, s.populated_pages(), max_slice_runs=1 << 30)
            mem.append(root)
        state = m.capture_state()
        self.root = RollbackPoint(memory=tuple(mem), state=state, digest=fingerprint(m.memory),
                                  progress=m.progress())
        self._fast = _FastState(m, state)
        return self.root

    # --- running ---------------------------------------------------------------------------------
    def run(self, seconds: float = 1.0) -> StopReason:
        """Run the guest until it stops (finishes or crashes) or ``seconds`` pass, and leave it
        paused. A ring that fills is harvested into the next rollback's set and the guest goes
        on. Returns ``STOPPED`` or ``INTERVAL`` (equal to "stopped", "interval")."""
        m = self.m
        end = time.perf_counter() + seconds
        if not m.threaded:
            left = seconds
            while True:
                why = self._run_inline(left)
                if why is not BUDGET:
                    return why
                self._add_pending(self._harvest())
                left = end - time.perf_counter()
                if left <= 0:
                    return INTERVAL
        while True:
            left = end - time.perf_counter()
            if left <= 0:
                return INTERVAL
            m.resume_all()
            m.attention.wait(left)
            m.pause_all()
            why = STOPPED if m.stopped_event.is_set() else (
                BUDGET if any(r.ring_full for r in m.runners) else INTERVAL)
            if why is INTERVAL and end - time.perf_counter() > 0:
                continue  # woken with nothing to do (a stale wake-up): keep running
            if why is BUDGET:
                self._add_pending(self._harvest())
                continue
            return why

    def _run_inline(self, seconds: float) -> StopReason:
        """One inline run: ``STOPPED``, ``INTERVAL`` or ``BUDGET``, as
        ``VcpuRunner.run_inline``. A first exit on DONE ends it at once (see the module
        docstring); after any other exit the run goes on in ``run_inline``."""
        r = self._runner
        if r.finished or r.crash:
            return STOPPED
        if self._inline_thread != threading.get_native_id():
            install_alarm_handler()  # SIGALRM blocked here: an expiry in Python stays pending
            r.fd.set_signal_mask(set())  # and interrupts the next KVM_RUN at once
            self._timer = thread_timer()
            self._inline_thread = threading.get_native_id()
        rs, io, timer = r.run_struct, self._io, self._timer
        start = time.monotonic()
        r.parked = False
        rs.immediate_exit = 0
        timer.arm(seconds)
        try:
            reason = r.fd.run()
            r.fd.sync_valid = True
            r.exits[reason] += 1
            if reason == U.KVM_EXIT_IO and io.port == _DONE \
                    and io.direction == U.KVM_EXIT_IO_OUT:
                self._control.io_out(r, _DONE, out_value(self._run_addr, io), io.size)
                self._open_io = True
                return STOPPED
            r.deadline = start + seconds  # device handlers that block never wait past it
            why = r.inline_exit(reason, timer)  # as run_inline serves it
        finally:
            disarm(timer)
            r.deadline = 0.0
            rs.immediate_exit = 0
            r.ring_full = False
            r.parked = True
        if why is not None:
            return why
        left = start + seconds - time.monotonic()
        return r.run_inline(left) if left > 0 else INTERVAL

    @staticmethod
    def _complete(r: VcpuRunner) -> None:
        """A KVM_RUN that completes a pending I/O instruction and returns without entering the
        guest (``immediate_exit``)."""
        r.complete_io()
        r.fd.sync_valid = True
        r.run_struct.immediate_exit = 0

    def complete_io(self) -> None:
        """Finish the guest's last ``out`` now, as ``run_inline`` would have (no-op if none is
        open): needed only before inspecting or saving the vCPU between run() and rollback()."""
        if self._open_io:
            self._open_io = False
            self._complete(self._runner)
            self._completions += 1

    def _settle_io(self, root: _VcpuRoot) -> None:
        """Before loading the root: an open ``out`` completion must not act on the root's RIP.
        It only acts if the linear RIP is still the one of the ``out``, so complete it first
        exactly when the root's linear RIP is that one."""
        self._open_io = False
        if self._exit_rip.value() == root.linear_rip:
            self._complete(self._runner)
            self._completions += 1

    def _add_pending(self, ds: DirtySet) -> None:
        self._pending = ds if self._pending is None else self._pending | ds

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
        if m.threaded:
            m.pause_all()
        t0 = time.perf_counter()
        if self.tracker is not None:
            dirty = self._harvest()  # collect + re-arm first, then copy: no write is missed
            if self._pending is not None:
                dirty, self._pending = dirty | self._pending, None
        t1 = time.perf_counter()
        n = 0
        views, memory = self._views, root.memory
        if full or self.tracker is None:
            for v, r in zip(views, memory):
                np.copyto(v, r)
                n += len(v)
        else:
            for slot, pages in dirty.pages.items():
                _copy_pages(views[slot], memory[slot], pages)
                n += len(pages)
        t2 = time.perf_counter()
        if self._open_io:
            self._settle_io(fast.vcpus[0])
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
        for v in fast.vcpus:
            r = v.runner
            # SAFETY: the vCPU is out of KVM_RUN (paused); _SYNC_BYTES is the regs, sregs and
            # events part of the sync area inside the kvm_run mapping. KVM reads it on entry.
            C.memmove(v.sync_addr, v.sync, _SYNC_BYTES)
            r.run_struct.kvm_dirty_regs = _SYNC_ALL
            r.fd.sync_written = True  # its getters/setters now honour the pending copy
            r.fd.set_xsave(v.xsave)
            r.finished = v.finished
            r.crash = None
            r.fd.sync_valid = True  # the sync area holds the state the vCPU resumes with
        for restore, data in fast.devices:
            restore(data)
        self.m.stopped_event.clear()

    def statistics(self) -> RollbackStats:
        return RollbackStats(rollbacks=self._n, pages_restored=self._pages,
                             full_restores=self._full, harvest_us=self._h * 1e6,
                             copy_us=self._c * 1e6, state_us=self._s * 1e6,
                             io_completions=self._completions)


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
