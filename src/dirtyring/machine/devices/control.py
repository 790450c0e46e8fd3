"""The guest's control ports: DONE (finished), TICK (dirtier progress), REPORT (compute chain)."""
from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Callable

from ...errors import SnapshotFormatError
from ...guests.protocol import STATUS_OFFSET, Port
from .. import layout
from .base import OutputSink

if TYPE_CHECKING:
    from ..memory import GuestMemory
    from ..vcpu import VcpuRunner


class ControlPorts:
    name = "control"
    ports = (int(Port.DONE), int(Port.TICK), int(Port.REPORT))

    def __init__(self, memory: GuestMemory, sink: OutputSink) -> None:
        self.memory = memory
        self.sink = sink
        self.ticks = 0
        self.reports = 0
        #: vCPU index -> the value its DONE carried (a program's exit status): state, so a
        #: machine restored after its guest finished still knows how it ended.
        self.exit_codes: dict[int, int] = {}
        #: Called on the vCPU thread for every TICK (benchmarks use it to stop after N writes).
        self.on_tick: Callable[[VcpuRunner], None] | None = None

    def io_out(self, vcpu: VcpuRunner, port: int, value: int, size: int) -> None:
        if port == Port.DONE:
            vcpu.finished = True
            vcpu.exit_code = value
            self.exit_codes[vcpu.index] = value
            vcpu.machine.on_finished(vcpu)
        elif port == Port.TICK:
            self.ticks += 1
            if self.on_tick is not None:
                self.on_tick(vcpu)
        elif port == Port.REPORT:
            self.reports += 1
            base = layout.status_gpa(vcpu.index)
            i = self.memory.read_u64(base + STATUS_OFFSET["report_i"])
            h = self.memory.read_u64(base + STATUS_OFFSET["report_h"])
            self.sink("report", (vcpu.index, i, h))

    def io_in(self, vcpu: VcpuRunner, port: int, size: int) -> int:
        return 0xFFFFFFFF

    def save(self) -> bytes:
        codes = sorted(self.exit_codes.items())
        return struct.pack(f"<QQI{2 * len(codes)}I", self.ticks, self.reports, len(codes),
                           *(x & 0xFFFFFFFF for kv in codes for x in kv))

    def restore(self, data: bytes) -> None:
        """Load a saved state (also the 16-byte one of older snapshots)."""
        try:
            self.ticks, self.reports = struct.unpack_from("<QQ", data)
            codes: dict[int, int] = {}
            if len(data) > 16:
                (n,) = struct.unpack_from("<I", data, 16)
                flat = struct.unpack(f"<{2 * n}I", data[20:])
                codes = dict(zip(flat[::2], flat[1::2]))
        except struct.error:
            raise SnapshotFormatError(f"control device state of {len(data)} bytes is "
                                      "malformed") from None
        self.exit_codes = codes
