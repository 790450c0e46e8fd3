"""Live migration on real KVM, source and target in this process (the target is a ``Standby``
served on a thread, with ``auto_failover=False``, as ``dirtyring receive`` runs it).

At the switchover the target's memory must equal the source's paused guest (the source sends its
digest with the last round and the verifying target recomputes it), the target's committed
machine state must be the one the source captured, the guest must run on at the target, and the
source must stay paused. A migration that cannot converge without throttling converges with it.
Bad streams (a wrong key, garbage) leave the target untouched.
"""
from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from dirtyring.guests.protocol import GuestParams, Pattern
from dirtyring.machine.config import MachineConfig
from dirtyring.machine.vm import Machine
from dirtyring.migration.source import (Migration, MigrationError, MigrationOptions,
                                        MigrationReport, run_guest)
from dirtyring.migration.tracking import RoundTracking
from dirtyring.replication.standby import Standby

HOST = "127.0.0.1"
MiB = 1 << 20
PAGE = 4096
#: How long a test may wait for what it needs (the guest to move on, a number of passes)
#: before it fails. Generous: a slow or loaded host only takes longer.
DEADLINE = 60.0


def _port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class Target:
    """A migration target (Standby, no auto failover) served on a thread of this process."""

    def __init__(self, key: bytes, *, verify: bool = True) -> None:
        self.port = _port()
        self.events: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.sb = Standby((HOST, self.port), key, verify=verify, auto_failover=False,
                          heartbeat_timeout=10.0, on_event=self._on_event)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.sb.serve, args=(self.stop,), daemon=True)
        self.thread.start()
        end = time.monotonic() + 10
        while not self.of("listening") and time.monotonic() < end:
            time.sleep(0.01)

    def _on_event(self, e: dict[str, Any]) -> None:
        with self.lock:
            self.events.append(e)

    def of(self, kind: str) -> list[dict[str, Any]]:
        with self.lock:
            return [e for e in self.events if e["event"] == kind]

    def wait(self, kind: str, timeout: float) -> dict[str, Any] | None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            got = self.of(kind)
            if got:
                return got[0]
            time.sleep(0.01)
        return None

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        self.sb.close()


@pytest.fixture
def key() -> bytes:
    return os.urandom(32)


@pytest.fixture
def target(key: bytes) -> Iterator[Target]:
    t = Target(key)
    yield t
    t.close()


def _source(pattern: Pattern, *, tracker: str = "ring", rate: int = 20000,
            memory: int = 8 * MiB, hot: int = 64, ring: int = 1024) -> Machine:
    cfg = MachineConfig(guest="dirtier", tracker=tracker, data_slots=(memory,), ring_entries=ring,
                        params=GuestParams(pattern=pattern, rate_pps=rate, hot_pages=hot))
    m = Machine(cfg, threaded=False)
    run_guest(m, 0.2)
    return m


def _wait_until(what: str, cond: Any) -> None:
    """Poll ``cond()`` until it is true, within ``DEADLINE``."""
    end = time.monotonic() + DEADLINE
    while not cond():
        assert time.monotonic() < end, what
        time.sleep(0.01)


def _check_switchover(m: Machine, mig: Migration, t: Target) -> None:
    rep = mig.report
    assert rep is not None
    sb = t.sb
    # The target confirms before it finishes its bookkeeping (it resumed first).
    assert sb.failed_over.wait(DEADLINE) and sb.state == "failed_over", t.events[-5:]
    # Memory: the target recomputed the source's digest after the last commit.
    assert sb.mismatches == 0 and not t.of("verify_mismatch")
    assert m.memory is not None
    assert rep.final_digest and bytes.fromhex(rep.final_digest) == m.memory.digest()
    # State: the target resumed from exactly the state the source captured while paused.
    assert sb.committed_state == mig.final_state and mig.final_state
    assert t.wait("failover_done", DEADLINE) is not None
    # The source is paused for good: its progress no longer moves.
    p_src = m.progress()
    assert p_src == rep.progress_at_pause
    # The guest runs on at the target, from where the source stopped.
    tm = sb.machine
    assert tm is not None
    a = tm.progress()
    assert a >= rep.progress_at_pause
    _wait_until("the guest does not run on the target", lambda: tm.progress() > a or tm.crashed)
    assert not tm.crashed
    assert m.progress() == p_src, "the source ran after the switchover"


