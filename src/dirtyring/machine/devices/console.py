"""Console: one byte per ``out`` to PORT_CONSOLE; whole lines go to the output sink."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ...guests.protocol import Port
from .base import OutputSink

if TYPE_CHECKING:
    from ..vcpu import VcpuRunner


class Console:
    name = "console"
    ports = (int(Port.CONSOLE),)

    def __init__(self, sink: OutputSink) -> None:
        self.sink = sink
        self._line = bytearray()

    def io_out(self, vcpu: VcpuRunner, port: int, value: int, size: int) -> None:
        b = value & 0xFF
        if b == 10:
            self.sink("console", bytes(self._line))
            self._line.clear()
        else:
            self._line.append(b)

    def io_in(self, vcpu: VcpuRunner, port: int, size: int) -> int:
        return 0xFFFFFFFF

    def save(self) -> bytes:
        return bytes(self._line)

    def restore(self, data: bytes) -> None:
        self._line = bytearray(data)
