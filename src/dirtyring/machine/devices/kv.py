"""Paravirtual key-value device: request and response rings in guest memory plus a doorbell.

The VMM side (this file) writes requests into the request ring (tracked as VMM writes), and the
guest fetches them after ``in PORT_KV_WAIT``; while no request is queued that ``in`` blocks here,
which is how the guest idles. Responses are read after ``out PORT_KV_DONE`` and go to the
output sink as KvResponse records: replication holds them until their checkpoint commits.
Requests are accepted only while the ring has room; the rest wait in a host-side queue, so no
request is dropped.
"""
from __future__ import annotations

import collections
import struct
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ...guests.protocol import (KV_ENTRY, KV_GET, KV_HEADER_OFFSETS, KV_PUT, KV_REQ_OFFSET,
                                KV_RESP_OFFSET, KV_RING, Port)
from .. import layout
from .base import OutputSink

if TYPE_CHECKING:
    from ..memory import GuestMemory
    from ..vcpu import VcpuRunner


@dataclass(frozen=True, slots=True, kw_only=True)
class KvRequest:
    id: int
    op: int  # KV_PUT or KV_GET
    key: int
    value: int = 0

    def __post_init__(self) -> None:
        if self.op not in (KV_PUT, KV_GET):
            raise ValueError(f"bad kv op {self.op}")
        if not 0 <= self.id < 1 << 32:
            raise ValueError("kv request ids are 0..2^32-1 (the ring entry holds a u32)")
        if not 0 < self.key < 1 << 64 or not 0 <= self.value < 1 << 64:
            raise ValueError("kv keys are 1..2^64-1 and values 0..2^64-1")


@dataclass(frozen=True, slots=True, kw_only=True)
class KvResponse:
    id: int
    status: int
    key: int
    value: int


class KvDevice:
    name = "kv"
    ports = (int(Port.KV_WAIT), int(Port.KV_DONE))
    WAIT_SLICE = 0.002  # the doorbell blocks at most this long, so pauses are never delayed

    def __init__(self, memory: GuestMemory, sink: OutputSink) -> None:
        self.memory = memory
        self.sink = sink
        self._pending: collections.deque[KvRequest] = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        q = layout.QUEUE_GPA
        self._h = {k: q + v for k, v in KV_HEADER_OFFSETS.items()}
        self.submitted = 0
        self.completed = 0

    # --- host side ------------------------------------------------------------------------------
    def submit(self, req: KvRequest) -> None:
        """Queue a request (any thread). It reaches the guest at its next doorbell."""
        with self._lock:
            self._pending.append(req)
            self.submitted += 1
        self._wake.set()

    def wake(self) -> None:
        """Release a vCPU blocked in the doorbell (used when pausing)."""
        self._wake.set()

    def _push_pending(self) -> int:
        """Move queued requests into the guest's ring while it has room; returns req_prod."""
        m = self.memory
        with self._lock:
            prod = m.read_u64(self._h["req_prod"])
            cons = m.read_u64(self._h["req_cons"])
            n = 0
            while self._pending and prod - cons < KV_RING:
                r = self._pending.popleft()
                gpa = layout.QUEUE_GPA + KV_REQ_OFFSET + (prod % KV_RING) * KV_ENTRY.size
                m.write(gpa, KV_ENTRY.pack(r.op, r.id & 0xFFFFFFFF, r.key, r.value, 0))
                prod += 1
                n += 1
            if n:
                m.write_u64(self._h["req_prod"], prod)
        return prod

    # --- guest side -----------------------------------------------------------------------------
    def io_in(self, vcpu: VcpuRunner, port: int, size: int) -> int:
        prod = self._push_pending()
        cons = self.memory.read_u64(self._h["req_cons"])
        if prod == cons and not vcpu.pause_requested:
            wait = self.WAIT_SLICE
            if vcpu.deadline:  # inline: never hold the vCPU past the end of its epoch
                wait = max(0.0, min(wait, vcpu.deadline - time.monotonic()))
            self._wake.wait(wait)
            self._wake.clear()
            prod = self._push_pending()
        return prod & 0xFFFFFFFF

    def io_out(self, vcpu: VcpuRunner, port: int, value: int, size: int) -> None:
        m = self.memory
        prod = m.read_u64(self._h["resp_prod"])
        cons = m.read_u64(self._h["resp_cons"])
        out = []
        while cons < prod:
            gpa = layout.QUEUE_GPA + KV_RESP_OFFSET + (cons % KV_RING) * KV_ENTRY.size
            st, rid, key, val, _ = KV_ENTRY.unpack(m.read(gpa, KV_ENTRY.size))
            out.append(KvResponse(id=rid, status=st, key=key, value=val))
            cons += 1
        m.write_u64(self._h["resp_cons"], cons)
        self.completed += len(out)
        for r in out:
            self.sink("kv", r)

    def save(self) -> bytes:
        with self._lock:
            reqs = list(self._pending)
        return struct.pack("<I", len(reqs)) + b"".join(
            struct.pack("<IIQQ", r.id, r.op, r.key, r.value) for r in reqs)

    def restore(self, data: bytes) -> None:
        (n,) = struct.unpack_from("<I", data)
        reqs = [struct.unpack_from("<IIQQ", data, 4 + 24 * i) for i in range(n)]
        with self._lock:
            self._pending = collections.deque(KvRequest(id=a, op=b, key=c, value=d)
                                              for a, b, c, d in reqs)
