"""The primary's decisions about output when it loses its standby, with fakes (no KVM, no etcd:
no KVM or etcd behaviour is claimed here, only what the primary decides from what it is told).

The rules (``primary.py``, issue 16): output leaves on the standby's acknowledgement; a
crash of our own uplink without an arbiter fences the primary (the standby takes over on the
dropped connection); with an arbiter the primary goes on alone only after marking the standby
stale, releases output only while its lease holds, and fences itself when it loses the key."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from dirtyring.replication.arbiter import ArbiterUnavailable
from dirtyring.replication.primary import Primary
from dirtyring.replication.uplink_handle import UPLINK_DIED
from dirtyring.replication.uplink_messages import (Acked, Lost, ResyncRequested, RevokerArmed,
                                                   Skipped, StandbyTookOver, WireStats)


class FakeArbiter:
    """What the primary asks of ``Arbiter``; records the order of what happened."""

    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.group, self.who, self.token, self.lost = "g", "primary", 7, ""
        self.reachable = True
        self.holds = True  # set_replica succeeds (we hold the key)
        self.lease_ok = True
        self.on_lost: Any = None
        self.released = False

    def set_replica(self, replica: str) -> bool:
        if not self.reachable:
            raise ArbiterUnavailable("no etcd member answered")
        if not self.holds:
            self.lost = "another copy holds the group's key"
            self.on_lost(self.lost)
            return False
        self.log.append(f"replica={replica!r}")
        return True

    def may_release(self) -> bool:
        return self.lease_ok and not self.lost

    def ttl_left(self) -> float:
        return 2.5 if self.lease_ok else 0.0

    def release(self) -> None:
        self.released = True
        self.log.append("lease released")


def primary(arbiter: FakeArbiter | None = None, acked: int = 0
            ) -> tuple[Primary, list[tuple[Any, int]], list[str]]:
    """A primary over a fake machine and a fake uplink handle (only ``acked`` is read), in the
    protected state; returns it, what it released (payload, epoch) and the event log."""
    log: list[str] = arbiter.log if arbiter is not None else []
    out: list[tuple[Any, int]] = []

    def release(kind: str, payload: Any, epoch: int) -> None:
        out.append((payload, epoch))
        log.append(f"out {payload}")

    m = SimpleNamespace(tracker=object(), sink=None, stdio=None)
    p = Primary(m, ("127.0.0.1", 1), b"k" * 32, release=release,  # type: ignore[arg-type]
                arbiter=arbiter, on_event=lambda e: log.append(e["event"]))  # type: ignore[arg-type]
    p.up = SimpleNamespace(acked=acked)  # type: ignore[assignment]
    p.state = "protected"
    return p, out, log


def emit_epochs(p: Primary, epochs: range) -> None:
    """Output made in each of ``epochs`` (tagged with it, as the epoch loop does)."""
    for e in epochs:
        p.gate.advance(e)
        p.gate.emit("kv", f"r{e}")


def test_output_waits_for_the_standbys_acknowledgement() -> None:
    p, out, _ = primary(acked=0)
    emit_epochs(p, range(2, 6))
    assert out == []
    p.up.acked = 3  # type: ignore[union-attr]
    p._poll_acks()
    assert out == [("r2", 2), ("r3", 3)]


def test_uplink_death_without_an_arbiter_fences_the_primary() -> None:
    """The standby sees the connection drop and takes over: the primary must not go on.
    What the standby acknowledged is released; the rest is dropped, never released."""
    p, out, log = primary(acked=3)
    emit_epochs(p, range(2, 6))
    p._on_message(Lost(UPLINK_DIED))
    assert p.fenced and p.state == "fenced"
    assert "the standby takes over" in p.lost_reason and "--etcd" in p.lost_reason
    assert out == [("r2", 2), ("r3", 3)]
    assert p.gate.dropped == 2
    emit_epochs(p, range(6, 8))  # the guest is stopping: nothing it says leaves
    assert out == [("r2", 2), ("r3", 3)]
    assert "degraded" not in log


def test_uplink_death_during_a_planned_stop_is_no_failover() -> None:
    p, out, _ = primary(acked=2)
    p.state = "stopping"
    p._on_message(Lost(UPLINK_DIED))
    assert not p.fenced


def test_a_lost_standby_without_an_arbiter_leaves_the_primary_alone() -> None:
    """Connection lost or heartbeats missing while the uplink lives: the standby may be dead;
    without an arbiter nothing can tell, and the primary goes on (the CLI warns that a
    partition can then give two live copies)."""
    p, out, log = primary(acked=2)
    emit_epochs(p, range(2, 5))
    p._on_message(Lost("no frame from the standby for 0.3 s"))
    assert p.state == "degraded" and not p.fenced
    assert [e for _, e in out] == [2, 3, 4]
    emit_epochs(p, range(5, 6))
    assert out[-1] == ("r5", 5)
    assert "degraded" in log


@pytest.mark.parametrize("why", [UPLINK_DIED, "no frame from the standby for 0.3 s"])
def test_with_an_arbiter_the_standby_is_marked_stale_before_anything_unacknowledged_leaves(
        why: str) -> None:
    a = FakeArbiter([])
    p, out, log = primary(a, acked=2)
    emit_epochs(p, range(2, 5))
    p._on_message(Lost(why))
    assert p.state == "degraded" and not p.fenced
    assert [e for _, e in out] == [2, 3, 4]
    # r2 was acknowledged (released by the ack); r3 and r4 only after the mark
    first_unacked = log.index("out r3")
    assert log.index("replica=''") < first_unacked
    assert "alone" in log


def test_with_etcd_unreachable_the_primary_holds_its_output_until_it_can_mark() -> None:
    a = FakeArbiter([])
    a.reachable = False
    p, out, log = primary(a, acked=0)
    emit_epochs(p, range(2, 4))
    p._on_message(Lost("no frame from the standby for 0.3 s"))
    assert p.state == "degraded" and out == [] and p.gate.statistics().held == 2
    assert p._lease_fields()["lease"]["output_held"] is True
    emit_epochs(p, range(4, 5))
    assert out == []  # held, not dropped
    a.reachable = True
    assert p._go_alone()  # (the degraded loop tries again)
    assert [e for _, e in out] == [2, 3, 4]
    assert p.gate.dropped == 0


def test_alone_output_leaves_only_while_the_lease_surely_holds() -> None:
    a = FakeArbiter([])
    p, out, _ = primary(a, acked=0)
    p._on_message(Lost("no frame from the standby for 0.3 s"))
    emit_epochs(p, range(2, 3))
    assert out == [("r2", 2)]
    a.lease_ok = False  # within the margin of the lease's end by our clock
    emit_epochs(p, range(3, 5))
    assert out == [("r2", 2)] and p.gate.statistics().held == 2
    assert p.gate.flush() == 2  # still not allowed: still held
    a.lease_ok = True  # renewed
    assert p.gate.flush() == 0
    emit_epochs(p, range(5, 6))
    assert [e for _, e in out] == [2, 3, 4, 5]  # in order, nothing lost


def test_losing_the_key_fences_the_primary_and_gives_the_lease_up() -> None:
    a = FakeArbiter([])
    p, out, log = primary(a, acked=2)
    emit_epochs(p, range(2, 5))
    a.lost = "our etcd lease ended"
    a.on_lost(a.lost)
    assert p.fenced and p.state == "fenced" and "lost the group's key" in p.lost_reason
    assert out == [("r2", 2)]  # acknowledged: released; the rest dropped
    assert p.gate.dropped == 2 and a.released


def test_a_primary_that_cannot_mark_because_another_holds_the_key_fences_itself() -> None:
    a = FakeArbiter([])
    a.holds = False
    p, out, _ = primary(a, acked=2)
    emit_epochs(p, range(2, 5))
    p._on_message(Lost(UPLINK_DIED))
    assert p.fenced and out == [("r2", 2)]


def test_the_standby_taking_over_fences_the_primary() -> None:
    a = FakeArbiter([])
    p, out, _ = primary(a, acked=3)
    emit_epochs(p, range(2, 6))
    p._on_message(StandbyTookOver("manual failover command"))
    assert p.fenced and [e for _, e in out] == [2, 3] and a.released


def test_every_message_from_the_uplink_is_handled_by_its_type() -> None:
    """Resync, skipped, statistics, the revoker, an urgent ack: each does its own thing."""
    p, out, log = primary(acked=0)
    emit_epochs(p, range(2, 4))
    p._on_message(ResyncRequested(5, "memory digest mismatch"))
    assert p._resync.is_set() and "resync_requested" in log
    p._on_message(Skipped(6))
    assert p.skipped_after_resync == 1
    p._on_message(WireStats({"ack_ms_p50": 0.25}))
    assert p._wire == {"ack_ms_p50": 0.25}
    p._on_message(RevokerArmed())
    assert "lease_revoker_armed" in log
    p.up.acked = 2  # type: ignore[union-attr]
    p._on_message(Acked(2))  # the ack is read from staging at once, not at the next epoch
    assert out == [("r2", 2)]
    assert not p.fenced and p.state == "protected"
