"""The tracker interface: one call, ``harvest()``, gives the pages dirtied since the last one.

``harvest()`` does the kernel's whole protocol in the required order (collect, then re-arm write
protection) before it returns, so a caller that copies the returned pages afterwards can never
miss a write: the harvest → reset → copy order is built in, not left to callers. It must be
called while every vCPU of the VM is out of KVM_RUN (the set is only complete then). Pages the
VMM wrote itself are merged in through the ``vmm_dirty`` callback.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from .._bindings import VmFd
from .._bindings._uapi import KVM_MEM_LOG_DIRTY_PAGES
from .dirtyset import DirtySet

PAGE = 4096

#: Drains the VMM's own writes: returns (slot, pages) pairs.
VmmDirtySource = Callable[[], list[tuple[int, np.ndarray]]]


@dataclass(frozen=True, slots=True, kw_only=True)
class TrackedSlot:
    """A memslot as trackers see it (ids, size and where it is mapped in the host)."""

    slot: int
    gpa: int
    pages: int
    userspace_addr: int


@dataclass(frozen=True, slots=True, kw_only=True)
class TrackerStats:
    """Counters of one tracker (a frozen snapshot; see ``Tracker.statistics``)."""

    kind: str
    harvests: int
    pages_reported: int
    resets: int
    reset_shortfall: int
    overflows: int
    resyncs: int
    hot_pages: int
    last_harvest_us: float


class Tracker(Protocol):
    """What every tracker does (:class:`RingTracker`, :class:`BitmapTracker`,
    :class:`HotSetTracker`). A machine builds its own (``MachineConfig.tracker``) and starts
    it; call :meth:`harvest` with every vCPU paused.

    Example::

        m.pause_all()
        dirty = m.tracker.harvest()          # collected and re-armed
        for slot, pages in dirty.items():
            print(slot, pages[:8])
        m.resume_all()
    """

    kind: str

    def start(self) -> None:
        """Begin logging (enables KVM_MEM_LOG_DIRTY_PAGES on every tracked slot)."""

    def harvest(self) -> DirtySet:
        """Pages dirtied since the last harvest, already re-armed; all vCPUs must be paused."""

    def full(self) -> DirtySet:
        """Every page of every slot, and tracking re-armed from here (a full resync)."""

    def stop(self) -> None:
        """End logging."""

    def statistics(self) -> TrackerStats: ...


def set_dirty_logging(vm: VmFd, slots: list[TrackedSlot], on: bool) -> None:
    """Set or clear KVM_MEM_LOG_DIRTY_PAGES on every slot. Setting it write-protects every
    page again, which is how ring and bitmap trackers re-arm everything at once."""
    for s in slots:
        vm.set_user_memory_region(s.slot, s.gpa, s.pages * PAGE, s.userspace_addr,
                                  KVM_MEM_LOG_DIRTY_PAGES if on else 0)


def all_pages(slots: list[TrackedSlot]) -> DirtySet:
    """Every page of every slot (what a full resync reports). Built directly: an ``arange`` is
    already sorted and duplicate-free, and passing it through ``DirtySet.from_arrays`` (a
    unique) cost ~23 ms for a 514 MiB slot: half of a Linux program's start-up."""
    out: dict[int, np.ndarray] = {}
    for s in slots:
        if s.pages:
            a = np.arange(s.pages, dtype=np.int64)
            if s.slot in out:  # never in practice (one TrackedSlot per slot); stay exact
                a = DirtySet.from_arrays([(s.slot, out[s.slot]), (s.slot, a)]).slot(s.slot)
            a.setflags(write=False)
            out[s.slot] = a
    return DirtySet(out)
