"""The paused machine's encoded state, built from kept pieces: what replication takes at every
checkpoint.

``capture_state().encode()`` builds a record per vCPU and device, then packs every field. Right
after the guest ran, with the caches cold, that cost ~40 µs of each pause here (against ~20 µs
warm), at thousands of checkpoints a second. Most of the blob never changes between two
checkpoints: the configuration, the length prefixes, the static MSRs, XCR0, the LAPIC (see
``Machine.capture_state`` for why those are static). This keeps those bytes and fills in only what
can change: regs, sregs and events (kvm_run's sync area), XSAVE, the TSC and the devices' state.

The result is byte for byte ``capture_state().encode()`` (a test compares them). Whenever the
kept pieces may be stale (a vCPU's static state was re-read after a restore, its sync area is
not current, it finished), the slow path runs and the pieces are rebuilt from its record.
"""
from __future__ import annotations

import ctypes as C
import struct
from typing import TYPE_CHECKING

from .._bindings import _uapi as U
from .state import VcpuState

if TYPE_CHECKING:
    from .vcpu import VcpuRunner
    from .vm import Machine

_U32 = struct.Struct("<I")
_TSC = struct.Struct("<IQ")


class _VcpuPieces:
    """One vCPU's constant bytes around the fields that change."""

    def __init__(self, runner: VcpuRunner, v: VcpuState) -> None:
        self.runner = runner
        self.static = runner.static_state  # identity: replaced after every restore
        self.finished = v.finished
        before = [m for m in v.msrs if m[0] < U.MSR_IA32_TSC]
        after = [m for m in v.msrs if m[0] > U.MSR_IA32_TSC]
        self.head = struct.pack("<IIB", v.index, v.mp_state, int(v.finished)) + _U32.pack(
            len(v.regs))
        self.after_regs = _U32.pack(len(v.sregs))
        self.after_sregs = _U32.pack(len(v.fpu)) + v.fpu + _U32.pack(len(v.xsave))
        self.after_xsave = (_U32.pack(len(v.xcrs)) + v.xcrs + _U32.pack(len(v.lapic)) + v.lapic
                            + _U32.pack(len(v.events)))
        self.msrs_head = _U32.pack(len(v.msrs)) + b"".join(_TSC.pack(*m) for m in before)
        self.msrs_tail = b"".join(_TSC.pack(*m) for m in after)
        self.xsave = U.kvm_xsave()

    def current(self) -> bool:
        r = self.runner
        return (r.static_state is self.static and r.fd.sync_valid
                and r.finished == self.finished)

    def read(self) -> None:
        """The two reads each capture needs (``StateBlob.reads`` lists them for others)."""
        fd = self.runner.fd
        fd.get_xsave(self.xsave)
        fd.get_tsc()

    def add(self, out: list[bytes]) -> None:
        """This vCPU's part of the blob, from the sync area and the last ``read``."""
        r = self.runner
        sr = r.run_struct.s.regs
        out += (self.head, bytes(sr.regs), self.after_regs, bytes(sr.sregs), self.after_sregs,
                bytes(self.xsave), self.after_xsave, bytes(sr.events), self.msrs_head,
                _TSC.pack(U.MSR_IA32_TSC, r.fd.tsc_result()), self.msrs_tail)


class StateBlob:
    """``encode()`` == ``machine.capture_state().encode()``, fast when nothing static moved."""

    def __init__(self, machine: Machine) -> None:
        self.m = machine
        self._head = b""
        self._vcpus: list[_VcpuPieces] = []
        self._reads: list[tuple[int, int, int, int]] = []

    def encode(self) -> bytes:
        vcpus = self._vcpus
        if not vcpus or not all(p.current() for p in vcpus):
            return self._rebuild()
        for p in vcpus:
            p.read()
        return self.encode_read()

    def reads(self) -> list[tuple[int, int, int, int]] | None:
        """The ioctls ``encode`` would issue, as (fd, request, argument address, expected
        result or -1), for a caller that issues them itself and then calls ``encode_read``;
        None when the kept pieces may be stale (``encode`` must then run)."""
        vcpus = self._vcpus
        if not vcpus or not all(p.current() for p in vcpus):
            return None
        return self._reads

    def encode_read(self) -> bytes:
        """The blob, once the reads are done (by ``encode`` or by the caller of ``reads``)."""
        out = [self._head]
        for p in self._vcpus:
            p.add(out)
        for d in self.m.devices:
            name = d.name.encode()
            data = d.save()
            out += (_U32.pack(len(name)), name, _U32.pack(len(data)), data)
        return b"".join(out)

    def _rebuild(self) -> bytes:
        """The slow path, which also refreshes the kept pieces from its records."""
        st = self.m.capture_state()
        self._head = struct.pack("<HHI", len(st.vcpus), len(st.devices), len(st.config)) + \
            st.config
        self._vcpus = [_VcpuPieces(r, v) for r, v in zip(self.m.runners, st.vcpus)]
        self._reads = []
        for p in self._vcpus:
            fd = p.runner.fd
            self._reads += ((fd.fd, U.KVM_GET_XSAVE, C.addressof(p.xsave), -1),
                            (fd.fd, U.KVM_GET_MSRS, C.addressof(fd.tsc_request()), 1))
        return st.encode()
