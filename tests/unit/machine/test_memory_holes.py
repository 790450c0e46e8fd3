"""Guest memory knows which pages hold data (memfd SEEK_DATA) and can be zeroed by punching
holes: full-copy epochs send only populated pages, and a standby discards before applying one."""
from __future__ import annotations

import numpy as np

from dirtyring.machine.memory import PAGE, GuestMemory, plan_slots


def test_populated_pages_are_exactly_the_written_ones_and_discard_zeroes_them() -> None:
    mem = GuestMemory(plan_slots([1 << 20]))
    try:
        assert all(len(s.populated_pages()) == 0 for s in mem.slots)
        data = mem.slots[1].view
        for page, byte in ((5, 1), (9, 3), (255, 7)):
            data[page * PAGE + 17] = byte
        data[6 * PAGE] = 0  # a write of zero still populates the page
        assert mem.slots[1].populated_pages().tolist() == [5, 6, 9, 255]
        ds = mem.populated()
        assert len(ds) == 4 and [s for s, _ in ds.items()] == [1]
        mem.discard()
        assert all(len(s.populated_pages()) == 0 for s in mem.slots)
        data[3 * PAGE] = 2  # the mapping still works
        assert mem.slots[1].populated_pages().tolist() == [3]
        assert np.count_nonzero(data) == 1  # the old data reads as zero (reading allocates)
    finally:
        mem.close()
