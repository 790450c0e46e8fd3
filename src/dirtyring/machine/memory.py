"""Guest memory: memslots backed by memfd (sparse: holes cost nothing and SEEK_DATA finds what
holds data), or, for a machine no tracker watches, by anonymous memory that may use huge pages
(``BACKINGS``; why in :func:`dirtyring._bindings.mapping.anonymous`).

Every write the VMM makes into guest memory goes through :meth:`GuestMemory.write` or is
announced with :meth:`GuestMemory.mark_dirty`: KVM never logs such writes, so the trackers merge
this record into each harvest (dirty = KVM log ∪ VMM writes).
"""
from __future__ import annotations

import errno
import hashlib
import mmap
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._bindings import Mapping, memfd
from .._bindings.mapping import anonymous
from ..errors import ConfigError
from ..tracking import DirtySet
from . import layout

PAGE = layout.PAGE
#: How a data slot's host memory is made: "memfd" (every tracked machine: dirty logging keeps
#: KVM on 4 KiB pages anyway) or "anonymous" (huge pages where the host allows them). The system
#: slot is always a memfd: it is small, and its page tables must stay 4 KiB-mapped.
BACKINGS = ("memfd", "anonymous")
#: Pagemap entries read at a time when looking for an anonymous slot's populated pages.
_PAGEMAP_CHUNK = 1 << 16
_PM_PRESENT, _PM_SWAPPED = np.uint64(1 << 63), np.uint64(1 << 62)


@dataclass(frozen=True, slots=True, kw_only=True)
class SlotInfo:
    """One memslot as the machine state records it."""

    slot: int
    gpa: int
    size: int
    name: str

    @property
    def pages(self) -> int:
        return self.size // PAGE


