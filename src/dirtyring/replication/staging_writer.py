"""The epoch loop's side of the staging area (``staging_area.py``): which staging cell each
epoch's pages go to, copying them there, and when a cell may be filled again.

The uplink process reads what is staged and releases cells by advancing the header's CONSUMED
counter; it learns about parts and checkpoints through control messages (``uplink_messages``),
which the owner of this object sends (``tell``: everything ended so far; ``send_parts``: a full
cell of a big epoch ahead of its end). Kept apart from ``Uplink`` (the process and its
messages) so the copying side can be used, and tested, on its own.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np

from ..machine.native import gather_pages
from .staging_area import PAGE, Staging
from .uplink_messages import ALIVE, CONSUMED, Part


def _nothing(*_: object) -> None:
    pass


class Stager:
    """Staging cells are used in sequence (``seq``; cell ``seq % cells``). An epoch starts in
    a fresh cell and packs the pages of all its memory slots into it."""

    def __init__(self, staging: Staging, *, max_ahead: int,
                 tell: Callable[[], None] = _nothing,
                 send_parts: Callable[[int, str, list[Part]], None] = _nothing,
                 gone: Callable[[], bool] = lambda: False) -> None:
        self.staging = staging
        #: Checkpoints staged but not yet taken by the uplink beyond which the epoch loop lets
        #: the guest run on instead of checkpointing (queueing more would only add latency).
        self.max_ahead = max_ahead
        self._tell, self._send_parts, self._gone = tell, send_parts, gone
        self.seq = 0
        self._fill = 0  # pages used in staging cell ``seq``
        self._epoch = 0  # the epoch ``seq`` is being filled for
        self._parts: list[Part] = []  # staged since the last ``take_parts``
        #: Bytes used in recent staging cells: first seq -> (cells from it, bytes in each).
        self._used: dict[int, tuple[int, int]] = {}

    @property
    def staging_bytes(self) -> int:
        """Bytes staged and not yet taken by the uplink."""
        done = int(self.staging.header[CONSUMED])
        return sum(b * (first + n - max(first, done))
                   for first, (n, b) in self._used.items() if first + n > done)

    def _note_used(self, first: int, n: int, nbytes: int) -> None:
        self._used[first] = (n, nbytes)
        if len(self._used) > 2 * self.staging.cells:  # forget what the uplink released
            done = int(self.staging.header[CONSUMED])
            self._used = {f: u for f, u in self._used.items() if f + u[0] > done}

    def take_parts(self) -> list[Part]:
        """The parts ``stage`` copied since the last call (an epoch's, at its end)."""
        parts, self._parts = self._parts, []
        return parts

    def _free_cell(self, stop: Callable[[], bool]) -> bool:
        """Wait until the cell for ``self.seq`` is free; False if ``stop()`` says give up.
        Only called for a fresh cell, when every staged part has been announced already
        (``stage`` sends a cell's parts when it fills, ``end`` the rest): the uplink can free
        only cells it has been told about."""
        hdr = self.staging.header
        if self.seq - int(hdr[CONSUMED]) < self.staging.cells:
            return True
        self._tell()
        while self.seq - int(hdr[CONSUMED]) >= self.staging.cells:
            if stop() or self._gone():
                return False
            hdr[ALIVE] += 1  # waiting on the standby is not being stalled
            time.sleep(50e-6)
        return True

    def stage(self, epoch: int, kind: str, slot: int, view: np.ndarray, pages: np.ndarray,
              stop: Callable[[], bool]) -> int:
        """Copy ``pages`` of guest memory slot ``slot`` (``view``: its pages as rows) into
        staging. Returns how many were staged (fewer only if ``stop()`` gave up waiting).

        An epoch starts in a fresh staging cell and packs the pages of all its memory slots
        into it (a ``Part`` is (cell seq, offset, memory slot, pages, -1)); the uplink releases
        a cell only when the epoch that filled it is done with it."""
        cap = self.staging.cell_pages
        if epoch != self._epoch:
            self._epoch = epoch
            if self._fill:
                self.seq, self._fill = self.seq + 1, 0
        done, i, n = 0, 0, len(pages)
        while i < n:
            if self._fill == cap:
                # A full staging cell goes to the uplink at once: a big epoch (the initial
                # sync, a resync) streams out while the rest is still being gathered.
                parts, self._parts = self._parts, []
                self._send_parts(epoch, kind, parts)
                self.seq, self._fill = self.seq + 1, 0
            if not self._fill and not self._free_cell(stop):
                return done
            off = self._fill
            k = min(cap - off, n - i)
            chunk = pages[i:i + k]
            self.staging.indices(self.seq)[off:off + k] = chunk
            # Non-temporal stores: the uplink reads these pages on the other core.
            gather_pages(self.staging.data(self.seq)[off:off + k], view, chunk)
            self._parts.append(Part(self.seq, off, slot, k, -1))
            self._note_used(self.seq, 1, (off + k) * PAGE)
            self._fill += k
            i += k
            done += k
        return done

    def claim_many(self, epoch: int, n: int, pages: int) -> int:
        """Take the next ``n`` staging cells, one each for epochs ``epoch`` .. ``epoch + n - 1``
        that a steady batch has already filled with ``pages`` pages each (in the cells
        ``free_ahead`` named, laid out as ``epoch_parts``). Returns the first one's sequence
        number. All at once: the steady batch's bookkeeping runs right after the guest did,
        when every call is slow. Raises RuntimeError if a cell is not free."""
        if epoch != self._epoch:
            self._epoch = epoch
            if self._fill:
                self.seq, self._fill = self.seq + 1, 0
        st = self.staging
        if (n <= 0 or self._fill or self._parts or pages > st.cell_pages
                or self.seq + n - 1 - int(st.header[CONSUMED]) >= st.cells):
            raise RuntimeError("staging moved under the steady batch")
        first = self.seq
        self._note_used(first, n, pages * PAGE)
        self._epoch = epoch + n - 1
        self.seq += n - 1
        self._fill = pages
        return first

    def free_ahead(self, most: int) -> list[int]:
        """The staging cells the next epochs' ``claim_many`` will give, as many as are free
        now (at most ``most``, within ``max_ahead``): the steady batch fills them first and
        claims them after, for the epochs it completed."""
        if self._gone():
            return []
        first = self.seq + (1 if self._fill else 0)
        n = min(most, self.max_ahead - (first - int(self.staging.header[CONSUMED])))
        return [(first + i) % self.staging.cells for i in range(max(n, 0))]

    def addresses(self, k: int) -> tuple[int, int]:
        """Where staging cell ``k``'s pages and their indices (int64) start."""
        return self.staging.addresses(k)

    def has_room(self) -> bool:
        """May the next epoch be checkpointed now (else the guest had better run on)?"""
        used = self.seq + (1 if self._fill else 0) - int(self.staging.header[CONSUMED])
        if used < self.max_ahead:
            return not self._gone()
        self._tell()  # the uplink can only free what it has been told about
        return False

    def abandon(self) -> None:
        """Forget pages staged for an epoch that will not be ended (the run is stopping)."""
        if self._parts:
            self.seq, self._fill = self._parts[0][0], self._parts[0][1]
            self._parts = []
