"""The dirty-log oracle, in the spirit of the kernel's dirty_log_test, for every tracker.

The dirtier writes the control page's current iteration into pages (random pattern). We collect
at random moments while it runs, and again after pausing it at the end of the iteration; then
we bump the iteration. Any data page that holds this iteration's value but was never reported
during this iteration is a missed dirty page: the failure that matters.
"""
from __future__ import annotations

import random

import numpy as np
import pytest

from dirtyring.guests.protocol import GuestParams, Pattern
from dirtyring.machine.epoch import EpochDriver
from dirtyring.tracking import DirtySet

TRACKERS = ["ring", "bitmap", "bitmap-clear", "hotset"]


def run_oracle(machine, iterations: int, *, seed: int = 7) -> int:
    rnd = random.Random(seed)
    drv = EpochDriver(machine)
    slots = [s.info for s in machine.memory.slots[1:]]
    machine.pause_all()
    drv.harvest_paused()
    checked = 0
    for it in range(2, iterations + 2):
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
    checked = run_oracle(m, 60)
    assert checked > 1000  # the guest really wrote pages with the iteration's value


@pytest.mark.parametrize("tracker", TRACKERS)
def test_slots_not_multiple_of_64_pages(make_machine, tracker: str) -> None:
    # 100 and 37 pages: bitmaps end mid-word, CLEAR ranges end at the slot's end.
    m = make_machine(guest="dirtier", tracker=tracker, ring_entries=1024,
                     data_slots=(100 * 4096, 37 * 4096),
                     params=GuestParams(pattern=Pattern.SEQUENTIAL))
    assert run_oracle(m, 30) > 0
    # both slots were written (sequential pattern covers all 137 pages)
    for s in m.memory.slots[1:]:
        assert s.view.reshape(-1, 4096)[:, :8].copy().view(np.uint64)[:, 0].max() > 0


@pytest.mark.parametrize("tracker", TRACKERS)
def test_two_vcpus(make_machine, tracker: str) -> None:
    m = make_machine(guest="dirtier", tracker=tracker, vcpus=2, ring_entries=1024,
                     data_slots=(4 << 20,), params=GuestParams(pattern=Pattern.RANDOM))
    assert run_oracle(m, 40) > 500
    # each vCPU wrote its own half: (iteration, vcpu index, count) at the start of each page
    head = m.memory.slots[1].view.reshape(-1, 4096)[:, :24].copy().view(np.uint64)
    half = len(head) // 2
    for idx, part in ((0, head[:half]), (1, head[half:])):
        written = part[part[:, 2] != 0]
        assert len(written) > 100 and (written[:, 1] == idx).all()
