"""Migration's convergence decisions and ring pacing (pure logic, no KVM)."""
from __future__ import annotations

import pytest

from dirtyring.errors import ConfigError
from dirtyring.migration.policy import Boundary, Convergence, RingPacer
from dirtyring.migration.types import PAGE, MigrationOptions

BW = 1e9  # bytes/s: 244,140 pages/s
PPS = BW / PAGE


def _b(pending: int, dirty_pps: float, *, armed: bool = True, left: float = 20.0,
       rnd: int = 1, fixed: float = 0.002) -> Boundary:
    return Boundary(round=rnd, pending_pages=pending, bandwidth=BW, fixed_s=fixed,
                    dirty_pps=dirty_pps, armed=armed, seconds_left=left)


def test_stops_once_the_remaining_pages_fit_the_aim() -> None:
    c = Convergence(MigrationOptions(downtime_limit=0.3, settle_aim=0.1), ring=True)
    d = c.decide(_b(pending=int(0.02 * PPS), dirty_pps=1e6))
    assert d.stop == "converged" and d.expected_s == pytest.approx(0.022, rel=0.01)
    assert not d.throttle_changed and c.ring_pps == 0


def test_after_the_bulk_round_it_goes_on_without_throttling() -> None:
    """The bulk round tracks nothing, so its figures say nothing about the dirty rate."""
    c = Convergence(MigrationOptions(), ring=True)
    d = c.decide(_b(pending=131072, dirty_pps=1e6, armed=False, rnd=0))
    assert d.stop == "" and not d.throttle_changed and not c.throttled


def test_a_migration_that_halves_by_itself_is_not_throttled() -> None:
    c = Convergence(MigrationOptions(), ring=True)
    # 0.3 s of pages; the guest dirties a third of the link's rate: the next set is a third.
    d = c.decide(_b(pending=int(0.3 * PPS), dirty_pps=PPS / 3))
    assert d.stop == "" and not d.throttle_changed and not c.throttled
    assert d.predicted_s < 0.5 * d.expected_s


def test_rounds_that_stop_halving_throttle_the_next_round_onto_the_aim() -> None:
    opt = MigrationOptions(downtime_limit=0.3, settle_aim=0.1)
    c = Convergence(opt, ring=True)
    b = _b(pending=int(0.2 * PPS), dirty_pps=0.8 * PPS)
    d = c.decide(b)
    assert d.stop == "" and d.throttle_changed and c.throttled
    # At the new target, one more round (sending 0.2 s) leaves what the aim can carry.
    left = d.ring_pps * 0.2 * PAGE / BW + b.fixed_s
    assert left == pytest.approx(0.03, rel=0.02)
    assert d.ring_pps < b.dirty_pps


def test_a_throttle_that_did_not_get_there_at_least_halves() -> None:
    c = Convergence(MigrationOptions(), ring=True)
    first = c.decide(_b(pending=int(0.2 * PPS), dirty_pps=0.8 * PPS)).ring_pps
    # The next round still dirtied as much as the set (the guest was not slowed enough).
    second = c.decide(_b(pending=int(0.2 * PPS), dirty_pps=PPS)).ring_pps
    assert second <= 0.5 * first


def test_the_bitmap_throttle_is_a_duty_cycle_relative_to_the_unthrottled_rate() -> None:
    c = Convergence(MigrationOptions(downtime_limit=0.3, settle_aim=0.1), ring=False)
    d = c.decide(_b(pending=int(0.2 * PPS), dirty_pps=0.8 * PPS))
    assert d.throttle_changed and 0.01 <= d.duty < 1.0 and d.ring_pps == 0
    # At that duty the guest dirties duty x its free rate: one more round reaches the aim.
    assert d.duty * 0.8 * PPS * 0.2 * PAGE / BW + 0.002 == pytest.approx(0.03, rel=0.02)
    duty = d.duty
    # Measured under the duty, the guest still dirtied too much: the duty at least halves.
    d2 = c.decide(_b(pending=int(0.2 * PPS), dirty_pps=0.8 * PPS))
    assert d2.duty <= 0.5 * duty


def test_without_throttling_it_settles_under_the_limit_or_waits_for_the_timeout() -> None:
    c = Convergence(MigrationOptions(downtime_limit=0.3, throttle=False), ring=True)
    under = c.decide(_b(pending=int(0.2 * PPS), dirty_pps=0.8 * PPS))
    assert under.stop == "converged" and not c.throttled
    over = c.decide(_b(pending=int(0.5 * PPS), dirty_pps=PPS))
    assert over.stop == "" and not c.throttled
    assert c.decide(_b(pending=int(0.5 * PPS), dirty_pps=PPS, left=0.0)).stop == "timeout"


def test_round_limit_and_short_time_left() -> None:
    c = Convergence(MigrationOptions(max_rounds=3), ring=True)
    assert c.decide(_b(pending=int(0.5 * PPS), dirty_pps=PPS, rnd=2)).stop == "max_rounds"
    assert c.decide(_b(pending=int(0.2 * PPS), dirty_pps=PPS, rnd=2)).stop == "converged"
    c = Convergence(MigrationOptions(), ring=True)
    # Under the limit, and not even four such rounds left before the timeout: stop now.
    assert c.decide(_b(pending=int(0.2 * PPS), dirty_pps=PPS / 3, left=0.5)).stop == "converged"


def test_without_settling_it_stops_as_soon_as_it_fits_the_limit() -> None:
    c = Convergence(MigrationOptions(downtime_limit=0.3, settle=False), ring=True)
    assert c.decide(_b(pending=int(0.25 * PPS), dirty_pps=PPS / 3)).stop == "converged"


def test_the_next_round_is_predicted_from_the_last_rounds_pace() -> None:
    c = Convergence(MigrationOptions(), ring=True)
    b = Boundary(round=2, pending_pages=50_000, bandwidth=BW, fixed_s=0.0, dirty_pps=100_000,
                 armed=True, seconds_left=20.0, round_pps=125_000)
    d = c.decide(b)
    # 50,000 pages at 125,000 pages/s of round time: 0.4 s, dirtying 40,000 pages.
    assert d.predicted_s == pytest.approx(40_000 * PAGE / BW, rel=0.01)


def test_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="settle_aim"):
        MigrationOptions(settle_aim=0.0)
    with pytest.raises(ConfigError, match="epoch_pages"):
        MigrationOptions(epoch_pages=0)


def test_ring_pacer_owes_sleep_only_after_exits_above_the_target() -> None:
    p = RingPacer()
    p.after_exit(960, 0.001)
    assert p.sleep_now(1.0) == 0.0  # no target: never sleeps
    p.target_pps = 1000.0
    p.after_exit(960, 0.46)  # 960 pages should take 0.96 s at the target
    assert p.sleep_now(1.0) == pytest.approx(0.5)
    assert p.sleep_now(0.25) == 0.25  # in slices
    p.slept_for(0.25)
    assert p.sleep_now(1.0) == pytest.approx(0.25) and p.slept == pytest.approx(0.25)
    p.slept_for(0.3)
    assert p.sleep_now(1.0) == 0.0
    p.after_exit(500, 1.0)  # slower than the target already: nothing owed
    assert p.sleep_now(1.0) == 0.0
    p.after_exit(0, 0.0)  # a resync exit reports no pages: nothing owed
    assert p.sleep_now(1.0) == 0.0
