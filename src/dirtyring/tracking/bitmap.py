"""Dirty-bitmap tracking: KVM_GET_DIRTY_LOG, optionally with manual protect and
KVM_CLEAR_DIRTY_LOG, and the hot-set mode built on manual protect.

Cost model (platform notes): GET copies and we scan the whole per-slot bitmap, so it grows with
slot size; decoding is done only on the non-zero 64-bit words, so it then grows with the number
of dirty words.

Hot set: on these hosts every re-armed page costs a ~2.2 µs write-protect fault on its next
write. For a small working set rewritten every epoch that dominates the epoch. With manual
protect a page we do not CLEAR stays writable and keeps its bit set, so it is (conservatively)
reported dirty in every harvest without faulting. Every ``hot_epochs`` harvests we CLEAR
(re-protect) every page that is set, so pages that went cold drop out of the hot set and the
ones still written fault once and come back. In between, the bitmap usually equals the previous
one: then the previous decode is reused, and a harvest costs one GET per slot and a compare
(~15 µs for a 64-page hot set here, against ~90 µs with per-page ages).

That period adapts: when no page joined the set in the epoch after a re-arm (the working set
did not move), the next re-arm waits twice as long, up to ``max_hot_epochs``; when one did, it
goes back to ``hot_epochs``. A steady hot set then pays for a re-arm (a CLEAR, a decode and one
fault per page) once every 512 epochs instead of every 8. A re-arm costs more than itself: the
epoch after it is too short for the guest to fault every page back in, so the set takes two or
three epochs to settle, and a replication primary checkpoints each of those the ordinary way.
Measured with a 64-page hot set at 150 µs epochs under replication, 4 runs each, interleaved:
a cap of 64 gave 3,103 checkpoints/s with the guest at 40 %, 512 gave 3,624/s at 49 %. Pages
that went cold are kept in the set for longer (at most ``max_hot_epochs`` epochs; replication
stages only their changed words, so an unchanged page costs a compare); nothing is ever missed,
since every page outside the set is write-protected.
"""
from __future__ import annotations

import time
from collections.abc import Iterable

import numpy as np

from .._bindings import VmFd
from .dirtyset import DirtySet
from .tracker import (TrackedSlot, TrackerStats, VmmDirtySource, all_pages,
                      set_dirty_logging)



#: Up to this many non-zero words are decoded with Python integers (peeling the lowest set bit):
#: each numpy call costs a few µs here, more than the whole scalar loop for a small dirty set.
_SCALAR_WORDS = 48
_SCALAR_BITS = 24


def decode_bitmap(words: np.ndarray) -> np.ndarray:
    """Page indices of the set bits in a uint64 bitmap (bit 0 of word 0 = page 0)."""
    if len(words) <= _SCALAR_WORDS:
        pairs = [(i, w) for i, w in enumerate(words.tolist()) if w]
        if sum(w.bit_count() for _, w in pairs) <= _SCALAR_BITS:
            return _peel(pairs)
        nz = np.fromiter((i for i, _ in pairs), np.int64, len(pairs))
    else:
        nz = np.flatnonzero(words)
    if not len(nz):
        return np.zeros(0, np.int64)
    if len(nz) <= _SCALAR_WORDS:
        vals = words[nz].tolist()
        if sum(w.bit_count() for w in vals) <= _SCALAR_BITS:
            return _peel(zip(nz.tolist(), vals))
    bits = np.unpackbits(words[nz].view(np.uint8), bitorder="little").reshape(len(nz), 64)
    r, c = np.nonzero(bits)
    return nz[r].astype(np.int64) * 64 + c


def _peel(pairs: Iterable[tuple[int, int]]) -> np.ndarray:
    out: list[int] = []
    for i, w in pairs:
        base = i * 64
        while w:
            low = w & -w
            out.append(base + low.bit_length() - 1)
            w ^= low
    return np.fromiter(out, np.int64, len(out))


def encode_bitmap(pages: np.ndarray, nbits: int) -> np.ndarray:
    """The inverse of decode_bitmap, for KVM_CLEAR_DIRTY_LOG."""
    words = np.zeros((nbits + 63) // 64, np.uint64)
    if len(pages):
        np.bitwise_or.at(words, pages // 64, np.left_shift(np.uint64(1),
                                                          (pages % 64).astype(np.uint64)))
    return words


