"""The dirtier guest: each write stamps (iteration, vCPU index, write count) into the first 24 bytes
of a page, following its pattern; max_writes and the stop field finish it; rate_pps paces it."""
from __future__ import annotations

import itertools
import time
from typing import Any

import numpy as np
import pytest

from dirtyring.guests.protocol import GuestParams, Pattern, splitmix64
from dirtyring.machine import layout
from dirtyring.machine.config import MachineConfig
from dirtyring.machine.epoch import EpochDriver
from dirtyring.machine.vm import Machine

MiB = 1 << 20
PAGES = 256  # a 1 MiB data slot
M64 = (1 << 64) - 1


def boot(machines: list[Machine], cfg: MachineConfig) -> Machine:
    m = Machine(cfg)  # the guest starts running at once
    machines.append(m)
    return m


def dirtier(vcpus: int = 1, tracker: str = "none", data: int = MiB, **params: Any) -> MachineConfig:
    params.setdefault("pattern", Pattern.SEQUENTIAL)
    return MachineConfig(guest="dirtier", tracker=tracker, vcpus=vcpus, data_slots=(data,),
                         params=GuestParams(**params))


def stamps(m: Machine) -> np.ndarray:
    """(iteration, vcpu, count) of every data page, shape (pages, 3)."""
    assert m.memory is not None
    v = m.memory.slots[1].view.reshape(-1, layout.PAGE)
    return np.ascontiguousarray(v[:, :24]).view(np.uint64).reshape(-1, 3)


def assert_finished_ok(m: Machine, timeout: float = 30.0) -> None:
    assert m.wait_stopped(timeout), "guest did not finish"
    assert m.crashed is None, m.crashed
    assert m.finished
    for r in m.runners:
        assert r.finished and r.exit_code == 0, (r.index, r.exit_code)


def last_counts(order: list[int], total: int, pages: int) -> np.ndarray:
    """Count stamped last into each page after ``total`` writes visiting ``order`` cyclically."""
    out = np.zeros(pages, np.uint64)
    for c in range(1, total + 1):
        out[order[(c - 1) % len(order)]] = c
    return out


# --- patterns -------------------------------------------------------------------------------------
def test_sequential_writes_stamp_pages_then_max_writes_finishes(machines: list[Machine]) -> None:
    m = boot(machines, dirtier(max_writes=200))
    assert_finished_ok(m)
    s = stamps(m)
    k = np.arange(200, dtype=np.uint64)
    assert (s[:200, 0] == 1).all()          # iteration 1, set by the machine at boot
    assert (s[:200, 1] == 0).all()          # vCPU 0
    assert (s[:200, 2] == k + 1).all()      # write count
    assert not s[200:].any()
    assert m.status(0, "progress") == 200
    assert m.status(0, "passes") == 0
    # Nothing beyond the first 24 bytes of a page is touched.
    assert m.memory is not None
    assert not m.memory.slots[1].view.reshape(-1, layout.PAGE)[:, 24:].any()


def test_two_vcpus_write_their_own_half(machines: list[Machine]) -> None:
    n = 300  # wraps: passes == 2 over a 128-page share
    m = boot(machines, dirtier(vcpus=2, max_writes=n))
    assert_finished_ok(m)
    s = stamps(m)
    share = PAGES // 2
    for v in (0, 1):
        part = s[v * share:(v + 1) * share]
        assert (part[:, 0] == 1).all() and (part[:, 1] == v).all()
        assert (part[:, 2] == last_counts(list(range(share)), n, share)).all()
        assert m.status(v, "progress") == n
        assert m.status(v, "passes") == 2


def test_sequential_stride_visits_every_page_when_coprime(machines: list[Machine]) -> None:
    m = boot(machines, dirtier(stride=3, max_writes=PAGES))
    assert_finished_ok(m)
    order = [(p * 3) % PAGES for p in range(PAGES)]
    assert sorted(order) == list(range(PAGES))
    assert (stamps(m)[:, 2] == last_counts(order, PAGES, PAGES)).all()
    assert m.status(0, "passes") == 1


def test_hot_set_pattern(machines: list[Machine]) -> None:
    n = 50
    m = boot(machines, dirtier(pattern=Pattern.HOT, hot_pages=8, stride=3, max_writes=n))
    assert_finished_ok(m)
    order = [p * 3 for p in range(8)]
    s = stamps(m)
    assert (s[:, 2] == last_counts(order, n, PAGES)).all()
    assert set(np.flatnonzero(s[:, 2])) == set(order)
    assert m.status(0, "passes") == n // 8


def test_random_pattern_is_the_guests_xorshift(machines: list[Machine]) -> None:
    n, seed = 1000, 77
    m = boot(machines, dirtier(pattern=Pattern.RANDOM, seed=seed, max_writes=n))
    assert_finished_ok(m)
    rng = splitmix64(seed + 0 + 1) | 1
    order = []
    for _ in range(n):
        rng ^= (rng << 13) & M64
        rng ^= rng >> 7
        rng ^= (rng << 17) & M64
        order.append(rng % PAGES)
    s = stamps(m)
    assert (s[:, 2] == last_counts(order, n, PAGES)).all()
    written = s[:, 2] != 0
    assert (s[written, 0] == 1).all() and (s[written, 1] == 0).all()
    assert int(s[:, 2].max()) == n


