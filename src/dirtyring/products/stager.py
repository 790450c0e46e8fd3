"""The epoch loop's side of the staging area (``staging.py``): which staging slot each epoch's
pages go to, copying them there, and when a slot may be filled again.

The uplink process reads what is staged and releases slots by advancing the header's CONSUMED
counter; it learns about parts and checkpoints through control messages, which the owner of
this object sends (``tell``: everything ended so far; ``send_parts``: a full slot of a big epoch
ahead of its end). Kept apart from ``Uplink`` (the process and its messages) so the copying
side can be used, and tested, on its own.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np

from ..machine.native import gather_pages
from .staging import ALIVE, CONSUMED, PAGE, Staging

#: (staging seq, offset in that slot, memory slot, pages, words): where an epoch's pages are.
#: ``words`` -1: the pages themselves; else only their 64-bit words that changed since the
#: last checkpoint were staged there (a steady pause's delta gather, see ``native.py``):
#: ``words`` offsets (int64), then, ``pages * DELTA_WORDS`` words from the part's start,
#: their XORs (uint64).
Part = tuple[int, int, int, int, int]


def _nothing(*_: object) -> None:
    pass


class Stager:
    """Staging slots are used in sequence (``seq``; slot ``seq % slots``). An epoch starts in
    a fresh slot and packs the pages of all its memory slots into it."""

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
        self._parts: list[Part] = []  # staged since the last ``take_parts``
        self._used: dict[int, int] = {}  # bytes used per recent staging seq

    @property
    def staging_bytes(self) -> int:
        """Bytes staged and not yet taken by the uplink."""
        done = int(self.staging.header[CONSUMED])
        return sum(b for s, b in self._used.items() if s >= done)

    def take_parts(self) -> list[Part]:
        """The parts ``stage`` copied since the last call (an epoch's, at its end)."""
        parts, self._parts = self._parts, []
        return parts

    def _free_slot(self, stop: Callable[[], bool]) -> bool:
        """Wait until the slot for ``self.seq`` is free; False if ``stop()`` says give up.
        Only called for a fresh slot, when every staged part has been announced already
        (``stage`` sends a slot's parts when it fills, ``end`` the rest): the uplink can free
        only slots it has been told about."""
        hdr = self.staging.header
        if self.seq - int(hdr[CONSUMED]) < self.staging.slots:
            return True
        self._tell()
        while self.seq - int(hdr[CONSUMED]) >= self.staging.slots:
            if stop() or self._gone():
                return False
            hdr[ALIVE] += 1  # waiting on the standby is not being stalled
            time.sleep(50e-6)
        return True

    def stage(self, epoch: int, kind: str, slot: int, view: np.ndarray, pages: np.ndarray,
              stop: Callable[[], bool]) -> int:
        """Copy ``pages`` of guest memory slot ``slot`` (``view``: its pages as rows) into
        staging. Returns how many were staged (fewer only if ``stop()`` gave up waiting).

        An epoch starts in a fresh staging slot and packs the pages of all its memory slots
        into it (a part is (staging seq, offset, memory slot, pages)); the uplink releases a
        staging slot only when the epoch that filled it is done with it."""
        cap = self.staging.slot_pages
        if epoch != self._epoch:
            self._epoch = epoch
            if self._fill:
                self.seq, self._fill = self.seq + 1, 0
        done, i, n = 0, 0, len(pages)
        while i < n:
            if self._fill == cap:
                # A full staging slot goes to the uplink at once: a big epoch (the initial
                # sync, a resync) streams out while the rest is still being gathered.
                parts, self._parts = self._parts, []
                self._send_parts(epoch, kind, parts)
                self.seq, self._fill = self.seq + 1, 0
            if not self._fill and not self._free_slot(stop):
                return done
            off = self._fill
            k = min(cap - off, n - i)
            chunk = pages[i:i + k]
            self.staging.indices(self.seq)[off:off + k] = chunk
            # Non-temporal stores: the uplink reads these pages on the other core.
            gather_pages(self.staging.data(self.seq)[off:off + k], view, chunk)
            self._parts.append((self.seq, off, slot, k, -1))
            self._used[self.seq] = (off + k) * PAGE
            self._used.pop(self.seq - self.staging.slots, None)
            self._fill += k
            i += k
            done += k
        return done

    def claim(self, epoch: int, sizes: list[tuple[int, int]]
              ) -> tuple[int, list[Part]] | None:
        """Take the next staging slot for an epoch the steady batch has already copied into
        (one ``free_ahead`` named): its memory slots' pages one after the other in the order
        of ``sizes`` ((memory slot, pages)), each part's indices in the same places, as
        ``stage`` lays them out. Returns the staging slot and the epoch's parts, which the
        caller hands to ``end``; None, with nothing taken, if that slot is not free."""
        got = self._claim(epoch, 1, sizes, None)
        return None if got is None else (got[0][0][0] % self.staging.slots, got[0])

    def claim_many(self, epoch: int, n: int, sizes: list[tuple[int, int]],
                   words: list[list[int]] | None = None) -> list[list[Part]]:
        """``claim`` for the ``n`` epochs from ``epoch`` on that a steady batch completed: their
        parts, with ``words[i]`` as epoch i's parts' counts of changed words (``Part``; None:
        pages). All at once: the steady batch's bookkeeping runs right after the guest did,
        when every call is slow. Raises RuntimeError if a slot is not free (the batch takes
        only slots ``free_ahead`` gave)."""
        if n <= 0:
            return []
        got = self._claim(epoch, n, sizes, words)
        if got is None:
            raise RuntimeError("staging moved under the steady batch")
        return got

    def _claim(self, epoch: int, n: int, sizes: list[tuple[int, int]],
               words: list[list[int]] | None) -> list[list[Part]] | None:
        """The staging slots of epochs ``epoch`` .. ``epoch + n - 1``, one each, and their
        parts; None, with nothing taken, if one of them is not free."""
        per_epoch = words if words is not None else [[-1] * len(sizes)] * n
        assert len(per_epoch) == n
        if epoch != self._epoch:
            self._epoch = epoch
            if self._fill:
                self.seq, self._fill = self.seq + 1, 0
        st = self.staging
        total = sum(pages for _, pages in sizes)
        if (self._fill or self._parts or total > st.slot_pages
                or self.seq + n - 1 - int(st.header[CONSUMED]) >= st.slots):
            return None
        out = []
        for i, counts in enumerate(per_epoch):
            seq, off, parts = self.seq + i, 0, []
            for (slot, pages), w in zip(sizes, counts):
                parts.append((seq, off, slot, pages, w))
                off += pages
            out.append(parts)
            self._used[seq] = total * PAGE
            self._used.pop(seq - st.slots, None)
        self._epoch = epoch + n - 1
        self.seq += n - 1
        self._fill = total
        return out

    def free_ahead(self, most: int) -> list[int]:
        """The staging slots the next epochs' ``claim`` calls will give, as many as are free
        now (at most ``most``, within ``max_ahead``): the steady batch fills them first and
        claims them after, for the epochs it completed."""
        if self._gone():
            return []
        first = self.seq + (1 if self._fill else 0)
        n = min(most, self.max_ahead - (first - int(self.staging.header[CONSUMED])))
        return [(first + i) % self.staging.slots for i in range(max(n, 0))]

    def addresses(self, k: int) -> tuple[int, int]:
        """Where staging slot ``k``'s pages and their indices (int64) start."""
        return self.staging.addresses(k)

    _epoch = 0
    _fill = 0  # pages used in staging slot ``seq``

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