class Slot:
    """A memslot: its memory (memfd, or anonymous with ``fd`` -1), its host mapping, a uint8
    view and the same as page rows."""

    def __init__(self, info: SlotInfo, fd: int | None = None, backing: str = "memfd") -> None:
        if backing not in BACKINGS:
            raise ConfigError(f"unknown memory backing {backing!r}; one of {', '.join(BACKINGS)}")
        self.info = info
        if backing == "anonymous" and fd is None:
            self.fd = -1
            self.map = anonymous(info.size)
        else:
            self.fd = fd if fd is not None else memfd(f"dirtyring-{info.name}", info.size)
            self.map = Mapping(self.fd, info.size, noreserve=True)
        self.view = self.map.array()
        self.rows = self.view.reshape(-1, PAGE)  # (pages, 4096): for page gathers and stores

    @property
    def backing(self) -> str:
        return "memfd" if self.fd >= 0 else "anonymous"

    def populated_pages(self) -> np.ndarray:
        """Pages that hold data. The others read as zero and were never written; reading one
        through the mapping would allocate it. A memfd says which with SEEK_DATA/SEEK_HOLE;
        anonymous memory with /proc/self/pagemap (present or swapped out). With huge pages, all
        512 pages of a 2 MiB page touched once count: a superset, never a page missed."""
        if self.fd < 0:
            return self._pagemap_populated()
        parts, off, size = [], 0, self.info.size
        while off < size:
            try:
                start = os.lseek(self.fd, off, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # no data after off
                    break
                raise
            end = min(os.lseek(self.fd, start, os.SEEK_HOLE), size)
            parts.append(np.arange(start // PAGE, (end + PAGE - 1) // PAGE, dtype=np.int64))
            off = end
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def _pagemap_populated(self) -> np.ndarray:
        first, pages = self.map.addr // PAGE, self.info.pages
        parts = []
        with open("/proc/self/pagemap", "rb", buffering=0) as f:
            for start in range(0, pages, _PAGEMAP_CHUNK):
                n = min(_PAGEMAP_CHUNK, pages - start)
                raw = os.pread(f.fileno(), 8 * n, 8 * (first + start))
                if len(raw) != 8 * n:
                    raise OSError(errno.EIO, "short read of /proc/self/pagemap")
                e = np.frombuffer(raw, np.uint64)
                hit = np.flatnonzero(e & (_PM_PRESENT | _PM_SWAPPED))
                if len(hit):
                    parts.append(hit.astype(np.int64) + start)
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def discard(self) -> None:
        """Make every page a hole again (zero, and its memory freed)."""
        self.map.madvise(mmap.MADV_REMOVE if self.fd >= 0 else mmap.MADV_DONTNEED)

    def close(self) -> None:
        self.map.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def plan_slots(data_sizes: list[int]) -> list[SlotInfo]:
    """Slot 0 is the system slot; data slots follow back to back from layout.DATA_GPA."""
    infos = [SlotInfo(slot=0, gpa=0, size=layout.SYSTEM_SLOT_SIZE, name="system")]
    gpa = layout.DATA_GPA
    for i, size in enumerate(data_sizes, start=1):
        if size <= 0 or size % PAGE:
            raise ConfigError(f"data slot {i} size {size} must be a positive multiple of 4096")
        infos.append(SlotInfo(slot=i, gpa=gpa, size=size, name=f"data{i}"))
        gpa += size
    if gpa - layout.DATA_GPA > layout.MAX_DATA_BYTES:
        raise ConfigError(f"guest data memory above {layout.MAX_DATA_BYTES >> 30} GiB")
    return infos


class GuestMemory:
    """All memslots of one machine and the record of VMM-side writes."""

    def __init__(self, infos: list[SlotInfo], fds: list[int] | None = None,
                 backing: str = "memfd") -> None:
        """``backing`` is for the data slots (``BACKINGS``); the system slot is a memfd."""
        self.slots = [Slot(info, None if fds is None else fds[i],
                           backing if info.slot > 0 else "memfd")
                      for i, info in enumerate(infos)]
        self._vmm_dirty: dict[int, set[int]] = {}
        self._lock = threading.Lock()
        #: Counts every ``mark_dirty``: native code that runs epochs back to back (the steady
        #: batch) watches it and stops at the first epoch a VMM write may belong to.
        self.vmm_writes = np.zeros(1, np.int64)

    @property
    def infos(self) -> list[SlotInfo]:
        return [s.info for s in self.slots]

    @property
    def data_gpa(self) -> int:
        return layout.DATA_GPA

    @property
    def data_bytes(self) -> int:
        return sum(s.info.size for s in self.slots[1:])

    def locate(self, gpa: int) -> tuple[Slot, int]:
        for s in self.slots:
            if s.info.gpa <= gpa < s.info.gpa + s.info.size:
                return s, gpa - s.info.gpa
        raise ConfigError(f"guest address {gpa:#x} is in no memslot")

    def read(self, gpa: int, n: int) -> bytes:
        s, off = self.locate(gpa)
        return s.view[off:off + n].tobytes()

    def read_u64(self, gpa: int) -> int:
        s, off = self.locate(gpa)
        return int(s.view[off:off + 8].view(np.uint64)[0])

    def write(self, gpa: int, data: bytes | np.ndarray) -> None:
        """A VMM write into guest memory; recorded as dirty."""
        s, off = self.locate(gpa)
        b = np.frombuffer(bytes(data), np.uint8) if not isinstance(data, np.ndarray) else data
        s.view[off:off + len(b)] = b
        self.mark_dirty(s.info.slot, off // PAGE, (off + len(b) - 1) // PAGE + 1)

    def write_u64(self, gpa: int, value: int) -> None:
        self.write(gpa, int(value).to_bytes(8, "little"))

    def mark_dirty(self, slot: int, first_page: int, end_page: int | None = None) -> None:
        """Record that the VMM wrote pages [first_page, end_page) of ``slot``."""
        end = first_page + 1 if end_page is None else end_page
        with self._lock:
            self._vmm_dirty.setdefault(slot, set()).update(range(first_page, end))
            self.vmm_writes[0] += 1

    @property
    def vmm_dirty_pending(self) -> bool:
        """Has the VMM written a page since the last ``take_vmm_dirty``?"""
        return bool(self._vmm_dirty)

    def take_vmm_dirty(self) -> list[tuple[int, np.ndarray]]:
        """Drain the record of VMM writes (trackers merge it into each harvest)."""
        with self._lock:
            d, self._vmm_dirty = self._vmm_dirty, {}
        return [(slot, np.fromiter(pages, np.int64, len(pages))) for slot, pages in d.items()]

    def populated(self) -> DirtySet:
        """Every page that holds data, per slot (see :meth:`Slot.populated_pages`)."""
        return DirtySet.from_arrays((s.info.slot, s.populated_pages()) for s in self.slots)

    def discard(self) -> None:
        """Zero all of memory by punching holes: no guest may be running."""
        for s in self.slots:
            s.discard()

    def digest(self) -> bytes:
        """A digest of all guest memory (for tests and verify modes; reads every byte)."""
        return digest_of(s.view.data for s in self.slots)

    def close(self) -> None:
        for s in self.slots:
            s.close()


def digest_of(chunks: Iterable[Any]) -> bytes:
    """``GuestMemory.digest`` of memory whose slots' bytes are ``chunks``, in slot order (a
    copy taken at a checkpoint gives the digest the memory had then)."""
    h = hashlib.blake2b(digest_size=16)
    for c in chunks:
        h.update(c)
    return h.digest()
