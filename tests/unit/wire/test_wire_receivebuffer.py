"""ReceiveBuffer: FIFO semantics, and compaction that never loses or reorders bytes."""
from __future__ import annotations

import pytest

from dirtyring.wire.receivebuffer import ReceiveBuffer


def test_fifo_peek_consume() -> None:
    b = ReceiveBuffer()
    assert len(b) == 0 and not b and b.peek(4) == b""
    b.append(b"hello ")
    b.append(bytearray(b"world"))
    b.append(memoryview(b"!"))
    assert len(b) == 12 and b.peek(5) == b"hello" and len(b) == 12
    assert b.consume(6) == b"hello "
    assert b.peek(100) == b"world!"
    assert b.consume(6) == b"world!" and len(b) == 0


def test_consume_more_than_buffered_is_a_bug() -> None:
    b = ReceiveBuffer()
    b.append(b"abc")
    with pytest.raises(ValueError):
        b.consume(4)
    with pytest.raises(ValueError):
        b.consume(-1)
    assert b.consume(3) == b"abc"


def test_compaction_keeps_order_over_many_megabytes() -> None:
    b = ReceiveBuffer()
    stream = bytes(range(256)) * 4096 * 8  # 8 MiB
    out = bytearray()
    pos = 0
    for step in (65536, 70001, 3, 1 << 20):
        while pos < len(stream) // 2:
            b.append(stream[pos:pos + step])
            pos += step
            out += b.consume(len(b) // 2 + 1) if len(b) > 1 else b.consume(len(b))
    out += b.consume(len(b))
    assert bytes(out) == stream[:pos]
    assert b._start == 0 and len(b._data) == 0  # fully drained buffer holds nothing


def test_big_take_hands_over_the_buffer_and_keeps_the_rest() -> None:
    b = ReceiveBuffer()
    b.append(b"xx")
    b.consume(1)                     # offset the front
    b.append(b"F" * 1000 + b"next")
    out = b.consume(1001)
    assert bytes(out) == b"x" + b"F" * 1000
    assert len(b) == 4 and b.consume(4) == b"next"
    b.append(b"again")
    assert b.peek(5) == b"again" and bytes(out) == b"x" + b"F" * 1000  # no aliasing


def test_clear() -> None:
    b = ReceiveBuffer()
    b.append(b"x" * 10)
    b.consume(3)
    b.clear()
    assert len(b) == 0 and b.peek(1) == b""
