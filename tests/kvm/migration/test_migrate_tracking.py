"""Migration's use of dirty tracking, on real KVM: ``RingTracker.harvest_unarmed`` /
``unarmed`` (what migration rounds harvest with), the bulk round that arms nothing, rounds
sent as several epochs, and a link that dies mid-round (the source must not hang)."""
from __future__ import annotations

import math
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from dirtyring.errors import RingOverflow
from dirtyring.guests.protocol import GuestParams, Pattern
from dirtyring.machine.config import MachineConfig
from dirtyring.machine.vm import Machine
from dirtyring.migration.source import Migration, MigrationError, MigrationOptions, run_guest
from dirtyring.migration.link import Round
from dirtyring.tracking import RingTracker

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
from test_migrate_live import (DEADLINE, HOST, MiB, Target, _check_switchover,  # noqa: E402
                               _migrate_exactly, _port, key, target)

__all__ = ["key", "target"]  # fixtures


def _ring_machine(hot: int, entries: int = 256) -> Machine:
    cfg = MachineConfig(guest="dirtier", tracker="ring", data_slots=(8 * MiB,),
                        ring_entries=entries, params=GuestParams(pattern=Pattern.HOT,
                                                                 hot_pages=hot))
    return Machine(cfg, threaded=False)


def _run(m: Machine, passes: int, harvest: Callable[[], object] | None = None) -> int:
    """Run inline until the guest made ``passes`` more passes over its pages (2: it wrote
    every one of them since the call), within ``DEADLINE``; on every ring-full exit call
    ``harvest`` (None: there must be none); returns the exits."""
    r = m.runners[0]
    exits = 0
    goal = m.status(0, "passes") + passes
    end = time.monotonic() + DEADLINE
    while m.status(0, "passes") < goal:
        assert time.monotonic() < end, f"{goal - m.status(0, 'passes')} passes short"
        if r.run_inline(0.02) == "budget":
            assert harvest is not None, "a ring-full exit"
            exits += 1
            harvest()
    return exits


def test_harvest_unarmed_leaves_pages_writable_until_rearm_all() -> None:
    with _ring_machine(hot=1024) as m:
        t = m.tracker
        assert isinstance(t, RingTracker)
        t.rearm_all()
        assert len(t.unarmed()) == 0
        got: list[np.ndarray] = []
        _run(m, 4, lambda: got.append(t.harvest_unarmed().slot(1)))  # many passes over its
        got.append(t.harvest_unarmed().slot(1))                        # 1024 pages ...
        seen = np.concatenate(got)
        assert len(seen) == len(np.unique(seen)) == 1024  # ... each reported once
        assert np.array_equal(t.unarmed().slot(1), np.arange(1024))
        # Writable: more passes push no entry at all.
        assert _run(m, 2, lambda: pytest.fail("a ring-full exit on writable pages")) == 0
        assert len(t.harvest_unarmed().slot(1)) == 0
        # Re-armed: the pages fault and are reported again; nothing is left writable.
        t.rearm_all()
        assert len(t.unarmed()) == 0
        again: list[np.ndarray] = []
        _run(m, 2, lambda: again.append(t.harvest().slot(1)))
        # harvest() re-armed what it reported: a whole pass more fills the ring again.
        assert _run(m, 2, lambda: again.append(t.harvest().slot(1))) > 0
        assert len(np.unique(np.concatenate(again))) == 1024
        assert len(t.unarmed()) == 0  # harvest() re-armed what it reported


def test_unarmed_forgets_pages_a_rearming_harvest_protected() -> None:
    with _ring_machine(hot=64, entries=1024) as m:
        t = m.tracker
        assert isinstance(t, RingTracker)
        t.rearm_all()
        _run(m, 2)  # every one of its 64 pages written (the ring holds them all)
        assert len(t.harvest_unarmed().slot(1)) == 64
        assert np.array_equal(t.unarmed().slot(1), np.arange(64))
        t.rearm_all()
        _run(m, 2)
        t.harvest()  # re-arms the 64 pages it reports
        assert len(t.unarmed()) == 0
        t.stop()  # no logging: every page may be written unseen
        assert len(t.unarmed()) == sum(s.pages for s in t.slots.values())
        t.start()
        assert len(t.unarmed()) == 0


def _writer(tracker: str, *, hot: int, memory: int = 16 * MiB) -> Machine:
    cfg = MachineConfig(guest="dirtier", tracker=tracker, data_slots=(memory,), ring_entries=1024,
                        params=GuestParams(pattern=Pattern.HOT, hot_pages=hot, rate_pps=0))
    m = Machine(cfg, threaded=False)
    # Until it wrote its working set once: those pages are writable (ring-full exits free the
    # ring without re-arming).
    end = time.monotonic() + DEADLINE
    while m.status(0, "passes") < 1:
        assert time.monotonic() < end, "the writer never went round its pages"
        run_guest(m, 0.05)
    return m


