"""The transition tables are well formed, and ConnectionState enforces them without I/O."""
from __future__ import annotations

import os
import sys

import pytest

from dirtyring.errors import LocalProtocolError
from dirtyring.wire import (
    Ack, ConnectionClosed, EpochBegin, EpochEnd, Heartbeat, Hello, Pages, Resync,
)
from dirtyring.wire import Event
from dirtyring.wire.codec import _TYPE_OF as WIRE_TYPES
from dirtyring.wire.states import (
    CLOSED, ERROR, HANDSHAKE, IDLE, IN_EPOCH, PEER_TRANSITIONS, PRIMARY, STANDBY, SYNCING,
    TRANSITIONS, ConnectionState, HelloRejected, Role, State,
)

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # wire_helpers sits beside the tests; works in any import mode
    sys.path.insert(0, _HERE)
from wire_helpers import SESSION, hello, hello_ack, mixed_pages  # noqa: E402


def test_tables_are_well_formed() -> None:
    for role, table in TRANSITIONS.items():
        assert table[ERROR] == {} and table[CLOSED] == {}, role
        for state, moves in table.items():
            for key, new in moves.items():
                assert isinstance(new, State)
                assert new in table, (role, state, key, new)
                # every key is a wire event type (or the rejected-HelloAck marker)
                assert key is HelloRejected or (issubclass(key, Event) and key in WIRE_TYPES)
    for role, table in PEER_TRANSITIONS.items():
        for state, moves in table.items():
            assert state in TRANSITIONS[role]
            assert all(new in TRANSITIONS[role] for new in moves.values())


def test_every_state_is_reachable() -> None:
    for role, table in TRANSITIONS.items():
        seen = {IDLE}
        todo = [IDLE]
        while todo:
            s = todo.pop()
            nxt = set(table[s].values()) | set(PEER_TRANSITIONS.get(role, {}).get(s, {}).values())
            todo += [n for n in nxt if n not in seen]
            seen |= nxt
        assert seen | {ERROR} == set(table), role


def started(side: Role | None = None) -> ConnectionState:
    cs = ConnectionState(side)
    cs.process_event(PRIMARY, hello())
    assert cs.states == {PRIMARY: HANDSHAKE, STANDBY: HANDSHAKE}
    cs.process_event(STANDBY, hello_ack())
    assert cs.states == {PRIMARY: SYNCING, STANDBY: SYNCING}
    return cs


def test_pipelined_ack_while_next_epoch_streams() -> None:
    cs = started()
    p1 = mixed_pages(1)
    cs.process_event(PRIMARY, EpochBegin(epoch=1, kind="full"))
    cs.process_event(PRIMARY, p1)
    cs.process_event(PRIMARY, EpochEnd(epoch=1, n_pages=p1.n_pages, output_seq=1))
    cs.process_event(PRIMARY, EpochBegin(epoch=2, kind="delta"))
    assert cs.states[PRIMARY] is IN_EPOCH
    cs.process_event(STANDBY, Ack(epoch=1))  # crosses epoch 2 in flight: legal
    assert cs.last_acked == 1


def test_rejected_hello_closes_both_sides() -> None:
    cs = ConnectionState()
    cs.process_event(PRIMARY, hello())
    cs.process_event(STANDBY, hello_ack(accepted=False))
    assert cs.states == {PRIMARY: CLOSED, STANDBY: CLOSED}


RULES = [
    ("Hello claims role", [], PRIMARY,
     Hello(role="standby", version=1, session_id=SESSION, config=b"")),
    ("HelloAck from standby is illegal in state IDLE", [], STANDBY, hello_ack()),
    ("session_id does not match", [(PRIMARY, hello())], STANDBY, hello_ack(bytes(16))),
    ("does not advance", "epoch1", PRIMARY, EpochBegin(epoch=1, kind="delta")),
    ("Pages for epoch 5 while epoch 1 is open", "open", PRIMARY,
     Pages(epoch=5, slot=0, page_size=4096, pages=(1,), data=bytes(4096))),
    ("EpochEnd says 3 pages", "open", PRIMARY, EpochEnd(epoch=1, n_pages=3, output_seq=0)),
    ("has not ended", "open", STANDBY, Ack(epoch=1)),
    ("Heartbeat seq 1 from standby does not advance", "hb", STANDBY,
     Heartbeat(seq=1, sent_ns=0)),
    ("ConnectionClosed from primary is illegal", "started", PRIMARY, ConnectionClosed(clean=True)),
    ("Resync from standby is illegal in state IDLE", [], STANDBY, Resync(epoch=0, reason="")),
    ("Resync from standby is illegal in state HANDSHAKE", [(PRIMARY, hello())], STANDBY,
     Resync(epoch=0, reason="")),
    ("Resync from primary is illegal in state SYNCING", "epoch1", PRIMARY,
     Resync(epoch=1, reason="")),
    ("Resync for epoch 0 which has not ended .last ended epoch: none", "started", STANDBY,
     Resync(epoch=0, reason="")),
    ("Resync for epoch 1 which has not ended", "open", STANDBY, Resync(epoch=1, reason="")),
    ("Resync for epoch 2 which has not ended .last ended epoch: 1", "epoch1", STANDBY,
     Resync(epoch=2, reason="")),
    ("EpochBegin.kind='delta'. for epoch 2 while a Resync is pending", "resync", PRIMARY,
     EpochBegin(epoch=2, kind="delta")),
]


