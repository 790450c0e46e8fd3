"""What the epoch loop and its uplink process share: the staging area and the control messages.

The staging area is a memfd both processes map: a header page of u64 counters (slots released
by the uplink, the last epoch the standby acknowledged, the epoch loop's liveness counter), then
a ring of fixed-size slots, each holding up to ``slot_pages`` page indices and their pages, and
room for one checkpoint's vCPU state (``blob``: the steady pause lays it there itself).
Control messages are pickled tuples on an AF_UNIX SOCK_SEQPACKET pair (one message per packet);
both ends are our own processes.
"""
from __future__ import annotations

import pickle
import socket
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._bindings.mapping import Mapping

PAGE = 4096
HEADER = 4096
CONSUMED, ACKED, ALIVE = 0, 1, 2  # header words
#: Bytes of each slot's state area: a one-vCPU machine's state is ~6 KiB (XSAVE is 4 KiB).
BLOB_BYTES = 16 << 10

#: (staging seq, offset in that slot, memory slot, pages, words): where an epoch's pages are.
#: ``words`` -1: the pages themselves; else only their 64-bit words that changed since the
#: last checkpoint were staged there (a steady pause's delta gather, see ``native.py``):
#: ``words`` offsets (int64), then, ``pages * DELTA_WORDS`` words from the part's start,
#: their XORs (uint64).
Part = tuple[int, int, int, int, int]


def align(n: int) -> int:
    return (n + PAGE - 1) // PAGE * PAGE


class Staging:
    """The shared staging area: header + ``slots`` slots of ``slot_pages`` pages (and their
    page indices). Both processes build the same views over the same memfd."""

    @staticmethod
    def size_for(slots: int, slot_pages: int) -> int:
        """Bytes of the memfd a staging area of this shape needs."""
        return HEADER + slots * (align(slot_pages * 8) + slot_pages * PAGE + BLOB_BYTES)

    def __init__(self, fd: int, slots: int, slot_pages: int) -> None:
        self.slots, self.slot_pages = slots, slot_pages
        self.idx_bytes = align(slot_pages * 8)
        self.slot_bytes = self.idx_bytes + slot_pages * PAGE + BLOB_BYTES
        self.size = self.size_for(slots, slot_pages)
        self.map = Mapping(fd, self.size)
        self.header = self.map.array(np.uint64, 0, HEADER // 8)
        bases = [HEADER + i * self.slot_bytes for i in range(slots)]
        self._idx = [self.map.array(np.int64, b, slot_pages) for b in bases]
        self._data = [self.map.array(np.uint8, b + self.idx_bytes, slot_pages * PAGE)
                      .reshape(-1, PAGE) for b in bases]
        self._blobs = [self.map.array(np.uint8, b + self.slot_bytes - BLOB_BYTES, BLOB_BYTES)
                       for b in bases]

    def addresses(self, seq: int) -> tuple[int, int]:
        """Where staging slot ``seq``'s pages and page indices (int64) start in memory."""
        k = seq % self.slots
        if not self._addrs:
            self._addrs = [(int(d.ctypes.data), int(i.ctypes.data))
                           for d, i in zip(self._data, self._idx)]
        return self._addrs[k]

    _addrs: list[tuple[int, int]] = []

    def indices(self, seq: int) -> np.ndarray:
        return self._idx[seq % self.slots]

    def data(self, seq: int) -> np.ndarray:
        return self._data[seq % self.slots]

    def blob(self, seq: int) -> np.ndarray:
        """Staging slot ``seq``'s state area (``BLOB_BYTES``)."""
        return self._blobs[seq % self.slots]

    def close(self) -> None:
        self._idx, self._data, self._addrs, self._blobs = [], [], [], []
        self.map.close()


def epoch_parts(seq: int, sizes: list[tuple[int, int]], words: list[int] | None) -> list[Part]:
    """An epoch's parts when it fills staging slot ``seq`` on its own: its memory slots' pages
    (``sizes``: (memory slot, pages)) one after the other, ``words[i]`` changed words of part i
    (None: all are pages)."""
    parts, off = [], 0
    for i, (slot, pages) in enumerate(sizes):
        parts.append((seq, off, slot, pages, -1 if words is None else words[i]))
        off += pages
    return parts


@dataclass(frozen=True, slots=True)
class SteadyEpochs:
    """The checkpoints of a steady batch, told to the uplink in one record: epoch
    ``epoch + i`` fills staging slot ``seq + i`` (``epoch_parts``) and its vCPU state is the
    first ``blob`` bytes of that slot's state area, followed by ``devices`` (the devices'
    state, the same for all: any device I/O ends a batch)."""

    epoch: int
    seq: int
    count: int
    sizes: list[tuple[int, int]]
    words: list[list[int]] | None  # per epoch, per part (None: pages)
    blob: int
    devices: bytes
    digests: list[bytes] | None  # per epoch (verify mode)

    def parts(self, i: int) -> list[Part]:
        return epoch_parts(self.seq + i, self.sizes, None if self.words is None
                           else self.words[i])

    def state(self, staging: Staging, i: int) -> bytes:
        return staging.blob(self.seq + i)[:self.blob].tobytes() + self.devices

    def digest(self, i: int) -> bytes:
        return b"" if self.digests is None else self.digests[i]

    def fields(self) -> tuple[Any, ...]:
        """``SteadyEpochs(*fields())`` is this record. Control messages carry it so: a tuple
        pickles in a fifth of the time of the dataclass (~0.7 against ~3.5 µs warm), and it
        goes right after a batch, when everything is slow."""
        return (self.epoch, self.seq, self.count, self.sizes, self.words, self.blob,
                self.devices, self.digests)


def send_msg(sock: socket.socket, *msg: Any) -> None:
    sock.sendall(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))


#: The largest control message (SOCK_SEQPACKET: one message per packet, whole or not at all).
MAX_MSG = 1 << 20
_recv = threading.local()


def recv_msg(sock: socket.socket, flags: int = 0) -> tuple[Any, ...] | None:
    """The next message, or None at EOF (BlockingIOError with MSG_DONTWAIT and none ready).

    Into a buffer kept per thread: ``recv(MAX_MSG)`` allocates and frees a fresh MiB for
    every message, ~15 µs here, against ~1.5 µs for the read itself."""
    buf = getattr(_recv, "buf", None)
    if buf is None:
        buf = _recv.buf = bytearray(MAX_MSG)
    n = sock.recv_into(buf, MAX_MSG, flags)
    return pickle.loads(memoryview(buf)[:n]) if n else None

