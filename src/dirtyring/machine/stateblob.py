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
from . import native
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

    def add(self, out: list[bytes]) -> None:
        """This vCPU's part of the blob: the sync area, XSAVE and the TSC read now."""
        r = self.runner
        fd = r.fd
        sr = r.run_struct.s.regs
        fd.get_xsave(self.xsave)
        out += (self.head, bytes(sr.regs), self.after_regs, bytes(sr.sregs), self.after_sregs,
                bytes(self.xsave), self.after_xsave, bytes(sr.events), self.msrs_head,
                _TSC.pack(U.MSR_IA32_TSC, fd.get_tsc()), self.msrs_tail)

    def lay_out(self, t: BlobTemplate, fast_tsc: bool) -> None:
        """Append this vCPU's part to ``t``: constant bytes, and what fills the rest (the TSC
        from the host's, ``fast_tsc``, or KVM_GET_MSRS)."""
        r = self.runner
        sr = r.run_struct.s.regs
        t.static(self.head)
        t.copy(C.addressof(sr.regs), C.sizeof(sr.regs))
        t.static(self.after_regs)
        t.copy(C.addressof(sr.sregs), C.sizeof(sr.sregs))
        t.static(self.after_sregs)
        t.ioctl_into(r.fd.fd, U.KVM_GET_XSAVE, C.sizeof(U.kvm_xsave))  # straight into the blob
        t.static(self.after_xsave)
        t.copy(C.addressof(sr.events), C.sizeof(sr.events))
        t.static(self.msrs_head)
        if fast_tsc:
            t.static(_U32.pack(U.MSR_IA32_TSC))
            t.tsc()
        else:
            t.ioctl(r.fd.fd, U.KVM_GET_MSRS, C.addressof(r.fd.tsc_request()), 1)
            t.static(_U32.pack(U.MSR_IA32_TSC))
            t.copy(r.fd.tsc_result_address(), 8)
        t.static(self.msrs_tail)


def host_tsc_plus_offset(runner: VcpuRunner) -> bool:
    """Is this vCPU's TSC the host's plus its TSC offset, as KVM reads it for KVM_GET_MSRS?
    Then a pause can store it without that ioctl (~7.5 µs here: every vCPU ioctl costs that).
    KVM scales the host's TSC where the guest runs at another frequency: a read of the MSR
    between two of the host's shows whether it does."""
    if native.backend() != "c-nt":
        return False
    fd = runner.fd
    offset = fd.tsc_offset()
    if offset is None:
        return False
    before = native.rdtsc()
    guest = fd.get_tsc()
    after = native.rdtsc()
    return before + offset <= guest <= after + offset


class BlobTemplate:
    """The vCPUs' part of the blob as one buffer that a native call fills in place: the steady
    pause issues ``reads`` (XSAVE lands in the buffer itself) and then ``copies`` (the sync
    area's regs, sregs and events, the TSC value). Its constant bytes are written once."""

    def __init__(self) -> None:
        self._static: list[tuple[int, bytes]] = []
        self._size = 0
        # (fd, request, offset in the buffer or None, else the argument's address, expect)
        self._ioctls: list[tuple[int, int, int | None, int, int]] = []
        self._copy_from: list[tuple[int, int, int]] = []  # (offset, source address, size)
        self._tsc_at: list[int] = []
        self.reads: list[tuple[int, int, int, int]] = []  # (fd, request, address, expect)
        self.copies: list[tuple[int, int, int]] = []  # (destination, source, size)
        #: Where the guest's TSC goes (the host's plus ``tsc_offset``), for a native pause.
        self.tscs: list[int] = []
        #: The vCPU's TSC offset, for ``tscs``: filled and checked by the batch that runs them.
        self.tsc_offset = C.c_int64()
        self.buf: C.Array[C.c_char] | None = None

    def static(self, b: bytes) -> None:
        self._static.append((self._size, b))
        self._size += len(b)

    def copy(self, src: int, n: int) -> None:
        self._copy_from.append((self._size, src, n))
        self._size += n

    def ioctl_into(self, fd: int, request: int, n: int) -> None:
        """An ioctl whose ``n``-byte result is the next part of the blob."""
        self._ioctls.append((fd, request, self._size, 0, -1))
        self._size += n

    def ioctl(self, fd: int, request: int, arg: int, expect: int) -> None:
        self._ioctls.append((fd, request, None, arg, expect))

    def tsc(self) -> None:
        """The guest's TSC (8 bytes), the host's plus ``tsc_offset`` (one vCPU's: a template
        has one offset)."""
        assert not self._tsc_at, "one vCPU's TSC per template"
        self._tsc_at.append(self._size)
        self._size += 8

    def seal(self) -> None:
        buf = self.buf = C.create_string_buffer(self._size)
        base = C.addressof(buf)
        for off, b in self._static:
            C.memmove(base + off, b, len(b))
        self.reads = [(fd, req, arg if off is None else base + off, expect)
                      for fd, req, off, arg, expect in self._ioctls]
        self.copies = [(base + off, src, n) for off, src, n in self._copy_from]
        self.tscs = [base + off for off in self._tsc_at]

    @property
    def size(self) -> int:
        return self._size

    @property
    def address(self) -> int:
        assert self.buf is not None
        return C.addressof(self.buf)



class StateBlob:
    """``encode()`` == ``machine.capture_state().encode()``, fast when nothing static moved."""

    def __init__(self, machine: Machine) -> None:
        self.m = machine
        self._head = b""
        self._vcpus: list[_VcpuPieces] = []
        self._template: BlobTemplate | None = None

    def encode(self) -> bytes:
        vcpus = self._vcpus
        if not vcpus or not all(p.current() for p in vcpus):
            return self._rebuild()
        out = [self._head]
        for p in vcpus:
            p.add(out)
        self._devices(out)
        return b"".join(out)

    def template(self) -> BlobTemplate | None:
        """The blob laid out for a caller that fills it itself (the steady pause): the blob is
        then its buffer (``address``, ``size``) followed by ``encode_devices()``;
        None when the kept pieces may be stale (``encode`` must run). The same object comes
        back for as long as the pieces hold."""
        vcpus = self._vcpus
        if not vcpus or not all(p.current() for p in vcpus):
            return None
        t = self._template
        if t is None:
            t = self._template = BlobTemplate()
            t.static(self._head)
            # (Checked here, not with the pieces: every restore rebuilds those, and the check
            # costs two vCPU ioctls that only a template can use.)
            fast_tsc = len(vcpus) == 1 and host_tsc_plus_offset(vcpus[0].runner)
            for p in vcpus:
                p.lay_out(t, fast_tsc)
            t.seal()
        return t

    def encode_devices(self) -> bytes:
        """The devices' part of the blob, which follows the vCPUs' (a ``BlobTemplate``'s)."""
        devices: list[bytes] = []
        self._devices(devices)
        return b"".join(devices)

    def _devices(self, out: list[bytes]) -> None:
        for d in self.m.devices:
            name = d.name.encode()
            data = d.save()
            out += (_U32.pack(len(name)), name, _U32.pack(len(data)), data)

    def _rebuild(self) -> bytes:
        """The slow path, which also refreshes the kept pieces from its records."""
        st = self.m.capture_state()
        self._head = struct.pack("<HHI", len(st.vcpus), len(st.devices), len(st.config)) + \
            st.config
        self._vcpus = [_VcpuPieces(r, v) for r, v in zip(self.m.runners, st.vcpus)]
        self._template = None
        return st.encode()
