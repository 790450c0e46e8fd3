"""The transition tables are well formed, and ConnectionState enforces them without I/O."""
from __future__ import annotations

import os
import sys

import pytest

from dirtyring.errors import LocalProtocolError
from dirtyring.wire import (
    Ack, ConnectionClosed, EpochBegin, EpochEnd, Heartbeat, Hello, Pages,
)
from dirtyring.wire import Event
from dirtyring.wire.codec import _TYPE_OF as WIRE_TYPES
from dirtyring.wire.states import (
    CLOSED, ERROR, HANDSHAKE, IDLE, IN_EPOCH, PEER_TRANSITIONS, PRIMARY, STANDBY, SYNCING,
    TRANSITIONS, ConnectionState, HelloRejected, State,
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


def started() -> ConnectionState:
    cs = ConnectionState()
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
]


@pytest.mark.parametrize("needle,setup,role,event", RULES, ids=[r[0][:30] for r in RULES])
def test_value_rules(needle: str, setup: object, role: object, event: object) -> None:
    cs = ConnectionState()
    if setup == "started" or setup in ("epoch1", "open", "hb"):
        cs = started()
    if setup == "epoch1":
        cs.process_event(PRIMARY, EpochBegin(epoch=1, kind="full"))
        cs.process_event(PRIMARY, EpochEnd(epoch=1, n_pages=0, output_seq=0))
    if setup == "open":
        cs.process_event(PRIMARY, EpochBegin(epoch=1, kind="full"))
    if setup == "hb":
        cs.process_event(STANDBY, Heartbeat(seq=1, sent_ns=0))
    if isinstance(setup, list):
        for r, e in setup:
            cs.process_event(r, e)
    before = dict(cs.states)
    with pytest.raises(LocalProtocolError, match=needle):
        cs.process_event(role, event)  # type: ignore[arg-type]
    assert cs.states == before  # a refused event changes nothing


def test_error_is_terminal() -> None:
    cs = started()
    cs.process_error()
    assert cs.states == {PRIMARY: ERROR, STANDBY: ERROR}
    with pytest.raises(LocalProtocolError, match="illegal in state ERROR"):
        cs.process_event(PRIMARY, Heartbeat(seq=9, sent_ns=0))
