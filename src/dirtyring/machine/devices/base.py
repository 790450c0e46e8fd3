"""The device interface and the output sink through which guest output leaves the machine."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Protocol

if TYPE_CHECKING:
    from ..vcpu import VcpuRunner

#: Receives every piece of output the guest produces: (kind, payload). Replication replaces the
#: default sink with one that holds output until its checkpoint is acknowledged.
OutputSink = Callable[[str, Any], None]


class Device(Protocol):
    name: str

    @property
    def ports(self) -> tuple[int, ...]: ...  # read-only: a device's own tuple type fits

    def io_out(self, vcpu: VcpuRunner, port: int, value: int, size: int) -> None: ...

    def io_in(self, vcpu: VcpuRunner, port: int, size: int) -> int: ...

    def save(self) -> bytes: ...

    def restore(self, data: bytes) -> None: ...
