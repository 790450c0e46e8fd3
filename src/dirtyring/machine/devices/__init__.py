"""Devices the VMM emulates for its guests, one file each. A device claims I/O ports, may write
guest memory only through GuestMemory (so its writes are tracked), and keeps its state in a
``DeviceState`` record."""
from __future__ import annotations

from .base import Device, OutputSink
from .console import Console
from .control import ControlPorts
from .kv import KvDevice, KvRequest, KvResponse
from .stdio import StdioDevice

__all__ = ["Device", "OutputSink", "Console", "ControlPorts", "KvDevice", "KvRequest",
           "KvResponse", "StdioDevice"]
