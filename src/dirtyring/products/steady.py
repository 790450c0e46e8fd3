"""The steady pause: a replication checkpoint taken in one native call while the hot set holds.

With the hot-set tracker and a working set that stays put, every checkpoint's pause does the
same work: GET each slot's dirty log and find it unchanged, copy the same pages into staging,
read XSAVE and the TSC. ``machine/native.py`` has the measurements of why that is one C call.
This module sets the call up from the parts that own each piece (the tracker: its logs and the
set they stand for; the uplink: where the pages go; the state blob: its reads) and then tells
each what happened. Whenever it cannot vouch for the result (a re-arm is due, a log changed,
the VMM wrote a page, the state's kept pieces are stale, staging is busy) ``take`` returns
None having changed nothing, and the caller harvests, stages and captures the ordinary way.
"""
from __future__ import annotations

import ctypes as C

import numpy as np

from .._bindings import _uapi as U
from ..machine import native
from ..machine.vm import Machine
from ..tracking import HotSetTracker
from .checkpoint import memory_digest
from .uplink import Uplink


class SteadyPause:
    def __init__(self, machine: Machine, tracker: HotSetTracker, uplink: Uplink, *,
                 verify: bool = False) -> None:
        assert machine.memory is not None and not machine.threaded
        self.m, self.tr, self.up, self.verify = machine, tracker, uplink, verify
        self.prog = native.PauseProgram()
        self.taken = 0
        self._rows = {s.info.slot: (int(s.rows.ctypes.data), s.rows.shape[0])
                      for s in machine.memory.slots}
        # Addresses of arrays and bytes the tracker hands out again and again while steady.
        self._addr_of: dict[int, tuple[object, int]] = {}

    @classmethod
    def for_primary(cls, machine: Machine, uplink: Uplink, *,
                    verify: bool) -> SteadyPause | None:
        """The steady pause where it applies (inline hot-set machine, helper built), else None."""
        tr = machine.tracker
        if machine.threaded or not isinstance(tr, HotSetTracker) or native.BACKEND != "c-nt":
            return None
        return cls(machine, tr, uplink, verify=verify)

    def _addr(self, obj: np.ndarray | bytes) -> int:
        kept = self._addr_of.get(id(obj))
        if kept is None or kept[0] is not obj:
            if len(self._addr_of) > 256:
                self._addr_of.clear()
            a = (int(obj.ctypes.data) if isinstance(obj, np.ndarray)
                 else int(C.cast(C.c_char_p(obj), C.c_void_p).value or 0))
            kept = self._addr_of[id(obj)] = (obj, a)
        return kept[1]

    def take(self, epoch: int) -> tuple[int, bytes, bytes] | None:
        """Checkpoint ``epoch`` (vCPUs paused, not yet harvested): (pages staged, machine
        state, memory digest or b""), or None with nothing done."""
        m = self.m
        assert m.memory is not None
        if m.memory.vmm_dirty_pending:
            return None
        steady = self.tr.steady()
        reads = m.state_blob.reads()
        if steady is None or reads is None:
            return None
        dirty, logs = steady
        groups = list(dirty.items())
        dest = self.up.reserve(epoch, [(slot, len(pages)) for slot, pages in groups])
        if dest is None:
            return None
        prog, vm = self.prog, m.vm
        prog.reset()
        for slot, bitmap, last in logs:
            prog.ioctl(vm.fd, U.KVM_GET_DIRTY_LOG, C.addressof(vm.dirty_log_request(slot, bitmap)))
            prog.same(self._addr(bitmap), self._addr(last), len(last))
        for fd, request, arg, expect in reads:
            prog.ioctl(fd, request, arg, expect)
        for (slot, pages), (data, idx) in zip(groups, dest):
            rows, n_rows = self._rows[slot]
            prog.gather(data, idx, rows, self._addr(pages), len(pages), n_rows)
        try:
            done = prog.run()
        except BaseException:
            self.up.abandon()
            raise
        if not done:  # a log changed: the ordinary harvest will see it
            self.up.abandon()
            return None
        self.tr.steady_done()
        self.taken += 1
        digest = memory_digest(m.memory) if self.verify else b""
        return sum(len(p) for _, p in groups), m.state_blob.encode_read(), digest