def _dirtyset(parts: list[tuple[int, np.ndarray]],
              vmm: list[tuple[int, np.ndarray]]) -> DirtySet:
    """Decoded bitmaps are sorted and unique already: only VMM writes need a merge."""
    out = {slot: pages for slot, pages in parts if len(pages)}
    for a in out.values():
        if a.flags.writeable:
            a.setflags(write=False)
    ds = DirtySet(out)
    return ds | DirtySet.from_arrays(vmm) if vmm else ds


class BitmapTracker:
    """KVM_GET_DIRTY_LOG per slot. With ``manual`` (bitmap-clear), GET no longer re-arms and we
    re-arm exactly the reported pages with KVM_CLEAR_DIRTY_LOG before returning them.

    Example::

        m = dirtyring.Machine(dirtyring.MachineConfig(tracker="bitmap-clear"))
        assert isinstance(m.tracker, dirtyring.BitmapTracker) and m.tracker.manual
    """

    def __init__(self, vm: VmFd, slots: list[TrackedSlot], vmm_dirty: VmmDirtySource, *,
                 manual: bool = False) -> None:
        if manual and not vm.manual_protect:
            raise ValueError("bitmap-clear needs manual dirty-log protect enabled on the VM")
        self.vm = vm
        self.slots = slots
        self.vmm_dirty = vmm_dirty
        self.manual = manual
        self.kind = "bitmap-clear" if manual else "bitmap"
        self._bitmaps = {s.slot: np.zeros((s.pages + 63) // 64, np.uint64) for s in slots}
        self._harvests = self._pages = self._resets = self._resyncs = 0
        self._last_us = 0.0

    def start(self) -> None:
        set_dirty_logging(self.vm, self.slots, True)

    def stop(self) -> None:
        set_dirty_logging(self.vm, self.slots, False)

    def _get(self, s: TrackedSlot) -> np.ndarray:
        bm = self._bitmaps[s.slot]
        self.vm.get_dirty_log(s.slot, bm)
        return bm

    def _clear(self, s: TrackedSlot, pages: np.ndarray, bm: np.ndarray | None = None) -> None:
        """Re-arm ``pages`` of slot ``s`` with one CLEAR over the 64-aligned span they cover."""
        if not len(pages):
            return
        first = int(pages[0]) // 64 * 64
        last = int(pages[-1])
        num = min(s.pages, (last // 64 + 1) * 64) - first
        words = encode_bitmap(pages - first, num)
        self.vm.clear_dirty_log(s.slot, first, num, words)
        self._resets += 1

    def harvest(self) -> DirtySet:
        t0 = time.perf_counter()
        parts = []
        for s in self.slots:
            pages = decode_bitmap(self._get(s))
            if self.manual:
                self._clear(s, pages)
            parts.append((s.slot, pages))
        ds = _dirtyset(parts, self.vmm_dirty())
        self._harvests += 1
        self._pages += len(ds)
        self._last_us = (time.perf_counter() - t0) * 1e6
        return ds

    def full(self) -> DirtySet:
        for s in self.slots:
            self._get(s)
            if self.manual:
                self.vm.clear_dirty_log(s.slot, 0, s.pages, np.full(
                    (s.pages + 63) // 64, np.uint64(0xFFFFFFFFFFFFFFFF)))
        self.vmm_dirty()
        self._resyncs += 1
        return all_pages(self.slots)

    def statistics(self) -> TrackerStats:
        return TrackerStats(kind=self.kind, harvests=self._harvests, pages_reported=self._pages,
                            resets=self._resets, reset_shortfall=0, overflows=0,
                            resyncs=self._resyncs, hot_pages=0, last_harvest_us=self._last_us)


class HotSetTracker(BitmapTracker):
    """Manual-protect bitmap that leaves recently dirtied pages writable (see module docstring).

    Example::

        m = dirtyring.Machine(dirtyring.MachineConfig(tracker="hotset", hot_epochs=8),
                              threaded=False)
        assert isinstance(m.tracker, dirtyring.HotSetTracker)
    """

    def __init__(self, vm: VmFd, slots: list[TrackedSlot], vmm_dirty: VmmDirtySource, *,
                 hot_epochs: int = 8, max_hot_epochs: int = 512) -> None:
        super().__init__(vm, slots, vmm_dirty, manual=True)
        self.kind = "hotset"
        self.hot_epochs = hot_epochs
        self.max_hot_epochs = max(hot_epochs, max_hot_epochs)
        self.period = hot_epochs  # harvests from one re-arm to the next (adapts)
        self._cycle = 0
        self._next_rearm = hot_epochs
        # The set re-armed at the last re-arm, until the next harvest shows what came back.
        self._rearmed: dict[int, np.ndarray] | None = None
        # Per slot: the last bitmap (as bytes) and its decoded pages, while it stays the same.
        self._last: dict[int, tuple[bytes, np.ndarray]] = {}
        self._hot_pages = 0
        # The last harvest's set while no slot's bitmap changed and the VMM wrote nothing: a
        # steady hot set is then the same DirtySet object every epoch.
        self._same: DirtySet | None = None

    def harvest(self) -> DirtySet:
        t0 = time.perf_counter()
        parts = []
        self._cycle += 1
        rearm = self._cycle >= self._next_rearm
        hot = 0
        same = not rearm
        for s in self.slots:
            bm = self._get(s)  # hot pages stay set: reported every epoch
            raw = bm.tobytes()
            last = self._last.get(s.slot)
            if last is not None and last[0] == raw:
                pages = last[1]
            else:
                same = False
                pages = decode_bitmap(bm)
                pages.setflags(write=False)
                self._last[s.slot] = (raw, pages)
            if rearm and len(pages):
                self._clear(s, pages)  # before the caller copies them: no write is missed
                self._last.pop(s.slot, None)
            else:
                hot += len(pages)
            parts.append((s.slot, pages))
        self._hot_pages = hot
        if rearm:
            self._rearmed = {slot: pages for slot, pages in parts if len(pages)}
            self._next_rearm = self._cycle + self.period
        elif self._rearmed is not None:
            self._adapt(parts)
        vmm = self.vmm_dirty()
        ds = self._same if same and not vmm else None
        if ds is None:
            ds = _dirtyset(parts, vmm)
            self._same = None if vmm or rearm else ds
            self._same_len = len(ds)
        self._harvests += 1
        self._pages += self._same_len
        self._last_us = (time.perf_counter() - t0) * 1e6
        return ds

    _same_len = 0

    def steady(self) -> tuple[DirtySet, list[tuple[int, np.ndarray, bytes]]] | None:
        """What the next harvest returns if no slot's log changed and the VMM wrote nothing:
        that set and, per slot, (slot, the bitmap its GET fills, the bytes it must then equal).
        None when the next harvest must run as usual (a re-arm is due, nothing is cached). A
        caller that did those GETs and found every one equal calls ``steady_done()`` instead
        of ``harvest()``: the steady checkpoint pause does this in one native call."""
        if self._same is None or self._rearmed is not None or self._cycle + 1 >= self._next_rearm:
            return None
        logs = []
        for s in self.slots:
            last = self._last.get(s.slot)
            if last is None:
                return None
            logs.append((s.slot, self._bitmaps[s.slot], last[0]))
        return self._same, logs

    def steady_left(self) -> int:
        """How many harvests ``steady()`` may stand for in a row before a re-arm is due."""
        return max(0, self._next_rearm - self._cycle - 1)

    def steady_done(self, n: int = 1) -> DirtySet:
        """Count ``n`` harvests ``steady()`` described and the caller performed; their set."""
        assert self._same is not None and n <= self.steady_left()
        self._cycle += n
        self._harvests += n
        self._pages += n * self._same_len
        return self._same

    def _adapt(self, parts: list[tuple[int, np.ndarray]]) -> None:
        """The harvest after a re-arm: if no page joined the set, it is re-armed less often.

        Pages that did not come back already left the set at the re-arm (they may just not
        have been written yet in this one epoch: the first writes fault). Pages that joined
        mean the working set moves, and then cold pages should leave it sooner."""
        before, self._rearmed = self._rearmed or {}, None
        steady = all(slot in before and bool(np.isin(pages, before[slot]).all())
                     for slot, pages in parts if len(pages))
        self.period = min(2 * self.period, self.max_hot_epochs) if steady else self.hot_epochs
        self._next_rearm = self._cycle - 1 + self.period

    def full(self) -> DirtySet:
        self._last.clear()
        self._rearmed = None
        self.period = self.hot_epochs
        self._next_rearm = self._cycle + self.period
        self._same = None
        self._hot_pages = 0
        return super().full()

    def statistics(self) -> TrackerStats:
        st = super().statistics()
        return TrackerStats(kind=self.kind, harvests=st.harvests, pages_reported=st.pages_reported,
                            resets=st.resets, reset_shortfall=0, overflows=0,
                            resyncs=st.resyncs, hot_pages=self._hot_pages,
                            last_harvest_us=st.last_harvest_us)