@pytest.mark.parametrize("needle,setup,role,event", RULES, ids=[r[0][:30] for r in RULES])
def test_value_rules(needle: str, setup: object, role: object, event: object) -> None:
    cs = ConnectionState()
    if setup == "started" or setup in ("epoch1", "open", "hb", "resync"):
        cs = started()
    if setup in ("epoch1", "resync"):
        cs.process_event(PRIMARY, EpochBegin(epoch=1, kind="full"))
        cs.process_event(PRIMARY, EpochEnd(epoch=1, n_pages=0, output_seq=0))
    if setup == "open":
        cs.process_event(PRIMARY, EpochBegin(epoch=1, kind="full"))
    if setup == "hb":
        cs.process_event(STANDBY, Heartbeat(seq=1, sent_ns=0))
    if setup == "resync":
        cs.process_event(STANDBY, Resync(epoch=1, reason="digest mismatch"))
    if isinstance(setup, list):
        for r, e in setup:
            cs.process_event(r, e)
    before = dict(cs.states), cs.resync_pending, cs.last_epoch
    with pytest.raises(LocalProtocolError, match=needle):
        cs.process_event(role, event)  # type: ignore[arg-type]
    assert (cs.states, cs.resync_pending, cs.last_epoch) == before  # a refusal changes nothing


def one_epoch(cs: ConnectionState, epoch: int, kind: str) -> None:
    cs.process_event(PRIMARY, EpochBegin(epoch=epoch, kind=kind))
    cs.process_event(PRIMARY, EpochEnd(epoch=epoch, n_pages=0, output_seq=epoch))


@pytest.mark.parametrize("side", [None, PRIMARY], ids=["global", "primary"])
def test_resync_demands_one_full_epoch(side: Role | None) -> None:
    cs = started(side)
    one_epoch(cs, 1, "full")
    one_epoch(cs, 2, "delta")
    cs.process_event(STANDBY, Ack(epoch=2))
    cs.process_event(STANDBY, Resync(epoch=1, reason="late verification"))  # below the last Ack
    cs.process_event(STANDBY, Resync(epoch=2, reason="again"))              # and repeated
    assert cs.resync_pending and cs.states == {PRIMARY: SYNCING, STANDBY: SYNCING}
    assert cs.last_acked == 2  # a Resync is not an Ack and takes none back
    cs.process_event(PRIMARY, EpochBegin(epoch=3, kind="full"))
    assert not cs.resync_pending
    cs.process_event(PRIMARY, EpochEnd(epoch=3, n_pages=0, output_seq=3))
    cs.process_event(STANDBY, Ack(epoch=3))
    one_epoch(cs, 4, "delta")  # one full epoch settles it


def test_resync_while_an_epoch_is_open_lets_it_finish() -> None:
    cs = started(PRIMARY)
    one_epoch(cs, 1, "full")
    cs.process_event(PRIMARY, EpochBegin(epoch=2, kind="delta"))
    cs.process_event(STANDBY, Resync(epoch=1, reason="x"))
    assert cs.states[PRIMARY] is IN_EPOCH and cs.resync_pending
    cs.process_event(PRIMARY, Heartbeat(seq=1, sent_ns=0))
    cs.process_event(PRIMARY, EpochEnd(epoch=2, n_pages=0, output_seq=2))
    with pytest.raises(LocalProtocolError, match="while a Resync is pending"):
        cs.process_event(PRIMARY, EpochBegin(epoch=3, kind="delta"))
    cs.process_event(PRIMARY, EpochBegin(epoch=3, kind="full"))


def test_the_standby_side_does_not_judge_the_resync_rule() -> None:
    """Deltas the primary sent before it saw the Resync may arrive after the standby sent it."""
    cs = started(STANDBY)
    one_epoch(cs, 1, "full")
    cs.process_event(STANDBY, Resync(epoch=1, reason="x"))
    assert not cs.resync_pending
    one_epoch(cs, 2, "delta")


def test_error_is_terminal() -> None:
    cs = started()
    cs.process_error()
    assert cs.states == {PRIMARY: ERROR, STANDBY: ERROR}
    with pytest.raises(LocalProtocolError, match="illegal in state ERROR"):
        cs.process_event(PRIMARY, Heartbeat(seq=9, sent_ns=0))
