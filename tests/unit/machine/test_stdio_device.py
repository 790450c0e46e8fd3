"""The stdio device drains what the library OS queued, in order, and refuses impossible ring
contents with ContractBroken (never another exception, never a read outside the ring)."""
from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dirtyring.guests.protocol import STDIO_HEADER_OFFSETS, STDIO_RING, STDIO_RING_OFFSET
from dirtyring.machine import layout
from dirtyring.machine.devices.stdio import ContractBroken, StdioDevice

BASE = layout.QUEUE_GPA
RING = BASE + STDIO_RING_OFFSET


class FakeMemory:
    """Guest memory as a dict of byte arrays; reads outside what was made fail loudly."""

    def __init__(self) -> None:
        self.area = bytearray(STDIO_RING_OFFSET + STDIO_RING)

    def _off(self, gpa: int, n: int) -> int:
        off = gpa - BASE
        assert 0 <= off and off + n <= len(self.area), f"read outside the queue: {gpa:#x}+{n}"
        return off

    def read(self, gpa: int, n: int) -> bytes:
        off = self._off(gpa, n)
        return bytes(self.area[off:off + n])

    def read_u64(self, gpa: int) -> int:
        return struct.unpack("<Q", self.read(gpa, 8))[0]

    def write_u64(self, gpa: int, v: int) -> None:
        off = self._off(gpa, 8)
        self.area[off:off + 8] = struct.pack("<Q", v)


class Guest:
    """The library OS's producer side, in Python, as libos.c writes records."""

    def __init__(self, mem: FakeMemory) -> None:
        self.mem, self.prod = mem, 0

    def put(self, fd: int, data: bytes) -> None:
        need = (8 + len(data) + 7) & ~7
        off = self.prod % STDIO_RING
        if STDIO_RING - off < need:
            self._record(off, 0, STDIO_RING - off - 8, b"")
            self.prod += STDIO_RING - off
            off = 0
        self._record(off, fd, len(data), data)
        self.prod += need
        self.mem.write_u64(BASE + STDIO_HEADER_OFFSETS["prod"], self.prod)

    def _record(self, off: int, fd: int, n: int, data: bytes) -> None:
        a = STDIO_RING_OFFSET + off
        self.mem.area[a:a + 8] = struct.pack("<II", fd, n)
        self.mem.area[a + 8:a + 8 + len(data)] = data


def _device() -> tuple[StdioDevice, FakeMemory, list[tuple[str, Any]]]:
    mem = FakeMemory()
    out: list[tuple[str, Any]] = []
    return StdioDevice(mem, lambda k, p: out.append((k, bytes(p)))), mem, out  # type: ignore


def test_records_come_out_in_order_across_the_wrap() -> None:
    dev, mem, out = _device()
    g = Guest(mem)
    expect = []
    for i in range(200):  # several times round the ring, draining now and then
        data = bytes([i % 251]) * (37 * i % 4000 + 1)
        fd = 1 + i % 2
        g.put(fd, data)
        expect.append(("stdout" if fd == 1 else "stderr", data))
        if i % 5 == 4:
            dev.drain()
    dev.drain()
    assert out == expect
    assert mem.read_u64(BASE + STDIO_HEADER_OFFSETS["cons"]) == g.prod == dev.cons
    assert dev.drain() == 0


@pytest.mark.parametrize("fd, n, why", [(7, 5, "fd 7"), (1, STDIO_RING, "length"),
                                        (0, 16, "padding")])
def test_bad_records_are_refused(fd: int, n: int, why: str) -> None:
    dev, mem, _ = _device()
    mem.area[STDIO_RING_OFFSET:STDIO_RING_OFFSET + 8] = struct.pack("<II", fd, n)
    mem.write_u64(BASE, 64)
    with pytest.raises(ContractBroken, match=why):
        dev.drain()


def test_a_producer_index_out_of_reach_is_refused() -> None:
    dev, mem, _ = _device()
    mem.write_u64(BASE, STDIO_RING + 8)
    with pytest.raises(ContractBroken, match="producer index"):
        dev.drain()
    mem.write_u64(BASE, 16)  # a record that claims more than the producer says
    mem.area[STDIO_RING_OFFSET:STDIO_RING_OFFSET + 8] = struct.pack("<II", 1, 100)
    with pytest.raises(ContractBroken, match="past the producer"):
        dev.drain()


@settings(max_examples=300, deadline=None)
@given(prod=st.integers(0, 2 * STDIO_RING), junk=st.binary(min_size=64, max_size=512),
       at=st.integers(0, STDIO_RING - 512))
def test_scribbled_rings_give_contract_broken_or_output(prod: int, junk: bytes, at: int) -> None:
    dev, mem, out = _device()
    mem.area[STDIO_RING_OFFSET + at:STDIO_RING_OFFSET + at + len(junk)] = junk
    mem.write_u64(BASE, prod)
    try:
        n = dev.drain()
    except ContractBroken:
        assert dev.cons == 0 and not out  # a broken ring releases nothing
        return
    assert n == sum(len(p) for _, p in out) and dev.cons == prod