def _migrate_exactly(m: Machine, t: Target, key: bytes,
                     options: MigrationOptions | None = None) -> MigrationReport:
    """Migrate ``m`` to ``t`` (verify mode unless ``options`` say otherwise) and check the
    switchover with :func:`_check_switchover`; returns the report."""
    mig = Migration(m, (HOST, t.port), key, options=options or MigrationOptions(verify=True))
    try:
        rep = mig.run()
    finally:
        mig.close()
    _check_switchover(m, mig, t)
    return rep


@pytest.mark.parametrize("pattern", [Pattern.SEQUENTIAL, Pattern.RANDOM, Pattern.HOT])
@pytest.mark.parametrize("tracker", ["ring", "bitmap"])
def test_migration_moves_the_running_guest_exactly(pattern: Pattern, tracker: str, key: bytes,
                                                   target: Target) -> None:
    m = _source(pattern, tracker=tracker, hot=256)
    try:
        rep = _migrate_exactly(m, target, key, MigrationOptions(verify=True, timeout=20.0))
        assert rep.stop_reason == "converged", rep
        assert rep.rounds[0].kind == "full" and rep.rounds[-1].kind == "final"
        # The downtime is part of the migration (how short it is: ``dirtyring bench migrate``).
        assert 0 < rep.downtime_ms <= rep.total_s * 1e3
    finally:
        m.close()


def test_deferred_rearm_reports_a_page_once_per_round() -> None:
    """Mid-round ring harvests free the ring without re-arming: a page the guest keeps writing
    is reported once until the round boundary re-arms everything, then once again."""
    cfg = MachineConfig(guest="dirtier", tracker="ring", data_slots=(8 * MiB,), ring_entries=256,
                        params=GuestParams(pattern=Pattern.HOT, hot_pages=1024))
    with Machine(cfg, threaded=False) as m:
        tr = RoundTracking(m, rearm="round")
        r = m.runners[0]
        tr.boundary()
        tr.rearm()
        exits = pages = 0
        end = time.monotonic() + DEADLINE
        # Until it went round its 1024 pages many times, filling its ring more than once.
        while m.status(0, "passes") < 5 or not exits:
            assert time.monotonic() < end, (m.status(0, "passes"), exits)
            if r.run_inline(0.05) == "budget":
                n = tr.mid_round()
                assert n > 0
                exits += 1
                pages += n
        first = tr.boundary().slot(1)
        tr.rearm()
        assert pages <= 1024  # each page reported at most once ...
        assert np.array_equal(first, np.arange(1024))  # ... and every page is in the round
        again, passes = 0, m.status(0, "passes")
        end = time.monotonic() + DEADLINE
        # Until a whole pass over its pages ran after the re-arm.
        while m.status(0, "passes") < passes + 2:
            assert time.monotonic() < end, m.status(0, "passes") - passes
            if r.run_inline(0.05) == "budget":
                again += tr.mid_round()
        assert again > 0  # re-armed at the boundary: the pages fault and fill the ring again
        assert np.array_equal(tr.boundary().slot(1), np.arange(1024))


def test_throttling_makes_an_unconvergeable_migration_converge(key: bytes) -> None:
    """An unthrottled random writer behind a paced link: every round dirties the whole working
    set again, so without throttling the estimate never fits the limit and the migration
    stops-and-copies at the timeout; with throttling (through ring-full exits: the ring holds
    fewer entries than the set has pages) it converges.

    The link carries 256 pages a second: the whole set (1 MiB) per second. Any guest that makes
    more pages dirty than that (this host's slow write faults still allow ~6,000 a second)
    dirties all of them again in every round, whatever the host's speed. For that the pages
    must not shrink on the wire (the dirtier writes 24 bytes of each: they are filled with
    random bytes first), and the frames are 16 pages (a round that fits in one frame goes out
    in one write, unpaced)."""
    reports = {}
    for throttle in (False, True):
        t = Target(key)
        m = _source(Pattern.RANDOM, rate=0, memory=MiB, ring=256)
        try:
            assert m.memory is not None
            m.memory.write(m.memory.data_gpa, os.urandom(MiB))  # (a VMM write: tracked)
            # Unthrottled, the timeout is the scenario (it stops there); throttled, a deadline.
            opt = MigrationOptions(downtime_limit=0.015, bandwidth_limit=MiB, chunk_pages=16,
                                   timeout=30.0 if throttle else 4.0,
                                   max_rounds=10_000, throttle=throttle, verify=True)
            mig = Migration(m, (HOST, t.port), key, options=opt)
            try:
                reports[throttle] = rep = mig.run()
            finally:
                mig.close()
            _check_switchover(m, mig, t)
        finally:
            m.close()
            t.close()
        limit_ms = opt.downtime_limit * 1e3
        exp = [r.expected_downtime_ms for r in rep.rounds if r.kind != "final"]
        assert len(exp) >= 2, exp  # the bulk round and at least one round after it
        if not throttle:
            assert rep.stop_reason == "timeout" and not rep.throttled, (rep.stop_reason, exp)
            assert min(exp[1:]) > limit_ms, exp
        else:
            assert rep.stop_reason == "converged" and rep.throttled, (rep.stop_reason, exp)
            assert exp[-1] <= limit_ms, exp
            # The throttle acted through ring-full exits: the guest filled its ring and then
            # slept what it owed.
            ring = [r for r in rep.rounds if r.throttle_pages_per_s]
            assert ring and sum(r.ring_full_exits for r in ring) > 0, rep.rounds
            assert sum(r.throttle_sleep_s for r in ring) > 0, rep.rounds
    assert reports[True].final_pages < reports[False].final_pages


