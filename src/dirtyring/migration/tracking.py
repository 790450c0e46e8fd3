"""Dirty tracking as migration rounds need it: arm as late and as seldom as possible.

A write-protected (armed) page costs the guest a fault on its next write, ~2-3 µs here and
10-40 µs while another process on the host faults memory in. A guest that rewrites a big region
as fast as it can is then bound by those faults (QEMU's dirty-ring migration: 77 M -> 3 M
pages/s). So:

* The bulk round (round 0) arms nothing (unless ``arm_bulk``): pages the guest has been writing
  stay writable and it keeps its speed while all of memory goes out. Round 1 then sends every
  page that was writable at any time during round 0, which is exactly what a write could have
  changed unseen: for the ring, the pages :meth:`RingTracker.harvest_unarmed` left writable
  (``unarmed()``) plus what the ring reports; for the bitmap, its accumulated bits (a page is
  only writable after a logged write, and its bit stays set until a harvest re-arms it).
* Inside a round a full ring is freed without re-arming (``harvest_unarmed``): those pages are
  in the next round's set already. One toggle of dirty logging re-arms everything at the round
  boundary (outside the downtime). Each page then faults at most once per round, and a ring
  entry means "newly dirty this round".
* Harvests happen only when a ring is full or a round ends.
"""
from __future__ import annotations

import time

import numpy as np

from ..errors import ConfigError, TrackingError
from ..machine.vm import Machine
from ..tracking import DirtySet, RingTracker


class RoundTracking:
    """Harvest and re-arm for one migrating machine (all vCPUs out of KVM_RUN when called)."""

    def __init__(self, machine: Machine, *, rearm: str = "round", arm_bulk: bool = False) -> None:
        t = machine.tracker
        if t is None:
            raise ConfigError("migration needs a tracked machine (--tracker ring or bitmap)")
        self.m = machine
        self.t = t
        self.ring: RingTracker | None = t if isinstance(t, RingTracker) else None
        #: Ring only: free full rings without re-arming; re-arm everything at boundaries.
        self.deferred = self.ring is not None and rearm == "round"
        self.arm_bulk = arm_bulk
        self.armed = True           # the current round tracks every write
        #: Harvests inside the round (deferred: only a resync's "everything" is kept here).
        self._acc: list[DirtySet] = []
        self.exits = 0
        self.resyncs = 0
        self.harvest_s = 0.0        # spent freeing full rings (the vCPU waits meanwhile)

    def bulk(self) -> DirtySet:
        """Start the bulk round: every page is to be sent. Arms nothing unless ``arm_bulk``
        (or the ring re-arms on every harvest, which the bulk round would undo at once)."""
        if self.arm_bulk or (self.ring is not None and not self.deferred):
            self.t.full()
            self.armed = True
        else:
            # What was dirtied before this round is read by it: forget the VMM's writes, and
            # free the rings (their pages are remembered as writable). The bitmap keeps its
            # bits: they are the pages that are writable, which round 1 must send again.
            if self.ring is not None:
                self._harvest_ring()
            if self.m.memory is not None:
                self.m.memory.take_vmm_dirty()
            self.armed = False
        self._acc = []
        slots = self.m.memory.slots if self.m.memory is not None else []
        return DirtySet({s.info.slot: np.arange(s.info.pages, dtype=np.int64) for s in slots})

    def mid_round(self) -> int:
        """A ring-full exit: free the ring (re-arming only with ``rearm="harvest"``).
        Returns the pages it held: what this vCPU made newly dirty since the last exit."""
        self.exits += 1
        t0 = time.perf_counter()
        n = self._harvest_ring()
        self.harvest_s += time.perf_counter() - t0
        return n

    def _harvest_ring(self) -> int:
        t = self.ring
        assert t is not None
        try:
            d = t.harvest_unarmed() if self.deferred else t.harvest()
        except TrackingError:  # entries lost (see ring.py): everything is dirty, and re-armed
            self.resyncs += 1
            self._acc = [self.t.full()]
            return 0
        if not self.deferred:
            self._acc.append(d)
        return len(d)

    def boundary(self) -> DirtySet:
        """Paused, between rounds: every page that may differ from what was sent since it was
        last armed. Call :meth:`rearm` before the guest runs again (unless this was the last
        round)."""
        acc, self._acc = self._acc, []
        if self.deferred:
            assert self.ring is not None
            try:
                d = self.ring.harvest_unarmed()
            except TrackingError:
                self.resyncs += 1
                return self.ring.full()  # (re-armed; rearm() toggles once more, harmlessly)
            # Pages left writable this round (every harvest of it), and after a resync inside
            # the round, everything (``acc``: what the round wrote before it is in no ring).
            return DirtySet.from_arrays(p for x in (*acc, self.ring.unarmed(), d)
                                        for p in x.items())
        try:
            d = self.t.harvest()  # re-arms what it returns; the rest was never writable
        except TrackingError:
            self.resyncs += 1
            d = self.t.full()
        return DirtySet.from_arrays(p for x in (*acc, d) for p in x.items())

    def rearm(self) -> None:
        """Paused, after :meth:`boundary`: the next round tracks every write."""
        if self.deferred:
            assert self.ring is not None
            self.ring.rearm_all()  # one toggle of dirty logging: ~10-20 ms for 1 GiB
        self.armed = True
