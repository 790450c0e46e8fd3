"""The hot set's re-arm period adapts: a steady set is re-armed less and less often (up to a
cap), a set that changes goes back to the base period, and no written page is ever missed.

The VM here models manual-protect dirty logging the way KVM does it: a write to a protected
page faults once and sets its bit; GET copies the bits; CLEAR clears them and protects the
pages again; an unprotected page takes writes without any trace beyond its set bit."""
from __future__ import annotations

from typing import Any

import numpy as np

from dirtyring.tracking import TrackedSlot
from dirtyring.tracking.bitmap import HotSetTracker

PAGES = 256


class FakeVm:
    manual_protect = True

    def __init__(self) -> None:
        self.bits = np.zeros(PAGES, bool)
        self.protected = np.ones(PAGES, bool)
        self.faults = 0
        self.clears = 0

    def write(self, pages: list[int]) -> None:
        for p in pages:
            if self.protected[p]:
                self.faults += 1
                self.protected[p] = False
            self.bits[p] = True

    def get_dirty_log(self, slot: int, bitmap: np.ndarray) -> None:
        bitmap[:] = np.packbits(self.bits, bitorder="little").view(np.uint64)

    def clear_dirty_log(self, slot: int, first: int, num: int, words: np.ndarray) -> None:
        self.clears += 1
        mask = np.unpackbits(words.view(np.uint8), bitorder="little")[:num].astype(bool)
        self.bits[first:first + num] &= ~mask
        self.protected[first:first + num] |= mask

    def __getattr__(self, name: str) -> Any:  # set_user_memory_region etc.: not needed here
        raise AttributeError(name)


def make() -> tuple[FakeVm, HotSetTracker]:
    vm = FakeVm()
    slot = TrackedSlot(slot=1, gpa=0, pages=PAGES, userspace_addr=0)
    tr = HotSetTracker(vm, [slot], lambda: [], hot_epochs=4, max_hot_epochs=32)  # type: ignore[arg-type]
    return vm, tr


def epochs(vm: FakeVm, tr: HotSetTracker, n: int, pages: list[int]) -> None:
    for _ in range(n):
        vm.write(pages)
        got = set(tr.harvest().slot(1).tolist())
        assert set(pages) <= got  # every written page is reported, every epoch


def test_a_steady_hot_set_is_rearmed_less_and_less_often() -> None:
    vm, tr = make()
    hot = list(range(10, 74))
    epochs(vm, tr, 200, hot)
    assert tr.period == 32
    # Re-arms at 4, 8 (then 16, 32, 32, ...): far fewer than one every 4 epochs.
    assert vm.clears <= 2 + 200 // 16
    assert vm.faults <= 64 * (vm.clears + 1)


def test_a_changing_set_goes_back_to_the_base_period_and_misses_nothing() -> None:
    vm, tr = make()
    epochs(vm, tr, 100, list(range(64)))
    assert tr.period == 32
    rng = np.random.default_rng(3)
    for _ in range(200):
        epochs(vm, tr, 1, sorted(set(rng.integers(0, PAGES, 20).tolist())))
    assert tr.period == 4


def test_cold_pages_leave_the_set_within_the_longest_period() -> None:
    vm, tr = make()
    epochs(vm, tr, 100, list(range(64)))
    epochs(vm, tr, 40, [0, 1])  # the rest went cold
    assert set(tr.harvest().slot(1).tolist()) <= {0, 1}


def test_harvests_done_elsewhere_count_toward_the_next_rearm() -> None:
    """The steady batch does several harvests' work in native code and counts them at once
    (``steady_done(n)``): they move the re-arm as ordinary harvests would, and may not go
    past it."""
    vm, tr = make()
    hot = list(range(8))
    epochs(vm, tr, 100, hot)
    while tr.steady() is None:
        epochs(vm, tr, 1, hot)
    left, stats = tr.steady_left(), tr.statistics()
    assert left >= 3
    assert set(tr.steady_done(3).slot(1).tolist()) == set(hot)
    assert tr.steady_left() == left - 3
    assert tr.statistics().harvests == stats.harvests + 3
    with np.testing.assert_raises(AssertionError):
        tr.steady_done(tr.steady_left() + 1)
    tr.steady_done(tr.steady_left())
    assert tr.steady() is None  # the re-arm is due: the next harvest is an ordinary one
    clears = vm.clears
    epochs(vm, tr, 1, hot)
    assert vm.clears == clears + 1
