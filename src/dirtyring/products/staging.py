"""What the epoch loop and its uplink process share: the staging area and the control messages.

The staging area is a memfd both processes map: a header page of u64 counters (slots released
by the uplink, the last epoch the standby acknowledged, the epoch loop's liveness counter), then
a ring of fixed-size slots, each holding up to ``slot_pages`` page indices and their pages.
Control messages are pickled tuples on an AF_UNIX SOCK_SEQPACKET pair (one message per packet);
both ends are our own processes.
"""
from __future__ import annotations

import pickle
import socket
from typing import Any

import numpy as np

from .._bindings.mapping import Mapping

PAGE = 4096
HEADER = 4096
CONSUMED, ACKED, ALIVE = 0, 1, 2  # header words


def align(n: int) -> int:
    return (n + PAGE - 1) // PAGE * PAGE


class Staging:
    """The shared staging area: header + ``slots`` slots of ``slot_pages`` pages (and their
    page indices). Both processes build the same views over the same memfd."""

    @staticmethod
    def size_for(slots: int, slot_pages: int) -> int:
        """Bytes of the memfd a staging area of this shape needs."""
        return HEADER + slots * (align(slot_pages * 8) + slot_pages * PAGE)

    def __init__(self, fd: int, slots: int, slot_pages: int) -> None:
        self.slots, self.slot_pages = slots, slot_pages
        self.idx_bytes = align(slot_pages * 8)
        self.slot_bytes = self.idx_bytes + slot_pages * PAGE
        self.size = self.size_for(slots, slot_pages)
        self.map = Mapping(fd, self.size)
        self.header = self.map.array(np.uint64, 0, HEADER // 8)
        bases = [HEADER + i * self.slot_bytes for i in range(slots)]
        self._idx = [self.map.array(np.int64, b, slot_pages) for b in bases]
        self._data = [self.map.array(np.uint8, b + self.idx_bytes, slot_pages * PAGE)
                      .reshape(-1, PAGE) for b in bases]

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

    def close(self) -> None:
        self._idx, self._data, self._addrs = [], [], []
        self.map.close()


def send_msg(sock: socket.socket, *msg: Any) -> None:
    sock.sendall(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))


def recv_msg(sock: socket.socket, flags: int = 0) -> tuple[Any, ...] | None:
    """The next message, or None at EOF (BlockingIOError with MSG_DONTWAIT and none ready)."""
    data = sock.recv(1 << 20, flags)
    return pickle.loads(data) if data else None

