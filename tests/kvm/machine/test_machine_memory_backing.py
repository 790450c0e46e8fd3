"""A machine no tracker watches runs on anonymous memory (huge pages where the host has THP,
so KVM can map the guest with 2 MiB pages); a tracked one on memfds. Either way the pages
the guest writes are found by ``populated`` and a fingerprint, and its memory survives a
capture and restore into a machine of the other kind."""
from __future__ import annotations

import time

import numpy as np

from dirtyring.guests.protocol import GuestParams, Pattern
from dirtyring.machine.fingerprint import fingerprint

MiB = 1 << 20


def test_backing_follows_tracking_and_guest_writes_are_found(make_machine) -> None:
    params = GuestParams(pattern=Pattern.HOT, hot_pages=64)
    un = make_machine(guest="dirtier", tracker="none", data_slots=(8 * MiB,), params=params)
    tr = make_machine(guest="dirtier", tracker="ring", data_slots=(8 * MiB,), params=params)
    assert [s.backing for s in un.memory.slots] == ["memfd", "anonymous"]
    assert [s.backing for s in tr.memory.slots] == ["memfd", "memfd"]
    time.sleep(0.05)
    for m in (un, tr):
        m.pause_all()
        m.check()
        slot = m.memory.slots[1]
        written = np.flatnonzero(slot.rows.any(axis=1))
        assert len(written) >= 64  # the hot pages (and the guest's own state)
        assert set(written.tolist()) <= set(slot.populated_pages().tolist())
    # Same content in both kinds of memory gives the same fingerprint: copy the untracked
    # machine's data pages into the tracked one's and compare.
    src, dst = un.memory.slots[1], tr.memory.slots[1]
    dst.view[:] = 0
    pages = src.populated_pages()
    dst.rows[pages] = src.rows[pages]
    tr.memory.slots[0].view[:] = un.memory.slots[0].view
    assert fingerprint(tr.memory) == fingerprint(un.memory)