@pytest.mark.parametrize("tracker", ["ring", "bitmap"])
def test_the_bulk_round_arms_nothing_and_round_one_sends_what_was_writable(
        tracker: str, key: bytes, target: Target) -> None:
    m = _writer(tracker, hot=2048)
    try:
        rep = _migrate_exactly(m, target, key)
        bulk, first = rep.rounds[0], rep.rounds[1]
        assert bulk.kind == "full" and not bulk.armed and first.armed
        assert bulk.ring_full_exits == 0  # the writer never faulted while all of memory went
        assert bulk.dirty_pages >= 2048  # its whole working set is sent again in round 1
        assert first.pages_sent == bulk.dirty_pages
    finally:
        m.close()


def test_arm_bulk_is_the_classic_pre_copy(key: bytes, target: Target) -> None:
    m = _writer("ring", hot=4096)
    cable = _Cable(target.port)
    try:
        mig = Migration(m, (HOST, cable.port), key,
                        options=MigrationOptions(verify=True, arm_bulk=True))
        try:
            mig.connect()
            # The bulk round reaches the target only once the writer went round all its pages
            # (armed, each faults once more), however long that takes on this host.
            passes = m.status(0, "passes")
            cable.hold()
            cable.release_when(lambda: m.status(0, "passes") >= passes + 2)
            rep = mig.run()
        finally:
            mig.close()
            cable.cut()
        _check_switchover(m, mig, target)
        assert cable.released_by_condition
        assert rep.rounds[0].armed and rep.rounds[0].ring_full_exits > 0  # it faulted again
    finally:
        m.close()


def test_rearm_on_every_harvest_still_migrates_exactly(key: bytes, target: Target) -> None:
    """``rearm="harvest"``: the kernel's own re-arm on every ring-full exit (QEMU's way)."""
    m = _writer("ring", hot=4096)
    try:
        rep = _migrate_exactly(m, target, key, MigrationOptions(verify=True, rearm="harvest"))
        assert rep.rounds[0].armed
    finally:
        m.close()


def test_a_ring_overflow_inside_a_round_resyncs_and_still_migrates_exactly(
        key: bytes, target: Target, monkeypatch: pytest.MonkeyPatch) -> None:
    """Entries lost inside a round (ring.py's overflow checks): everything is dirty, the round's
    earlier harvests included, so the next round sends all of memory again."""
    m = _writer("ring", hot=4096)
    t = m.tracker
    assert isinstance(t, RingTracker)
    real = t.harvest_unarmed
    calls = {"armed_exits": 0, "raised": 0}
    cable = _Cable(target.port)

    def on_event(e: dict[str, Any]) -> None:
        if e["event"] == "round" and e["round"] == 0:
            # Round 1 reaches the target only once the overflow was injected: the writer (its
            # pages writable during the bulk round, re-armed for round 1) fills its ring by
            # then, however long that takes on this host.
            cable.hold()
            cable.release_when(lambda: calls["raised"] > 0)

    # Round 1 must happen: with the default limit, a fast link lets the policy converge after
    # the bulk round (4,096 pages expected to go in ~30 ms), and then the cable, held for the
    # overflow that round 1 would have brought, is never released (seen in CI under load).
    opts = MigrationOptions(verify=True, downtime_limit=1e-3, max_rounds=4)
    mig = Migration(m, (HOST, cable.port), key, options=opts, on_event=on_event)
    mid_round = mig.track.mid_round

    def exit_in_a_round() -> int:  # a ring-full exit inside a tracked round
        calls["armed_exits"] += mig.track.armed
        return mid_round()

    def flaky() -> object:
        got = real()
        if calls["armed_exits"] == 1 and not calls["raised"]:  # the first one of round 1
            calls["raised"] += 1  # as ring.py does: the entries were consumed, then judged bad
            raise RingOverflow("injected by the test")
        return got
    monkeypatch.setattr(t, "harvest_unarmed", flaky)
    monkeypatch.setattr(mig.track, "mid_round", exit_in_a_round)
    try:
        try:
            rep = mig.run()
        finally:
            mig.close()
            cable.cut()
        _check_switchover(m, mig, target)
        assert cable.released_by_condition
        assert rep.rounds[1].ring_full_exits > 0  # (round 1: where it was injected)
        assert calls["raised"] == 1 and rep.extras["resyncs"] == 1
        pages = sum(s.pages for s in t.slots.values())
        # All of memory went again (in a later round or in the stop-and-copy).
        assert any(r.pages_sent == pages for r in rep.rounds[1:]), rep.rounds
    finally:
        m.close()


def test_rounds_sent_as_many_small_epochs_migrate_exactly(key: bytes, target: Target) -> None:
    m = _writer("ring", hot=1024)
    try:
        opt = MigrationOptions(verify=True, epoch_pages=100, chunk_pages=64)
        rep = _migrate_exactly(m, target, key, opt)
        # Each epoch carries at most ``epoch_pages`` data pages plus one frame's, and each
        # reached the target and was committed on its own: more epochs than rounds (the bulk
        # round alone has the writer's 1024 pages).
        per_epoch = opt.epoch_pages + opt.chunk_pages - 1
        assert rep.rounds[0].pages_sent >= 1024
        assert target.sb.epochs >= sum(max(1, math.ceil(r.pages_sent / per_epoch))
                                       for r in rep.rounds)
    finally:
        m.close()


