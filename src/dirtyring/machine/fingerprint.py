"""Memory fingerprints: blake2b-128 over the blake2b-64 of every page, slot by slot, in order.

Unlike one hash over all memory, a fingerprint can be kept up to date from captured pages
alone, so a snapshot writer never rereads memory it did not capture and a restore checks it
from the pages it applied; rollback uses it to check a rolled-back guest against its root.
Only a slot's populated pages are read (``Slot.populated_pages``): holes read as zero, and
touching them would allocate them.
"""
from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from ..machine.memory import GuestMemory
from ..tracking import DirtySet

PAGE = 4096


def _h64(b: Any) -> bytes:
    return hashlib.blake2b(b, digest_size=8).digest()


ZERO_PAGE = np.frombuffer(_h64(bytes(PAGE)), np.uint64)[0]


def page_hashes(data: bytes | memoryview | np.ndarray, n: int) -> np.ndarray:
    """The blake2b-64 of each of the ``n`` pages in ``data`` (page i at i*4096), as uint64.
    Zero pages are found with one vectorised pass and not hashed."""
    mv = (np.ascontiguousarray(data).data if isinstance(data, np.ndarray)
          else memoryview(data)).cast("B")
    out = np.full(n, ZERO_PAGE, np.uint64)
    nz = np.flatnonzero(np.frombuffer(mv, np.uint64).reshape(n, PAGE // 8).any(axis=1))
    if len(nz):
        out[nz] = np.frombuffer(b"".join([_h64(mv[i * PAGE:(i + 1) * PAGE])
                                          for i in nz.tolist()]), np.uint64)
    return out


class Fingerprint:
    """Per-page hashes of guest memory; a page never set hashes as a zero page."""

    def __init__(self, memory: GuestMemory) -> None:
        self.hashes = [np.full(s.info.pages, ZERO_PAGE, np.uint64) for s in memory.slots]

    def update(self, slot: int, pages: np.ndarray, data: bytes | memoryview | np.ndarray) -> None:
        self.hashes[slot][pages] = page_hashes(data, len(pages))

    def digest(self) -> bytes:
        h = hashlib.blake2b(digest_size=16)
        for a in self.hashes:
            h.update(a.tobytes())
        return h.digest()


def fingerprint(memory: GuestMemory) -> bytes:
    """The fingerprint of live guest memory (pause the guest first); reads populated pages only.

    Example::

        m.pause_all()
        before = dirtyring.fingerprint(m.memory)
        m2 = dirtyring.restore(snapshot_path)
        assert dirtyring.fingerprint(m2.memory) == before
    """
    fp = Fingerprint(memory)
    for s in memory.slots:
        slot, view = s.info.slot, s.rows
        for a, n in DirtySet({slot: s.populated_pages()}).ranges(slot):
            fp.update(slot, np.arange(a, a + n), view[a:a + n])
    return fp.digest()