def test_a_vcpu_that_does_not_dirty_is_not_throttled(key: bytes, target: Target) -> None:
    """Throttling works through ring-full exits: a guest with a tiny working set never fills
    its ring, so it is never made to wait, even with the harshest throttle set. (The guest
    speed a migration keeps is measured by ``dirtyring bench migrate``.)"""
    m = _source(Pattern.HOT, rate=0, hot=16)
    try:
        mig = Migration(m, (HOST, target.port), key, options=MigrationOptions(verify=True))
        mig.pacer.target_pps = 1.0  # the harshest throttle: one page a second per ring-full exit
        try:
            rep = mig.run()
        finally:
            mig.close()
        assert all(r.ring_full_exits == 0 for r in rep.rounds)
        assert all(r.throttle_sleep_s == 0 for r in rep.rounds) and mig.pacer.slept == 0
        assert mig.pacer.target_pps == 1.0  # the throttle was in force all along
        assert rep.progress_at_pause > rep.progress_before  # the guest ran meanwhile
        _check_switchover(m, mig, target)
    finally:
        m.close()


def test_wrong_key_is_refused_and_leaves_the_target_untouched(target: Target) -> None:
    m = _source(Pattern.RANDOM)
    try:
        mig = Migration(m, (HOST, target.port), os.urandom(32), options=MigrationOptions())
        with pytest.raises(MigrationError, match="handshake|closed"):
            mig.run()
        mig.close()
        assert target.wait("protocol_error", 5) is not None
        assert "authentication failed" in target.of("protocol_error")[0]["error"]
        assert target.sb.machine is None and target.sb.committed_epoch == 0
        assert target.sb.state == "waiting"
        # The source was never paused for good: it runs on.
        a = m.progress()
        run_guest(m, 0.1)
        assert m.progress() > a
    finally:
        m.close()


def test_garbage_is_refused_and_a_real_migration_still_succeeds(key: bytes,
                                                               target: Target) -> None:
    with socket.create_connection((HOST, target.port), timeout=5) as s:
        s.sendall(os.urandom(4096))
        s.settimeout(5)
        try:
            while s.recv(4096):
                pass
        except OSError:
            pass
    assert target.wait("protocol_error", 5) is not None
    assert "magic" in target.of("protocol_error")[0]["error"]
    assert target.sb.machine is None and target.sb.committed_epoch == 0
    m = _source(Pattern.SEQUENTIAL)
    try:
        _migrate_exactly(m, target, key)
    finally:
        m.close()


def test_migration_needs_an_inline_tracked_machine(key: bytes) -> None:
    from dirtyring.errors import ConfigError
    cfg = MachineConfig(guest="dirtier", tracker="ring", data_slots=(4 * MiB,))
    with Machine(cfg) as m:  # threaded
        with pytest.raises(ConfigError, match="inline"):
            Migration(m, (HOST, 1), key)
    cfg = MachineConfig(guest="dirtier", tracker="none", data_slots=(4 * MiB,))
    with Machine(cfg, threaded=False) as m:
        with pytest.raises(ConfigError, match="tracked"):
            Migration(m, (HOST, 1), key)
