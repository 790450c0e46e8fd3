"""The stdio device drains what the library OS queued, in order, and refuses impossible ring
contents with ContractBroken (never another exception, never a read outside the ring)."""
from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dirtyring.errors import SnapshotFormatError
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


# --- undelivered output (replication) -------------------------------------------------------
def _kept() -> tuple[StdioDevice, Guest, list[tuple[str, Any]]]:
    dev, mem, out = _device()
    dev.keep_undelivered = True
    return dev, Guest(mem), out


def test_chunks_are_kept_with_their_offsets_until_delivered() -> None:
    dev, g, out = _kept()
    for fd, data in [(1, b"one\n"), (2, b"err\n"), (1, b"two\n"), (1, b"three\n")]:
        g.put(fd, data)
    dev.drain()
    assert list(dev.undelivered) == [("stdout", 0, b"one\n"), ("stderr", 0, b"err\n"),
                                     ("stdout", 4, b"two\n"), ("stdout", 8, b"three\n")]
    dev.delivered("stdout")  # the oldest stdout chunk went out
    assert dev.stream_offsets() == {"stdout": 4, "stderr": 0}
    dev.delivered("stderr")
    dev.delivered("stdout")
    assert dev.stream_offsets() == {"stdout": 8, "stderr": 4}
    dev.delivered("stdout")
    assert not dev.undelivered and dev.stream_offsets() == {"stdout": 14, "stderr": 4}
    assert out == [("stdout", b"one\n"), ("stderr", b"err\n"), ("stdout", b"two\n"),
                   ("stdout", b"three\n")]


def test_a_restored_device_replays_what_was_not_delivered() -> None:
    """A standby's device, from the primary's saved state: the undelivered chunks come out
    again, in order, and the stream goes on at the offsets they had."""
    dev, g, _ = _kept()
    g.put(1, b"a" * 10)
    g.put(1, b"b" * 5)
    g.put(2, b"!")
    dev.drain()
    dev.delivered("stdout")
    blob = dev.save()
    other, _, out = _device()
    other.restore(blob)
    assert other.stream_offsets() == {"stdout": 10, "stderr": 0}
    assert other.out_off == {"stdout": 15, "stderr": 1} and other.cons == dev.cons
    assert other.replay_undelivered() == 2
    assert out == [("stdout", b"b" * 5), ("stderr", b"!")]
    other.forget_undelivered()
    assert not other.undelivered and other.save() != blob


def test_without_keeping_nothing_is_kept() -> None:
    dev, mem, out = _device()
    Guest(mem).put(1, b"x")
    dev.drain()
    assert not dev.undelivered and dev.out_off["stdout"] == 1 and out == [("stdout", b"x")]


def test_an_old_32_byte_state_still_restores() -> None:
    dev, _, _ = _device()
    dev.restore(struct.pack("<QQQQ", 64, 0, 0, 1))
    assert dev.cons == 64 and dev.stdin_eof and not dev.undelivered


@pytest.mark.parametrize("cut", [1, 20, 47, 52, 60])
def test_a_truncated_or_impossible_state_is_a_clear_error(cut: int) -> None:
    dev, g, _ = _kept()
    g.put(1, b"hello")
    dev.drain()
    blob = dev.save()
    other, _, _ = _device()
    with pytest.raises(SnapshotFormatError):
        other.restore(blob[:-cut])
    with pytest.raises(SnapshotFormatError):
        other.restore(blob + b"x")
    bad = bytearray(blob)
    bad[_HEAD:_HEAD + 4] = struct.pack("<I", 9)  # fd 9
    with pytest.raises(SnapshotFormatError):
        other.restore(bytes(bad))
    assert other.cons == 0  # nothing changed


_HEAD = struct.calcsize("<QQQQQQI")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_restore_or_fail_cleanly(blob: bytes) -> None:
    dev, _, _ = _device()
    try:
        dev.restore(blob)
    except SnapshotFormatError:
        pass
