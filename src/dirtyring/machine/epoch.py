"""The epoch driver: run the guest for an interval or until its dirty budget is spent, then
pause every vCPU and harvest. Checkpointing, snapshots, migration and benchmarks all use it.

The dirty budget is the ring: a vCPU whose ring reaches its soft limit (entries - 64) leaves
KVM_RUN with DIRTY_RING_FULL and parks, which ends the epoch early ("dirtied enough, pause now").
Bitmap trackers have no such signal and end epochs on the interval only.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from ..errors import ConfigError, TrackingError
from ..tracking import DirtySet
from .exits import BUDGET, INTERVAL, STOPPED, StopReason
from .vm import Machine


@dataclass(frozen=True, slots=True, kw_only=True)
class Epoch:
    """What one epoch produced. The vCPUs are paused when the caller gets it.

    Example::

        e = drv.run_epoch(0.001)
        print(e.number, e.reason, len(e.dirty), e.resync, e.run_s, e.harvest_s)
    """

    number: int
    reason: StopReason  # INTERVAL, BUDGET or STOPPED ("interval", "budget", "stopped")
    dirty: DirtySet
    resync: bool  # tracking could not vouch for the set; ``dirty`` is every page
    run_s: float  # time the guest was let run
    harvest_s: float  # pause + harvest + re-arm


class EpochDriver:
    """Runs a tracked machine epoch by epoch: :meth:`run_epoch` lets the guest run for the
    interval (or until a ring fills), pauses every vCPU, harvests and returns the
    :class:`Epoch`, with the guest paused.

    Example::

        drv = dirtyring.EpochDriver(m)
        for _ in range(100):
            e = drv.run_epoch(0.0005)
            copy_pages(e.dirty)             # the guest is paused here
    """

    def __init__(self, machine: Machine) -> None:
        if machine.tracker is None:
            raise ConfigError("the epoch driver needs a tracked machine (tracker other than none)")
        self.m = machine
        self.tracker = machine.tracker
        self.number = 0
        self.resyncs = 0

    def harvest_paused(self) -> tuple[DirtySet, bool]:
        """Harvest with vCPUs already paused; falls back to a full resync if tracking failed.
        A Linux program's queued output is drained here too, so it leaves tagged with the
        epoch whose checkpoint holds the state that produced it."""
        if self.m.stdio is not None:
            self.m.drain_output()
        try:
            return self.tracker.harvest(), False
        except TrackingError:
            self.resyncs += 1
            return self.tracker.full(), True

    def counted(self, n: int) -> None:
        """``n`` epochs were run, harvested and checkpointed elsewhere (the steady batch)."""
        self.number += n

    def ran(self, reason: str, run_s: float) -> Epoch:
        """An epoch run elsewhere (the steady batch), paused and not harvested yet; ``reason``
        is a ``StopReason`` or its string."""
        self.number += 1
        return Epoch(number=self.number, reason=StopReason(reason), dirty=DirtySet(), resync=False,
                     run_s=run_s, harvest_s=0.0)

    def harvest_epoch(self, e: Epoch) -> Epoch:
        """``e`` (from ``ran``) with its harvest done now."""
        t = time.perf_counter()
        dirty, resync = self.harvest_paused()
        return dataclasses.replace(e, dirty=dirty, resync=resync,
                                   harvest_s=time.perf_counter() - t)

    def run_epoch(self, interval: float) -> Epoch:
        m = self.m
        t0 = time.perf_counter()
        if not m.threaded:
            why = m.runners[0].run_inline(interval)
            t1 = time.perf_counter()
            dirty, resync = self.harvest_paused()
            self.number += 1
            return Epoch(number=self.number, reason=why, dirty=dirty, resync=resync,
                         run_s=t1 - t0, harvest_s=time.perf_counter() - t1)
        m.resume_all()
        woke = m.attention.wait(interval) if interval > 0 else m.attention.is_set()
        t1 = time.perf_counter()
        m.pause_all()
        dirty, resync = self.harvest_paused()
        t2 = time.perf_counter()
        self.number += 1
        reason = INTERVAL
        if woke:
            reason = STOPPED if m.stopped_event.is_set() else BUDGET
        return Epoch(number=self.number, reason=reason, dirty=dirty, resync=resync,
                     run_s=t1 - t0, harvest_s=t2 - t1)