class _Cable:
    """A TCP relay between source and target that the test can cut, or hold (what the source
    sends waits in the relay until it is released)."""

    def __init__(self, to_port: int) -> None:
        self.port = _port()
        self._to = to_port
        self._ls = socket.create_server((HOST, self.port))
        self._socks: list[socket.socket] = []
        self.bytes = 0
        self._open = threading.Event()
        self._open.set()
        self.released_by_condition = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        a, _ = self._ls.accept()
        b = socket.create_connection((HOST, self._to))
        self._socks += [a, b]
        for x, y, gated in ((a, b, True), (b, a, False)):
            threading.Thread(target=self._pump, args=(x, y, gated), daemon=True).start()

    def _pump(self, x: socket.socket, y: socket.socket, gated: bool) -> None:
        try:
            while data := x.recv(1 << 16):
                if gated:
                    self._open.wait()
                self.bytes += len(data)
                y.sendall(data)
        except OSError:
            pass

    def hold(self) -> None:
        """Stop forwarding what the source sends (it waits here: nothing is lost)."""
        self._open.clear()

    def release_when(self, cond: Callable[[], bool]) -> None:
        """Forward again once ``cond()`` holds (polled from a thread), or at ``DEADLINE``
        (``released_by_condition`` tells which)."""
        def watch() -> None:
            end = time.monotonic() + DEADLINE
            while time.monotonic() < end and not self._open.is_set():
                if cond():
                    self.released_by_condition = True
                    break
                time.sleep(0.002)
            self._open.set()
        threading.Thread(target=watch, daemon=True).start()

    def cut(self) -> None:
        self._open.set()
        for s in (*self._socks, self._ls):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def test_a_link_that_dies_mid_round_fails_the_migration_and_the_source_runs_on(
        key: bytes, target: Target) -> None:
    m = _writer("ring", hot=256, memory=32 * MiB)
    cable = _Cable(target.port)
    cut_at: list[dict[str, Any]] = []

    def on_event(e: dict[str, Any]) -> None:
        # The cable is cut in the middle of the bulk round: some of its pages sent, not all.
        if e["event"] == "progress" and e["round"] == 0 and 0 < e["sent"] < e["total"] \
                and not cut_at:
            cut_at.append(e)
            cable.cut()

    try:
        # A slow link (sparse pages are ~40 bytes on the wire): the bulk round takes seconds.
        opt = MigrationOptions(bandwidth_limit=20e3, heartbeat_timeout=2.0, timeout=DEADLINE)
        mig = Migration(m, (HOST, cable.port), key, options=opt, on_event=on_event)
        try:
            with pytest.raises(MigrationError) as ei:  # (not a hang, nor the timeout's end)
                mig.run()
        finally:
            mig.close()
        assert cut_at, "the bulk round ended before it could be cut"
        assert ei.value.source_may_run and not mig.switchover_sent
        a = m.progress()
        run_guest(m, 0.1)
        assert m.progress() > a  # the guest runs on at the source
    finally:
        cable.cut()
        m.close()


def test_a_round_queued_after_the_link_died_does_not_hang(key: bytes, target: Target) -> None:
    """The race the source once hung on: the link dies while the guest is paused between two
    rounds; the next round must fail at once instead of running the guest forever."""
    m = _writer("ring", hot=256)
    try:
        mig = Migration(m, (HOST, target.port), key, options=MigrationOptions())
        mig.connect()
        mig.net.start()
        mig.net._lose("cut by the test")
        rnd = Round(index=1, kind="delta", dirty=mig.track.boundary())
        mig.net.submit(rnd)
        # Were it to run the guest until the round is done, this ends it (and the test fails).
        rescue = threading.Timer(DEADLINE, rnd.done.set)
        rescue.start()
        a = m.progress()
        try:
            mig._run_until(rnd, 0)
        finally:
            rescue.cancel()
        assert mig.net.lost.is_set() and rnd.done.is_set()
        assert m.progress() == a  # it failed at once: the guest never ran
        mig.close()
    finally:
        m.close()


def test_every_dirtier_pattern_with_a_fresh_target_per_run(key: bytes) -> None:
    """Rates between idle and unthrottled, each migrated exactly (a fresh target each time)."""
    for rate in (100, 20_000, 200_000):
        t = Target(key)
        cfg = MachineConfig(guest="dirtier", tracker="ring", data_slots=(16 * MiB,),
                            ring_entries=1024,
                            params=GuestParams(pattern=Pattern.SEQUENTIAL, rate_pps=rate))
        m = Machine(cfg, threaded=False)
        try:
            run_guest(m, 0.2)
            _migrate_exactly(m, t, key)
        finally:
            m.close()
            t.close()
