"""Dirty-ring tracking (KVM_CAP_DIRTY_LOG_RING).

Theory of operation
-------------------
Each vCPU has a ring of ``struct kvm_dirty_gfn {u32 flags; u32 slot; u64 offset}`` mapped from
its fd. KVM pushes an entry (flags = DIRTY) when the vCPU, or KVM on its behalf (kvmclock, steal
time), first writes a write-protected page. We keep a free-running fetch index per vCPU and read
entries in order while flags has DIRTY, store RESET into each, and then call
KVM_RESET_DIRTY_RINGS once for all vCPUs, which re-protects those pages and frees the entries.

Harvest is vectorised with numpy views of the mapped ring: we probe a growing window from the
fetch index (64, 256, 1024 … entries), so the cost follows the number of dirty entries, not the
ring size.

Host defect handled here: on Linux 6.17+ KVM_RESET_DIRTY_RINGS bails out when a signal is
pending and leaves the last gathered batch unprotected forever (see shared platform notes). We
block every blockable signal in the calling thread for the duration of the reset. EINTR from the
reset is then a bug to report: we raise TrackingError so the caller resyncs.

Harvesting without re-arming (``harvest_unarmed``): KVM_RESET_DIRTY_RINGS re-protects the page
of every entry it frees, unless the entry's slot id names no memslot (``kvm_reset_dirty_gfn``
checks it). Overwriting the slot id of consumed entries therefore frees them and leaves their
pages writable: the guest's next writes to them cost no fault and push no entry. The tracker
remembers which pages it left writable that way (``unarmed()``) until everything is re-armed.

Overflow: a ring-full exit with nothing to harvest, an entry for an unknown slot or an offset
past the slot's end, or a completely DIRTY ring mean entries may have been lost (seen with
emulated CPL0 guests): RingOverflow, and the caller must resync (``full()``).
"""
from __future__ import annotations

import ctypes as C
import signal
import time
from typing import Any, Callable, TypeVar

import numpy as np

from .._bindings import VcpuFd, VmFd
from .._bindings import _uapi as U
from ..errors import KvmError, RingOverflow, TrackingError
from .dirtyset import DirtySet
from .tracker import (TrackedSlot, TrackerStats, VmmDirtySource, all_pages,
                      set_dirty_logging)

GFN_DTYPE = np.dtype([("flags", "<u4"), ("slot", "<u4"), ("offset", "<u8")])

# pthread_sigmask through libc: signal.pthread_sigmask builds a set of ~60 enum members per call
# (~50 µs here), far more than the reset it protects.
_libc = C.CDLL(None, use_errno=True)
_libc.pthread_sigmask.argtypes = [C.c_int, C.c_void_p, C.c_void_p]
_SIGSET = C.c_uint8 * 128
_ALL = _SIGSET(*([0xFF] * 128))
#: A slot id no memslot has (ids are < KVM_USER_MEM_SLOTS = 32764): the reset skips the entry.
_NO_SLOT = 0xFFFF
T = TypeVar("T")


