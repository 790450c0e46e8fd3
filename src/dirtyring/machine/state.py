"""Machine state records: what a checkpoint, snapshot or migration carries besides memory.

Records hold the raw bytes of the kernel structs (as Firecracker's VcpuState holds kvm structs),
so capture and restore are exact and cheap; ``codec`` turns them into one versioned blob.
Guest memory is never part of these records.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

from ..errors import SnapshotFormatError


@dataclass(frozen=True, slots=True, kw_only=True)
class VcpuState:
    """Everything KVM keeps for one vCPU (raw kernel structs)."""

    index: int
    regs: bytes
    sregs: bytes
    fpu: bytes
    xsave: bytes
    xcrs: bytes
    msrs: tuple[tuple[int, int], ...]
    lapic: bytes
    events: bytes
    mp_state: int
    finished: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceState:
    """A device's state as opaque bytes keyed by device name (each device owns its encoding)."""

    name: str
    data: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class MachineState:
    """The whole machine apart from memory: vCPUs, devices and the configuration it came from."""

    config: bytes  # JSON of MachineConfig, to build an identical machine
    vcpus: tuple[VcpuState, ...]
    devices: tuple[DeviceState, ...] = field(default_factory=tuple)

    def encode(self) -> bytes:
        """One self-describing blob (length-prefixed fields; versioned by the containers)."""
        # Pieces are joined once at the end (it runs at every checkpoint: no copy per field).
        out = [struct.pack("<HHI", len(self.vcpus), len(self.devices), len(self.config)),
               self.config]
        for v in self.vcpus:
            out.append(struct.pack("<IIB", v.index, v.mp_state, int(v.finished)))
            for b in (v.regs, v.sregs, v.fpu, v.xsave, v.xcrs, v.lapic, v.events):
                out += (_U32.pack(len(b)), b)
            out.append(struct.pack(f"<I{'IQ' * len(v.msrs)}", len(v.msrs),
                                   *(x for m in v.msrs for x in m)))
        for d in self.devices:
            name = d.name.encode()
            out += (_U32.pack(len(name)), name, _U32.pack(len(d.data)), d.data)
        return b"".join(out)

    @classmethod
    def decode(cls, blob: bytes) -> MachineState:
        r = _Reader(blob)
        try:
            nv, nd = r.unpack("<HH")
            config = r.lp()
            vcpus = []
            for _ in range(nv):
                index, mp, fin = r.unpack("<IIB")
                regs, sregs, fpu, xsave, xcrs, lapic, events = (r.lp() for _ in range(7))
                (n,) = r.unpack("<I")
                msrs = tuple((i, d) for i, d in (r.unpack("<IQ") for _ in range(n)))
                vcpus.append(VcpuState(index=index, regs=regs, sregs=sregs, fpu=fpu, xsave=xsave,
                                       xcrs=xcrs, msrs=msrs, lapic=lapic, events=events,
                                       mp_state=mp, finished=bool(fin)))
            devices = tuple(DeviceState(name=r.lp().decode(), data=r.lp()) for _ in range(nd))
        except (struct.error, UnicodeDecodeError) as e:
            raise SnapshotFormatError(f"machine state is truncated or malformed ({e})") from None
        if r.pos != len(blob):
            raise SnapshotFormatError("machine state has trailing bytes")
        return cls(config=config, vcpus=tuple(vcpus), devices=devices)


_U32 = struct.Struct("<I")


class _Reader:
    def __init__(self, b: bytes) -> None:
        self.b = memoryview(b)
        self.pos = 0

    def unpack(self, fmt: str) -> tuple[int, ...]:
        s = struct.calcsize(fmt)
        if self.pos + s > len(self.b):
            raise struct.error("truncated")
        v = struct.unpack_from(fmt, self.b, self.pos)
        self.pos += s
        return v

    def lp(self) -> bytes:
        (n,) = self.unpack("<I")
        if self.pos + n > len(self.b):
            raise struct.error("truncated field")
        v = bytes(self.b[self.pos:self.pos + n])
        self.pos += n
        return v