# --- control fields -------------------------------------------------------------------------------
def test_iteration_bump_and_stop(machines: list[Machine]) -> None:
    m = boot(machines, dirtier())
    deadline = time.monotonic() + 30
    while m.status(0, "passes") < 1 and time.monotonic() < deadline:
        time.sleep(0.002)
    m.pause_all()
    assert m.crashed is None and not m.finished
    assert (stamps(m)[:, 0] == 1).all()  # a full pass: every page has been written
    m.set_control("iteration", 7)
    passes = m.status(0, "passes")
    m.resume_all()
    deadline = time.monotonic() + 30
    while m.status(0, "passes") < passes + 2 and time.monotonic() < deadline:
        time.sleep(0.002)
    m.stop_guest()
    assert_finished_ok(m)
    total = m.status(0, "progress")
    s = stamps(m)
    assert (s[:, 0] == 7).all()
    assert (s[:, 1] == 0).all()
    assert (s[:, 2] == _closed_form_counts(total)).all()
    assert m.get_control("stop") == 1


def _closed_form_counts(total: int) -> np.ndarray:
    """last_counts for the sequential order without looping over every write."""
    k = np.arange(PAGES, dtype=np.int64)
    last_page = (total - 1) % PAGES
    c = total - ((last_page - k) % PAGES)
    return np.where(c > 0, c, 0).astype(np.uint64)


def test_closed_form_counts_helper() -> None:
    for total in (1, 255, 256, 257, 1000):
        assert (_closed_form_counts(total) == last_counts(list(range(PAGES)), total, PAGES)).all()


@pytest.mark.parametrize("vcpus", [1, 2])
def test_stop_field_finishes_every_vcpu(machines: list[Machine], vcpus: int) -> None:
    """The guest runs without end until the stop field is set; then every vCPU finishes.
    We wait for every vCPU to have written (not a fixed sleep), so "it ran, then the stop
    ended it" holds on any host."""
    m = boot(machines, dirtier(vcpus=vcpus))
    deadline = time.monotonic() + 30
    while (min(m.status(v, "progress") for v in range(vcpus)) == 0
           and time.monotonic() < deadline and not m.finished and m.crashed is None):
        time.sleep(0.002)
    assert m.crashed is None, m.crashed
    assert not m.finished  # running with no max_writes: only the stop field ends it
    assert all(m.status(v, "progress") > 0 for v in range(vcpus)), \
        [m.status(v, "progress") for v in range(vcpus)]
    m.stop_guest()
    assert_finished_ok(m)  # every vCPU reported "done" with exit code 0


def test_exit_every_ticks(machines: list[Machine]) -> None:
    # Paced (0.25 s for all 500 writes) so the hook is in place long before most ticks.
    m = boot(machines, dirtier(exit_every=50, max_writes=500, rate_pps=2000))
    seen: list[int] = []
    m.control.on_tick = lambda r: seen.append(r.index)
    assert_finished_ok(m)
    assert m.control.ticks == 10
    assert 1 <= len(seen) <= 10 and set(seen) == {0}  # hook set after the start
    assert m.status(0, "progress") == 500


def test_share_of_zero_pages_exits_with_code_1(machines: list[Machine]) -> None:
    """Two vCPUs and one data page: each share is 0 pages, so the guest refuses with code 1."""
    m = boot(machines, dirtier(vcpus=2, data=4096))
    assert m.wait_stopped(30.0)
    assert m.crashed is None, m.crashed
    assert m.finished
    assert [r.exit_code for r in m.runners] == [1, 1]
    assert not stamps(m).any()


def test_rate_limit_paces_the_writes(machines: list[Machine]) -> None:
    """Behaviour, not a benchmark: far below the ~80 M writes/s it does unlimited."""
    rate = 2000
    t0 = time.monotonic()
    m = boot(machines, dirtier(rate_pps=rate))
    time.sleep(0.25)  # the window measured (not a synchronisation): the bound below is per second
    deadline = time.monotonic() + 30  # a host too loaded to run it in the window: wait for a write
    while m.status(0, "progress") == 0 and time.monotonic() < deadline and m.crashed is None:
        time.sleep(0.002)
    m.pause_all()
    elapsed = time.monotonic() - t0
    done = m.status(0, "progress")
    assert m.crashed is None
    assert 0 < done <= 3 * rate * elapsed + 10, (done, elapsed)


def test_epoch_dirty_sets_cover_every_stamped_page(machines: list[Machine]) -> None:
    """End to end with the ring tracker: a shadow copy updated only from each epoch's dirty set
    stays equal to guest memory."""
    m = boot(machines, dirtier(tracker="ring", pattern=Pattern.RANDOM, rate_pps=20_000))
    assert m.memory is not None
    driver = EpochDriver(m)
    data = m.memory.slots[1].view
    shadow = np.zeros_like(data)
    pages_seen: set[int] = set()
    deadline = time.monotonic() + 60  # drive until 32 pages were seen, however slow the host
    for n in itertools.count():
        if n >= 20 and (len(pages_seen) >= 32 or time.monotonic() > deadline):
            break
        e = driver.run_epoch(0.004)
        assert not e.resync
        dirty = e.dirty.slot(1)
        pages_seen.update(int(p) for p in dirty)
        for p in dirty:
            off = int(p) * layout.PAGE
            shadow[off:off + layout.PAGE] = data[off:off + layout.PAGE]
        assert np.array_equal(shadow, data), "a stamped page was not reported dirty"
    m.check()
    assert 32 <= len(pages_seen) <= PAGES
    assert m.status(0, "progress") > 0
