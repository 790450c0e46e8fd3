"""The staging area the epoch loop and its uplink process share.

A memfd both processes map: a header page of u64 counters (cells released by the uplink, the
last epoch the standby acknowledged, the epoch loop's liveness counter: ``uplink_messages``
names the words), then a ring of fixed-size *cells*, each holding up to ``cell_pages`` page
indices and their pages, and a state area for one checkpoint's vCPU state record (the steady
pause lays it there itself). What is staged where is told over the control socket
(``uplink_messages.py``).
"""
from __future__ import annotations

import numpy as np

from .._bindings.mapping import Mapping

PAGE = 4096
HEADER = 4096
#: Bytes of each cell's state area: a one-vCPU machine's state is ~6 KiB (XSAVE is 4 KiB).
STATE_AREA_BYTES = 16 << 10

#: The staging area's default shape: ``CELLS`` cells of up to ``CELL_PAGES`` pages (256 MiB at
#: most). The steady batch takes a cell per checkpoint and the uplink frees a batch's cells
#: only once told of it, at the batch's end, so batches settle at about half the cells the
#: epoch loop may fill ahead. Measured with a 64-page hot set at 150 µs, 3 runs each,
#: interleaved: 16 x 4096 gave batches of ~6 and 3,575-3,911 checkpoints/s, 32 x 2048 batches
#: of ~12 and 4,060-4,166/s, the guest at ~50 % in both (Python's share of a batch, ~200-400 µs
#: right after the guest ran, is spread over twice the checkpoints). 64 cells leave room for the
#: batches of a 4 ms window (``PrimaryOptions.batch_window``); 64 of 2048 pages slowed big
#: epochs down (4096 pages at 25 ms: pause p99 ~34 ms against ~21 ms; staging memory is touched
#: for the first time over twice as many epochs).
CELLS = 64
CELL_PAGES = 1024


def align(n: int) -> int:
    return (n + PAGE - 1) // PAGE * PAGE


class Staging:
    """The shared staging area: header + ``cells`` cells of ``cell_pages`` pages (and their
    page indices) and a state area each. Both processes build the same views over the same
    memfd. Cells are used in sequence: sequence number ``seq`` is cell ``seq % cells``."""

    @staticmethod
    def size_for(cells: int, cell_pages: int) -> int:
        """Bytes of the memfd a staging area of this shape needs."""
        return HEADER + cells * (align(cell_pages * 8) + cell_pages * PAGE + STATE_AREA_BYTES)

    def __init__(self, fd: int, cells: int, cell_pages: int) -> None:
        self.cells, self.cell_pages = cells, cell_pages
        self.idx_bytes = align(cell_pages * 8)
        self.cell_bytes = self.idx_bytes + cell_pages * PAGE + STATE_AREA_BYTES
        self.size = self.size_for(cells, cell_pages)
        self.map = Mapping(fd, self.size)
        self.header = self.map.array(np.uint64, 0, HEADER // 8)
        bases = [HEADER + i * self.cell_bytes for i in range(cells)]
        self._idx = [self.map.array(np.int64, b, cell_pages) for b in bases]
        self._data = [self.map.array(np.uint8, b + self.idx_bytes, cell_pages * PAGE)
                      .reshape(-1, PAGE) for b in bases]
        self._states = [self.map.array(np.uint8, b + self.cell_bytes - STATE_AREA_BYTES,
                                       STATE_AREA_BYTES) for b in bases]
        self._addrs: list[tuple[int, int]] = []  # (pages, indices) per cell, found on first use

    def addresses(self, seq: int) -> tuple[int, int]:
        """Where staging cell ``seq``'s pages and page indices (int64) start in memory."""
        if not self._addrs:
            self._addrs = [(int(d.ctypes.data), int(i.ctypes.data))
                           for d, i in zip(self._data, self._idx)]
        return self._addrs[seq % self.cells]

    def indices(self, seq: int) -> np.ndarray:
        return self._idx[seq % self.cells]

    def data(self, seq: int) -> np.ndarray:
        return self._data[seq % self.cells]

    def state_area(self, seq: int) -> np.ndarray:
        """Staging cell ``seq``'s state area (``STATE_AREA_BYTES``)."""
        return self._states[seq % self.cells]

    def close(self) -> None:
        self._idx, self._data, self._addrs, self._states = [], [], [], []
        self.map.close()
