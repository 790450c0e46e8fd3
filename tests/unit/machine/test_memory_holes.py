"""Guest memory knows which pages hold data (memfd SEEK_DATA) and can be zeroed by punching
holes: full-copy epochs send only populated pages, and a standby discards before applying one."""
from __future__ import annotations

import os

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


def _vma_of(addr: int) -> dict[str, str]:
    """The /proc/self/smaps fields of the mapping that holds ``addr``."""
    fields: dict[str, str] = {}
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
    return fields


def test_anonymous_backing_finds_every_written_page_and_asks_for_huge_pages() -> None:
    """An untracked machine's data slots are anonymous memory (huge pages where the host has
    THP). populated_pages may then also name the untouched rest of a huge page (zeros), but
    never misses a written one, across pagemap chunks too; discard zeroes; the mapping is kept
    out of child processes and advised for THP."""
    size = 1 << 30  # 262,144 pages: several pagemap chunks
    mem = GuestMemory(plan_slots([size]), backing="anonymous")
    try:
        slot = mem.slots[1]
        assert slot.backing == "anonymous" and mem.slots[0].backing == "memfd"
        assert len(slot.populated_pages()) == 0
        written = [0, 5, 511, 512, 70_000, 200_003, size // PAGE - 1]
        for page in written:
            slot.view[page * PAGE + 100] = 1
        found = set(slot.populated_pages().tolist())
        assert set(written) <= found
        huge = {p // 512 for p in written}
        assert all(p // 512 in huge for p in found)  # nothing outside the touched 2 MiB pieces
        assert {s for s, _ in mem.populated().items()} == {1}
        vma = _vma_of(slot.map.addr)
        assert "dc" in vma["VmFlags"].split()  # MADV_DONTFORK
        thp = "/sys/kernel/mm/transparent_hugepage/enabled"  # absent: no THP in the kernel
        if os.path.exists(thp) and "[never]" not in open(thp).read():
            assert "hg" in vma["VmFlags"].split()  # MADV_HUGEPAGE took
        mem.discard()
        assert len(slot.populated_pages()) == 0
        assert np.count_nonzero(slot.view[:PAGE * 600]) == 0  # reading maps zero pages
    finally:
        mem.close()


def test_unknown_backing_is_a_clear_error() -> None:
    import pytest
    from dirtyring.errors import ConfigError
    with pytest.raises(ConfigError, match="unknown memory backing 'hugetlb'"):
        GuestMemory(plan_slots([1 << 20]), backing="hugetlb")
