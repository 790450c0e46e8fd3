"""Accumulates bytes from partial reads until the codec can cut a whole frame off the front.

Why not just ``bytes +=``: frames of tens of MiB arrive in 64 KiB reads, and re-copying the whole
backlog on every read (or every consume) is quadratic. A bytearray grows in place (amortized
O(1) appends), and consumed bytes are only dropped once they are at least half the buffer, so
each byte is moved a bounded number of times.
"""
from __future__ import annotations

from typing import Final

__all__ = ["ReceiveBuffer"]

#: Don't bother compacting for less than this; small frames just advance an offset.
_COMPACT_MIN: Final = 64 * 1024


class ReceiveBuffer:
    """A FIFO of bytes: ``append`` at the back, ``peek``/``consume`` at the front."""

    __slots__ = ("_data", "_start")

    def __init__(self) -> None:
        self._data = bytearray()
        self._start = 0  # bytes before this offset are already consumed

    def __len__(self) -> int:
        return len(self._data) - self._start

    def __bool__(self) -> bool:
        return len(self) > 0

    def append(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes received from the peer (copied: the caller may reuse its buffer)."""
        self._data += data

    def peek(self, n: int) -> bytes:
        """Return up to ``n`` bytes from the front without consuming them."""
        return self._copy(self._start, min(self._start + n, len(self._data)))

    def consume(self, n: int) -> bytes | bytearray:
        """Remove and return exactly ``n`` bytes from the front (caller checked ``len``).

        Taking most of the buffer (the usual case for a big frame) hands over the internal
        bytearray itself and copies only the short remainder, so a 64 MiB frame is not copied
        again on its way out; small takes return a bytes copy.
        """
        if n < 0 or n > len(self):
            raise ValueError(f"cannot consume {n} bytes, {len(self)} buffered")
        end = self._start + n
        if n * 2 >= len(self._data):
            out = self._data
            self._data = bytearray(out[end:])
            del out[end:]
            del out[:self._start]
            self._start = 0
            return out
        taken = self._copy(self._start, end)
        self._start = end
        self._compact()
        return taken

    def clear(self) -> None:
        """Drop everything buffered (used when the connection enters ERROR)."""
        self._data.clear()
        self._start = 0

    def _copy(self, start: int, end: int) -> bytes:
        # One copy via a memoryview (a bytearray slice would copy twice); the views are released
        # before returning because a bytearray with live exports cannot be resized.
        with memoryview(self._data) as whole, whole[start:end] as part:
            return bytes(part)

    def _compact(self) -> None:
        if self._start == len(self._data):
            self._data.clear()
            self._start = 0
        elif self._start >= _COMPACT_MIN and self._start * 2 >= len(self._data):
            del self._data[:self._start]
            self._start = 0

    def __repr__(self) -> str:
        return f"<ReceiveBuffer {len(self)} bytes buffered>"
