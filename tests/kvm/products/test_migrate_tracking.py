"""Migration's use of dirty tracking, on real KVM: ``RingTracker.harvest_unarmed`` /
``unarmed`` (what migration rounds harvest with), the bulk round that arms nothing, rounds
sent as several epochs, and a link that dies mid-round (the source must not hang)."""
from __future__ import annotations

import os
import socket
import sys
import threading
import time

import numpy as np
import pytest

from dirtyring.errors import RingOverflow
from dirtyring.guests.protocol import GuestParams, Pattern
from dirtyring.machine.config import MachineConfig
from dirtyring.machine.vm import Machine
from dirtyring.products.migrate import Migration, MigrationError, MigrationOptions, run_guest
from dirtyring.products.migrate_link import Round
from dirtyring.tracking import RingTracker

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
from test_migrate_live import (HOST, MiB, Target, _migrate_exactly, _port,  # noqa: E402
                               key, target)

__all__ = ["key", "target"]  # fixtures


def _ring_machine(hot: int, entries: int = 256) -> Machine:
    cfg = MachineConfig(guest="dirtier", tracker="ring", data_slots=(8 * MiB,),
                        ring_entries=entries, params=GuestParams(pattern=Pattern.HOT,
                                                                 hot_pages=hot))
    return Machine(cfg, threaded=False)


def _run(m: Machine, seconds: float, harvest: object) -> int:
    """Run inline; on every ring-full exit call ``harvest``; returns the exits."""
    r = m.runners[0]
    exits = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if r.run_inline(0.02) == "budget":
            exits += 1
            harvest()  # type: ignore[operator]
    return exits


def test_harvest_unarmed_leaves_pages_writable_until_rearm_all() -> None:
    with _ring_machine(hot=1024) as m:
        t = m.tracker
        assert isinstance(t, RingTracker)
        t.rearm_all()
        assert len(t.unarmed()) == 0
        got: list[np.ndarray] = []
        _run(m, 0.3, lambda: got.append(t.harvest_unarmed().slot(1)))
        got.append(t.harvest_unarmed().slot(1))
        seen = np.concatenate(got)
        assert m.status(0, "passes") >= 3  # many passes over its 1024 pages ...
        assert len(seen) == len(np.unique(seen)) == 1024  # ... each reported once
        assert np.array_equal(t.unarmed().slot(1), np.arange(1024))
        # Writable: more passes push no entry at all.
        assert _run(m, 0.1, lambda: pytest.fail("a ring-full exit on writable pages")) == 0
        assert len(t.harvest_unarmed().slot(1)) == 0
        # Re-armed: the pages fault and are reported again; nothing is left writable.
        t.rearm_all()
        assert len(t.unarmed()) == 0
        again: list[np.ndarray] = []
        _run(m, 0.2, lambda: again.append(t.harvest().slot(1)))
        assert _run(m, 0.05, lambda: again.append(t.harvest().slot(1))) > 0  # still faulting
        assert len(np.unique(np.concatenate(again))) == 1024
        assert len(t.unarmed()) == 0  # harvest() re-armed what it reported


def test_unarmed_forgets_pages_a_rearming_harvest_protected() -> None:
    with _ring_machine(hot=64, entries=1024) as m:
        t = m.tracker
        assert isinstance(t, RingTracker)
        t.rearm_all()
        run_guest(m, 0.02)
        assert len(t.harvest_unarmed().slot(1)) == 64
        assert np.array_equal(t.unarmed().slot(1), np.arange(64))
        t.rearm_all()
        run_guest(m, 0.02)
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
    run_guest(m, 0.3)  # it has faulted its working set in once: those pages are writable
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
    try:
        # Paced (sparse pages are ~40 bytes on the wire): the bulk round lasts ~0.2 s.
        opt = MigrationOptions(verify=True, arm_bulk=True, bandwidth_limit=1e6)
        rep = _migrate_exactly(m, target, key, opt)
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
    calls = {"n": 0, "raised": 0}

    def flaky() -> object:
        calls["n"] += 1
        got = real()
        if calls["n"] == 2:  # the bulk round's start, then the first ring-full exit of round 1
            calls["raised"] += 1  # as ring.py does: the entries were consumed, then judged bad
            raise RingOverflow("injected by the test")
        return got
    monkeypatch.setattr(t, "harvest_unarmed", flaky)
    try:
        # Paced (sparse pages are ~40 bytes on the wire): round 1 lasts ~0.15 s, long enough for
        # the writer (its pages writable during the bulk round: no exit there) to fill its ring.
        rep = _migrate_exactly(m, target, key, MigrationOptions(verify=True, bandwidth_limit=1e6))
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
        # 4096 pages with data (16 MiB, all written: the warm-up's passes and the loader):
        # far more epochs than rounds reached the target, each committed on its own.
        assert target.sb.epochs > 3 * len(rep.rounds)
    finally:
        m.close()


class _Cable:
    """A TCP relay between source and target that the test can cut."""

    def __init__(self, to_port: int) -> None:
        self.port = _port()
        self._to = to_port
        self._ls = socket.create_server((HOST, self.port))
        self._socks: list[socket.socket] = []
        self.bytes = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        a, _ = self._ls.accept()
        b = socket.create_connection((HOST, self._to))
        self._socks += [a, b]
        for x, y in ((a, b), (b, a)):
            threading.Thread(target=self._pump, args=(x, y), daemon=True).start()

    def _pump(self, x: socket.socket, y: socket.socket) -> None:
        try:
            while data := x.recv(1 << 16):
                self.bytes += len(data)
                y.sendall(data)
        except OSError:
            pass

    def cut(self) -> None:
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
    try:
        # A slow link (sparse pages are ~40 bytes on the wire): the bulk round takes seconds,
        # and the cable is cut in the middle of it.
        opt = MigrationOptions(bandwidth_limit=20e3, heartbeat_timeout=2.0)
        mig = Migration(m, (HOST, cable.port), key, options=opt)
        threading.Timer(0.5, cable.cut).start()
        t0 = time.monotonic()
        try:
            with pytest.raises(MigrationError) as ei:
                mig.run()
        finally:
            mig.close()
        assert ei.value.source_may_run and not mig.switchover_sent
        assert time.monotonic() - t0 < 10
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
        t0 = time.monotonic()
        mig._run_until(rnd, 0)
        assert time.monotonic() - t0 < 1.0 and mig.net.lost.is_set()
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
