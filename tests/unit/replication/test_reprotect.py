"""Re-protection's decisions, without KVM: a fake guest (it records pauses, tracking and its
output sink), a fake connect and a fake ``Primary`` (replication itself is tested elsewhere).

- only a standby that took over (a running guest with a tracker) can be re-protected;
- an unreachable new standby is retried, with an event each time, until ``stop``;
- a refused handshake puts everything back as it was (tracking off, output straight out) before
  the next try; tracking is switched only while the guest is paused;
- once connected it replicates until ``stop`` and returns that primary, closed;
- a guest that stopped or crashed is not re-protected.
"""
from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

import pytest

from dirtyring.errors import DirtyringError
from dirtyring.replication import reprotect as rp

ADDR = ("127.0.0.1", 7777)


class FakeGuest:
    def __init__(self) -> None:
        self.log: list[str] = []
        self.paused = False
        self.crashed: str | None = None
        self.stopped = False
        self.sink: Any = "straight-out"
        self.tracker = SimpleNamespace(start=lambda: self._track("start"),
                                       stop=lambda: self._track("stop"))

    def _track(self, what: str) -> None:
        assert self.paused, f"tracker.{what} while the guest runs"
        self.log.append(f"tracker.{what}")

    def pause_all(self) -> None:
        self.paused = True
        self.log.append("pause")

    def resume_all(self) -> None:
        self.paused = False
        self.log.append("resume")

    def wait_stopped(self, timeout: float) -> bool:
        return self.stopped


class FakePrimary:
    """Refuses the handshake ``refusals`` times (across instances), then replicates."""

    made: list[FakePrimary] = []
    refusals = 0

    def __init__(self, m: FakeGuest, addr: tuple[str, int], key: bytes, **kw: Any) -> None:
        self.m, self.addr, self.kw = m, addr, kw
        self.sink_before = m.sink
        m.sink = f"gate-{len(FakePrimary.made)}"  # as a Primary does: output through its gate
        self.ran = self.closed = False
        FakePrimary.made.append(self)

    def connect(self, sock: Any) -> None:
        if FakePrimary.refusals:
            FakePrimary.refusals -= 1
            raise DirtyringError("the standby refused: busy")

    def run(self, *, stop: threading.Event) -> None:
        assert not self.m.paused
        self.ran = True

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch) -> Any:
    FakePrimary.made, FakePrimary.refusals = [], 0
    calls: list[tuple[str, int]] = []
    state = SimpleNamespace(unreachable=0, calls=calls)

    def connect(addr: tuple[str, int]) -> str:
        calls.append(addr)
        if state.unreachable:
            state.unreachable -= 1
            raise DirtyringError("cannot connect: connection refused")
        return "socket"

    monkeypatch.setattr(rp, "connect", connect)
    monkeypatch.setattr(rp, "Primary", FakePrimary)
    return state


def standby(guest: FakeGuest | None, state: str = "failed_over") -> Any:
    return SimpleNamespace(machine=guest, state=state, reprotected_by=None)


def run(sb: Any, stop: threading.Event | None = None, **kw: Any) -> tuple[Any, list[dict]]:
    events: list[dict] = []
    got = rp.reprotect(sb, ADDR, b"k" * 32, stop=stop or threading.Event(),
                       on_event=events.append, release=lambda *a: None, retry_s=0.0, **kw)
    return got, events


@pytest.mark.parametrize("sb", [
    standby(FakeGuest(), state="protected"),
    standby(FakeGuest(), state="waiting"),
    standby(None),
    standby(SimpleNamespace(tracker=None)),  # type: ignore[arg-type]
], ids=["following", "waiting", "no-vm", "untracked"])
def test_only_a_standby_that_took_over_can_reprotect(fakes: Any, sb: Any) -> None:
    with pytest.raises(DirtyringError, match="took over"):
        run(sb)
    assert not fakes.calls


def test_an_unreachable_standby_is_retried_until_it_answers(fakes: Any) -> None:
    fakes.unreachable = 3
    g = FakeGuest()
    sb = standby(g)
    got, events = run(sb)
    assert len(fakes.calls) == 4 and fakes.calls[0] == ADDR
    waiting = [e for e in events if e["event"] == "reprotect_waiting"]
    assert len(waiting) == 3 and all("connection refused" in e["reason"] for e in waiting)
    assert all(e["standby"] == "127.0.0.1:7777" for e in events)
    assert got is FakePrimary.made[0] and sb.reprotected_by is got
    assert got.ran and got.closed
    assert [e["event"] for e in events][-1] == "reprotect_started"
    # Tracking was switched on once, while paused; the guest runs.
    assert g.log == ["pause", "tracker.start", "resume"] and not g.paused


def test_stop_ends_the_retries(fakes: Any) -> None:
    fakes.unreachable = 10 ** 6
    stop = threading.Event()
    events: list[dict] = []

    def on_event(e: dict) -> None:
        events.append(e)
        if len(events) == 5:
            stop.set()

    got = rp.reprotect(standby(FakeGuest()), ADDR, b"k" * 32, stop=stop, on_event=on_event,
                       release=lambda *a: None, retry_s=0.0)
    assert got is None and len(fakes.calls) == 5 and not FakePrimary.made


def test_a_refused_handshake_puts_everything_back_before_the_next_try(fakes: Any) -> None:
    FakePrimary.refusals = 2
    g = FakeGuest()
    got, events = run(standby(g))
    assert len(FakePrimary.made) == 3 and got is FakePrimary.made[2]
    assert [e["event"] for e in events] == ["reprotect_waiting"] * 2 + ["reprotect_started"]
    assert "busy" in events[0]["reason"]
    on, off = ["pause", "tracker.start", "resume"], ["pause", "tracker.stop", "resume"]
    assert g.log == on + off + on + off + on
    # A refused primary's gate is taken off again: until the next one, output goes straight
    # out (nobody would ever acknowledge it); the one that runs has its own.
    assert [p.sink_before for p in FakePrimary.made] == ["straight-out"] * 3
    assert g.sink == "gate-2"
    assert [p.ran for p in FakePrimary.made] == [False, False, True]


@pytest.mark.parametrize("how", ["crashed", "stopped"])
def test_a_guest_that_ended_is_not_reprotected(fakes: Any, how: str) -> None:
    g = FakeGuest()
    if how == "crashed":
        g.crashed = "triple fault"
    else:
        g.stopped = True
    got, events = run(standby(g))
    assert got is None and not fakes.calls and not events and not g.log
