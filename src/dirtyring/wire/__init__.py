"""Sans-IO wire protocol for replication, migration and snapshot streams.

No networking code at all: :class:`Connection` turns events into bytes and bytes into events,
and the caller (``replication/transport.py``) owns sockets, clocks and threads. Imports nothing
from dirtyring but :mod:`dirtyring.errors`.
"""
from __future__ import annotations

from .codec import (
    FRAME_OVERHEAD, HEADER_LEN, MAC_LEN, MAGIC, MAX_FRAME_SIZE, WIRE_VERSION, FrameType,
    PageEncoding, encode_pages_parts,
)
from .connection import MIN_KEY_LEN, NEED_DATA, Connection, NeedData, WireStatistics
from .events import (
    Ack, Checkpoint, ConnectionClosed, EpochBegin, EpochEnd, Event, Failover, Goodbye, Heartbeat,
    Hello, HelloAck, MachineBlob, Pages, PROTOCOL_VERSION, Resync,
)
from .states import (
    CLOSED, ERROR, HANDSHAKE, IDLE, IN_EPOCH, PRIMARY, STANDBY, SYNCING, Role, State,
)

__all__ = [
    # connection
    "Connection", "NEED_DATA", "NeedData", "WireStatistics", "MIN_KEY_LEN",
    # events
    "Event", "Hello", "HelloAck", "EpochBegin", "Pages", "MachineBlob", "EpochEnd",
    "Checkpoint", "Ack", "Resync", "Heartbeat", "Failover", "Goodbye", "ConnectionClosed",
    "PROTOCOL_VERSION",
    # roles and states
    "Role", "State", "PRIMARY", "STANDBY", "IDLE", "HANDSHAKE", "SYNCING", "IN_EPOCH", "CLOSED",
    "ERROR",
    # frame format
    "MAGIC", "WIRE_VERSION", "HEADER_LEN", "MAC_LEN", "FRAME_OVERHEAD", "MAX_FRAME_SIZE",
    "FrameType", "PageEncoding", "encode_pages_parts",
]