def blocked_signals_call(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn`` with every blockable signal blocked in this thread, then restore the mask."""
    old = _SIGSET()
    if _libc.pthread_sigmask(signal.SIG_BLOCK, _ALL, old) != 0:
        raise OSError(C.get_errno(), "pthread_sigmask failed")
    try:
        return fn(*args)
    finally:
        _libc.pthread_sigmask(signal.SIG_SETMASK, old, None)


class _VcpuRing:
    def __init__(self, fd: VcpuFd) -> None:
        assert fd.ring_map is not None, "ring not enabled before vCPU creation"
        self.entries = fd.ring_map.array(GFN_DTYPE)
        # Plain strided views of the same memory: cheaper to slice than structured fields.
        words = fd.ring_map.array(np.uint32)
        self.flags = words[0::4]
        self.slot = words[1::4]
        self.offset = fd.ring_map.array(np.uint64)[1::2]
        self.size = len(self.entries)
        self.fetch = 0  # free-running
        self._w32 = words.data
        self._w64 = fd.ring_map.array(np.uint64).data

    #: Up to this many entries are read one by one in plain Python: each numpy call costs a few
    #: µs here, so for the typical small epoch a scalar loop is cheaper than vectorising.
    SCALAR = 96

    def harvest_small(self) -> tuple[list[int], list[int]] | None:
        """Consume up to SCALAR published entries in Python; None if there are more."""
        n, w32, w64 = self.size, self._w32, self._w64
        start = self.fetch % n
        slots: list[int] = []
        offs: list[int] = []
        for k in range(min(self.SCALAR, n)):
            j = (start + k) % n
            if not w32[4 * j] & U.KVM_DIRTY_GFN_F_DIRTY:
                break
            slots.append(w32[4 * j + 1])
            offs.append(w64[2 * j + 1])
        else:
            return None  # a big harvest: let the vectorised path take it all
        for k in range(len(slots)):
            # SAFETY: store RESET only into entries we consumed; KVM owns all the others.
            w32[4 * ((start + k) % n)] = U.KVM_DIRTY_GFN_F_RESET
        self.fetch += len(slots)
        return slots, offs

    def _count(self, start: int) -> int:
        """How many entries from ``start`` (ring index) on are published (DIRTY), in order."""
        n = self.size
        count, window = 0, 64
        while count < n:
            w = min(window, n - count)
            a = (start + count) % n
            if a + w <= n:
                f = self.flags[a:a + w]
            else:
                f = np.concatenate((self.flags[a:], self.flags[:a + w - n]))
            clean = np.flatnonzero((f & U.KVM_DIRTY_GFN_F_DIRTY) == 0)
            if len(clean):
                return count + int(clean[0])
            count += w
            window *= 4
        return count

    def harvest(self) -> tuple[np.ndarray, np.ndarray]:
        """Consume every published entry in order; returns (slots, offsets)."""
        n, start = self.size, self.fetch % self.size
        count = self._count(start)
        if count == 0:
            return _NO_SLOTS, _NO_OFFS
        if start + count <= n:
            slots = self.slot[start:start + count].astype(np.int64)
            offs = self.offset[start:start + count].astype(np.int64)
            # SAFETY: store RESET only into entries we consumed; KVM owns all the others.
            self.flags[start:start + count] = U.KVM_DIRTY_GFN_F_RESET
        else:
            idx = (start + np.arange(count)) % n
            slots = self.slot[idx].astype(np.int64)
            offs = self.offset[idx].astype(np.int64)
            self.flags[idx] = U.KVM_DIRTY_GFN_F_RESET
        self.fetch += count
        return slots, offs

    def unarm(self, start: int, count: int) -> None:
        """Make the next reset free ``count`` consumed entries from ``start`` (free-running)
        without re-protecting their pages."""
        n = self.size
        a = start % n
        # SAFETY: these entries were published by KVM and consumed by us (flags = RESET); KVM
        # reads slot/offset back only inside KVM_RESET_DIRTY_RINGS, which checks them.
        if a + count <= n:
            self.slot[a:a + count] = _NO_SLOT
        else:
            self.slot[a:] = _NO_SLOT
            self.slot[:a + count - n] = _NO_SLOT


_NO_SLOTS = np.zeros(0, np.int64)
_NO_OFFS = np.zeros(0, np.int64)


class RingTracker:
    """Tracks dirty pages through the per-vCPU dirty rings of one VM.

    Example::

        m = dirtyring.Machine(dirtyring.MachineConfig(tracker="ring", ring_entries=4096))
        assert isinstance(m.tracker, dirtyring.RingTracker)
        m.pause_all(); print(len(m.tracker.harvest())); m.resume_all()
    """

    kind = "ring"

    def __init__(self, vm: VmFd, vcpus: list[VcpuFd], slots: list[TrackedSlot],
                 vmm_dirty: VmmDirtySource, *, block_signals: bool = True) -> None:
        self.vm = vm
        self.vcpus = vcpus
        self.slots = {s.slot: s for s in slots}
        self._slot_list = slots
        self.vmm_dirty = vmm_dirty
        #: Switch off only to demonstrate the host defect (tests and `doctor`).
        self.block_signals = block_signals
        self.rings = [_VcpuRing(v) for v in vcpus]
        self._harvests = self._pages = self._resets = self._short = 0
        self._overflows = self._resyncs = 0
        self._last_us = 0.0
        self._pending_full_exit = False
        self._last: list = []
        self.ring_entries = self.rings[0].size if self.rings else 0
        self._limits = np.zeros(max(self.slots) + 1 if self.slots else 0, np.int64)
        for sl in slots:
            self._limits[sl.slot] = sl.pages
        self._limit_list = [int(x) for x in self._limits]
        #: Pages harvest_unarmed() left writable since the last re-arm, by slot (lazily made).
        self._unarmed: dict[int, np.ndarray] = {}
        self._all_unarmed = False

    def start(self) -> None:
        set_dirty_logging(self.vm, self._slot_list, True)
        self._unarmed.clear()
        self._all_unarmed = False

    def stop(self) -> None:
        set_dirty_logging(self.vm, self._slot_list, False)
        self._all_unarmed = True

    def rearm_all(self) -> None:
        """Write-protect every page again (toggle dirty logging), without harvesting."""
        set_dirty_logging(self.vm, self._slot_list, False)
        set_dirty_logging(self.vm, self._slot_list, True)
        self._unarmed.clear()
        self._all_unarmed = False

    def unarmed(self) -> DirtySet:
        """Pages the guest may be writing without KVM noticing: those :meth:`harvest_unarmed`
        left writable since the last :meth:`rearm_all` / :meth:`full` / :meth:`start` (every
        page while logging is stopped). Writes to them since then are in no ring."""
        if self._all_unarmed:
            return all_pages(self._slot_list)
        return DirtySet.from_arrays((sl, np.flatnonzero(m)) for sl, m in self._unarmed.items())

    def harvest_unarmed(self) -> DirtySet:
        """Like :meth:`harvest`, but the pages stay writable: their entries are freed without
        re-protecting them, so rewriting them costs the guest no fault and pushes no entry.

        For callers that re-arm everything later anyway (:meth:`rearm_all`), as migration
        rounds do: a page is then reported at most once in between, and a vCPU whose ring
        filled is released without making its working set fault again. Pages left writable
        are remembered (:meth:`unarmed`). Same preconditions and errors as :meth:`harvest`.
        """
        return self._harvest(rearm=False)

    def _note_unarmed(self, kernel: DirtySet, rearm: bool) -> None:
        """Keep :meth:`unarmed` exact: add pages left writable, drop pages re-protected."""
        if rearm and not self._unarmed:
            return
        for sl, pages in kernel.items():
            m = self._unarmed.get(sl)
            if m is None:
                if rearm:
                    continue
                m = self._unarmed[sl] = np.zeros(self.slots[sl].pages, bool)
            m[pages] = not rearm

    def note_ring_full(self) -> None:
        """A vCPU left KVM_RUN with DIRTY_RING_FULL; the next harvest must find entries."""
        self._pending_full_exit = True

    def _reset(self) -> int:
        try:
            if self.block_signals:
                return int(blocked_signals_call(self.vm.reset_dirty_rings))
            return self.vm.reset_dirty_rings()
        except KvmError as e:
            raise TrackingError(f"KVM_RESET_DIRTY_RINGS was interrupted ({e}); pages may have "
                                "stayed unprotected, resync required") from None

    @property
    def last_per_vcpu(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """What each vCPU's ring held at the last harvest: [(slots, offsets)] by vCPU index."""
        return [(np.asarray(s, np.int64), np.asarray(o, np.int64)) for s, o in self._last]

    def _harvest_small(self, smalls: list[tuple[list[int], list[int]]], t0: float,
                       starts: list[int], rearm: bool) -> DirtySet:
        """The common case, every ring with few entries: plain Python, no numpy per entry."""
        self._last = smalls
        n = sum(len(s) for s, _ in smalls)
        full_exit, self._pending_full_exit = self._pending_full_exit, False
        by_slot: dict[int, set[int]] = {}
        if n:
            if not rearm:
                self._unarm_consumed(starts)
            reset = self._reset()
            self._resets += 1
            if reset < n:
                self._short += n - reset
            lim = self._limit_list
            for slots, offs in smalls:
                for sl, off in zip(slots, offs):
                    if sl >= len(lim) or off >= lim[sl]:
                        self._overflows += 1
                        raise RingOverflow(f"dirty ring entry (slot {sl}, offset {off}) is "
                                           "outside every tracked slot; resync required")
                    by_slot.setdefault(sl, set()).add(off)
        elif full_exit:
            self._overflows += 1
            raise RingOverflow("a vCPU reported its ring full but no entry was harvestable; "
                               "resync required")
        ds = DirtySet({sl: np.fromiter(sorted(v), np.int64, len(v)) for sl, v in by_slot.items()})
        return self._finish(ds, rearm, t0)

    def harvest(self) -> DirtySet:
        """Pages dirtied since the last harvest, re-armed before this returns (the Tracker
        contract). Raises RingOverflow when entries may have been lost (resync: ``full()``)."""
        return self._harvest(rearm=True)

    def _unarm_consumed(self, starts: list[int]) -> None:
        for r, start in zip(self.rings, starts):
            if r.fetch != start:
                r.unarm(start, r.fetch - start)

    def _harvest(self, rearm: bool) -> DirtySet:
        try:
            return self._harvest_once(rearm)
        except TrackingError:  # RingOverflow, or an interrupted reset
            if not rearm:  # pages of lost entries may be writable: until a resync, all may be
                self._all_unarmed = True
            raise

    def _harvest_once(self, rearm: bool) -> DirtySet:
        t0 = time.perf_counter()
        starts = [r.fetch for r in self.rings]
        smalls = [r.harvest_small() for r in self.rings]
        if all(x is not None for x in smalls):
            return self._harvest_small(smalls, t0, starts, rearm)  # type: ignore[arg-type]
        parts_s, parts_o = [], []
        wrapped = False
        per_vcpu = []
        for r, small in zip(self.rings, smalls):
            if small is not None:
                s = np.fromiter(small[0], np.int64, len(small[0]))
                o = np.fromiter(small[1], np.int64, len(small[1]))
            else:
                s, o = r.harvest()
            per_vcpu.append((s, o))
            wrapped |= len(s) >= r.size
            if len(s):
                parts_s.append(s)
                parts_o.append(o)
        n = int(sum(len(s) for s in parts_s))
        full_exit, self._pending_full_exit = self._pending_full_exit, False
        if n:
            if not rearm:
                self._unarm_consumed(starts)
            reset = self._reset()
            self._resets += 1
            if reset < n:
                self._short += n - reset
        if len(parts_s) == 1:
            slots, offs = parts_s[0], parts_o[0]
        elif parts_s:
            slots, offs = np.concatenate(parts_s), np.concatenate(parts_o)
        else:
            slots, offs = _NO_SLOTS, _NO_OFFS
        self._last = per_vcpu
        self._check(slots, offs, n, full_exit, wrapped)
        return self._finish(DirtySet.from_pairs(slots, offs), rearm, t0)

    def _finish(self, ds: DirtySet, rearm: bool, t0: float) -> DirtySet:
        """A harvest's last steps, whichever way the rings were read: note what is left
        writable, merge the VMM's own writes, count."""
        self._note_unarmed(ds, rearm)
        vmm = self.vmm_dirty()
        if vmm:
            ds = ds | DirtySet.from_arrays(vmm)
        self._harvests += 1
        self._pages += len(ds)
        self._last_us = (time.perf_counter() - t0) * 1e6
        return ds

    def _check(self, slots: np.ndarray, offs: np.ndarray, n: int, full_exit: bool,
               wrapped: bool) -> None:
        problem = ""
        if full_exit and n == 0:
            problem = "a vCPU reported its ring full but no entry was harvestable"
        elif wrapped:
            problem = "a ring was found completely DIRTY (it may have wrapped)"
        elif len(slots):
            # Entries carry (address space << 16 | slot id); we only use address space 0.
            # Unknown slots have limit 0, so any offset in them fails the same test.
            lim = self._limits
            if int(slots.max()) >= len(lim):
                bad = slots >= len(lim)
            else:
                bad = offs >= lim[slots]
            if bad.any():
                k = int(np.argmax(bad))
                problem = (f"ring entry (slot {int(slots[k])}, offset {int(offs[k])}) is "
                           "outside every tracked slot")
        if problem:
            self._overflows += 1
            raise RingOverflow(f"dirty ring lost or corrupted entries ({problem}); "
                               "resync required")

    def full(self) -> DirtySet:
        """Resync: drain the rings, re-protect every page (toggle logging), report everything."""
        for r in self.rings:
            r.harvest()
        try:
            self._reset()
        except TrackingError:
            pass
        self.rearm_all()
        self.vmm_dirty()
        self._resyncs += 1
        return all_pages(self._slot_list)

    def statistics(self) -> TrackerStats:
        return TrackerStats(kind=self.kind, harvests=self._harvests, pages_reported=self._pages,
                            resets=self._resets, reset_shortfall=self._short,
                            overflows=self._overflows, resyncs=self._resyncs, hot_pages=0,
                            last_harvest_us=self._last_us)
