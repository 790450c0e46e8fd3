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
from ..machine.stateblob import BlobTemplate
from ..machine.vm import Machine
from ..tracking import DirtySet, HotSetTracker
from .checkpoint import memory_digest
from .staging import PAGE
from .uplink import Uplink


class SteadyPause:
    def __init__(self, machine: Machine, tracker: HotSetTracker, uplink: Uplink, *,
                 verify: bool = False) -> None:
        assert machine.memory is not None and not machine.threaded
        self.m, self.tr, self.up, self.verify = machine, tracker, uplink, verify
        self.taken = 0
        self._rows = {s.info.slot: (int(s.rows.ctypes.data), s.rows.shape[0])
                      for s in machine.memory.slots}
        # While the hot set holds, each pause runs the same program but for the staging slot
        # it fills: one program per staging slot, kept until the set, a log or the blob's
        # layout changes (filling one anew is ~15 µs of Python right after the guest ran).
        self._key: tuple[object, ...] = ()
        self._progs: dict[int, native.PauseProgram] = {}
        self._sizes: list[tuple[int, int]] = []
        self._pages = 0

    @classmethod
    def for_primary(cls, machine: Machine, uplink: Uplink, *,
                    verify: bool) -> SteadyPause | None:
        """The steady pause where it applies (inline hot-set machine, helper built), else None."""
        tr = machine.tracker
        if machine.threaded or not isinstance(tr, HotSetTracker) or native.BACKEND != "c-nt":
            return None
        return cls(machine, tr, uplink, verify=verify)

    def take(self, epoch: int) -> tuple[int, bytes, bytes] | None:
        """Checkpoint ``epoch`` (vCPUs paused, not yet harvested): (pages staged, machine
        state, memory digest or b""), or None with nothing done."""
        m = self.m
        assert m.memory is not None
        if m.memory.vmm_dirty_pending:
            return None
        steady = self.tr.steady()
        if steady is None:
            return None
        blob = m.state_blob.template()
        if blob is None:
            return None
        dirty, logs = steady
        key = (dirty, blob, *(last for _, _, last in logs))
        if len(key) != len(self._key) or any(a is not b for a, b in zip(key, self._key)):
            self._key, self._progs = key, {}
            self._sizes = [(slot, len(pages)) for slot, pages in dirty.items()]
            self._pages = sum(n for _, n in self._sizes)
        k = self.up.reserve(epoch, self._sizes)
        if k is None:
            return None
        prog = self._progs.get(k)
        if prog is None:
            prog = self._progs[k] = self._program(k, dirty, logs, blob)
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
        return self._pages, m.state_blob.encode_template(blob), digest

    def _program(self, k: int, dirty: DirtySet, logs: list[tuple[int, np.ndarray, bytes]],
                 blob: BlobTemplate) -> native.PauseProgram:
        """The pause into staging slot ``k``: the logs' GETs and the state's reads, the logs
        compared with the last ones, the hot set gathered, the state laid into the blob."""
        prog, vm = native.PauseProgram(), self.m.vm
        prog.keep += (dirty, logs, blob)
        for slot, bitmap, last in logs:
            log_request = vm.dirty_log_request(slot, bitmap)
            prog.keep.append(log_request)
            prog.ioctl(vm.fd, U.KVM_GET_DIRTY_LOG, C.addressof(log_request))
            prog.same(int(bitmap.ctypes.data),
                      int(C.cast(C.c_char_p(last), C.c_void_p).value or 0), len(last))
        for fd, request, arg, expect in blob.reads:
            prog.ioctl(fd, request, arg, expect)
        data, idx = self.up.addresses(k)
        off = 0
        for slot, pages in dirty.items():
            rows, n_rows = self._rows[slot]
            pages64 = pages if pages.dtype == np.int64 and pages.flags.c_contiguous else None
            assert pages64 is not None, "hot-set pages are int64"
            prog.gather(data + off * PAGE, idx + off * 8, rows, int(pages64.ctypes.data),
                        len(pages), n_rows)
            off += len(pages)
        for dst, src, n in blob.copies:
            prog.copy(dst, src, n)
        return prog
