"""The dirty-log oracle, in the spirit of the kernel's dirty_log_test, for every tracker.

The dirtier writes the control page's current iteration into pages (random pattern). We collect
at random moments while it runs, and again after pausing it at the end of the iteration; then
we bump the iteration. Any data page that holds this iteration's value but was never reported
during this iteration is a missed dirty page: the failure that matters.
"""
from __future__ import annotations

import random
import time
from collections.abc import Callable

import numpy as np
import pytest

from dirtyring.guests.protocol import GuestParams, Pattern
from dirtyring.machine.epoch import EpochDriver
from dirtyring.tracking import DirtySet

TRACKERS = ["ring", "bitmap", "bitmap-clear", "hotset"]
#: Generous: iterations go on past the minimum only until the test's condition holds.
DEADLINE_S = 60.0


def run_oracle(machine, iterations: int, *, seed: int = 7,
               until: Callable[[int], bool] = lambda checked: True) -> int:
    """At least ``iterations`` oracle iterations, then more until ``until(checked)`` holds
    (the guest has written enough for the test to mean something: a slow or loaded host
    writes fewer pages per iteration). Returns how many written pages were checked."""
    rnd = random.Random(seed)
    drv = EpochDriver(machine)
    slots = [s.info for s in machine.memory.slots[1:]]
    machine.pause_all()
    drv.harvest_paused()
    checked = 0
    it = 1
    deadline = 0.0  # set once the minimum is done: only the extra iterations are bounded
    while it <= iterations or not until(checked):
        if it > iterations:
            deadline = deadline or time.monotonic() + DEADLINE_S
            assert time.monotonic() < deadline, (
                f"condition not met {DEADLINE_S} s after the minimum ({it - 1} iterations, "
                f"{checked} pages checked)")
        it += 1
        machine.set_control("iteration", it)
        collected = DirtySet()
        for _ in range(rnd.randint(1, 3)):  # random reap points while it runs
            e = drv.run_epoch(rnd.choice([0.0002, 0.001, 0.003]))
            assert not e.resync, "tracking asked for a resync"
            collected = collected | e.dirty
        machine.check()
        for info, s in zip(slots, machine.memory.slots[1:]):
            first = s.view.reshape(-1, 4096)[:, :8].copy().view(np.uint64)[:, 0]
            written = np.flatnonzero(first == it)
            missed = np.setdiff1d(written, collected.slot(info.slot))
            assert len(missed) == 0, (f"iteration {it}: {len(missed)} pages of slot {info.slot} "
                                      f"written but never reported: {missed[:10]}")
            checked += len(written)
    return checked


@pytest.mark.parametrize("tracker", TRACKERS)
def test_no_missed_dirty_page(make_machine, tracker: str) -> None:
    m = make_machine(guest="dirtier", tracker=tracker, ring_entries=1024,
                     data_slots=(8 << 20,), params=GuestParams(pattern=Pattern.RANDOM))
    # until the guest really wrote (and the oracle checked) many pages with iteration values
    assert run_oracle(m, 60, until=lambda checked: checked > 1000) > 1000


@pytest.mark.parametrize("tracker", TRACKERS)
def test_slots_not_multiple_of_64_pages(make_machine, tracker: str) -> None:
    # 100 and 37 pages: bitmaps end mid-word, CLEAR ranges end at the slot's end.
    m = make_machine(guest="dirtier", tracker=tracker, ring_entries=1024,
                     data_slots=(100 * 4096, 37 * 4096),
                     params=GuestParams(pattern=Pattern.SEQUENTIAL))
    def both_slots_written(checked: int) -> bool:
        # the sequential pattern covers all 137 pages: run until it reached the second slot
        return all(s.view.reshape(-1, 4096)[:, :8].copy().view(np.uint64)[:, 0].max() > 0
                   for s in m.memory.slots[1:])

    assert run_oracle(m, 30, until=both_slots_written) > 0


@pytest.mark.parametrize("tracker", TRACKERS)
def test_two_vcpus(make_machine, tracker: str) -> None:
    m = make_machine(guest="dirtier", tracker=tracker, vcpus=2, ring_entries=1024,
                     data_slots=(4 << 20,), params=GuestParams(pattern=Pattern.RANDOM))
    def halves() -> list[np.ndarray]:
        """Per vCPU, the (iteration, vcpu index, count) heads of the pages written in its half."""
        head = m.memory.slots[1].view.reshape(-1, 4096)[:, :24].copy().view(np.uint64)
        half = len(head) // 2
        return [part[part[:, 2] != 0] for part in (head[:half], head[half:])]

    # until the oracle checked many pages and each vCPU wrote many of its own
    assert run_oracle(m, 40, until=lambda checked: checked > 500 and all(
        len(w) > 100 for w in halves())) > 500
    # each vCPU wrote only its own half
    for idx, written in enumerate(halves()):
        assert (written[:, 1] == idx).all()
