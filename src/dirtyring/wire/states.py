"""Protocol rules: which event may be sent when, by whom. Every rule lives in this file.

Theory of operation
-------------------
Two parties talk over one ordered, reliable byte stream: the PRIMARY runs the VM and streams
its memory and machine state; the STANDBY (a replica, or a migration target) keeps a shadow
copy and acknowledges. Each direction is its own ordered stream, so, like h11, we keep one
state per role and judge an event only against the state of the role that *sent* it. Both
``Connection`` objects of a pair therefore walk through exactly the same states, whatever the
interleaving of frames crossing in flight (an Ack may arrive while the next epoch is already
streaming; that is the point of pipelining).

The primary's stream::

    IDLE --Hello--> HANDSHAKE ==(standby's HelloAck accepted)==> SYNCING
    SYNCING --EpochBegin--> IN_EPOCH --Pages|MachineBlob--> IN_EPOCH --EpochEnd--> SYNCING
    SYNCING --Checkpoint--> SYNCING    (a whole epoch in one event: begin, pages, state, end)
    SYNCING|IN_EPOCH --Heartbeat--> (same)     SYNCING|IN_EPOCH --Failover|Goodbye--> CLOSED

The standby's stream::

    IDLE ==(primary's Hello)==> HANDSHAKE --HelloAck(accepted)--> SYNCING
    HANDSHAKE --HelloAck(rejected)|Goodbye--> CLOSED
    SYNCING --Ack|Resync|Heartbeat--> SYNCING  SYNCING --Failover|Goodbye--> CLOSED

Single arrows are :data:`TRANSITIONS` (the sender's own state moves); double arrows are
:data:`PEER_TRANSITIONS` (an event from the *other* role moves this role: the only two
couplings are the handshake). Anything not in the tables is illegal: a second Hello, Pages
outside an epoch, Heartbeat or Resync before the handshake, anything after CLOSED.

Some rules depend on values, not types, and are checked by :class:`ConnectionState` here too:
the HelloAck must echo the Hello's session id; epochs strictly increase (a Checkpoint's too, which
is checked as its EpochBegin and its EpochEnd together); Pages, MachineBlob and
EpochEnd carry the open epoch's number; EpochEnd's ``n_pages`` equals the pages actually sent in
the epoch; an Ack is cumulative, names an epoch that has *ended*, and never goes backwards;
a Resync also names an ended epoch, but may repeat or go below the last Ack (an acked epoch can
fail verification later); heartbeat sequence numbers and ``output_seq`` never go backwards.

One rule depends on how the two streams interleave: after the standby's Resync, the primary's
next EpochBegin must be ``full``. "Next" means next *after the primary processed the Resync*,
which only the primary can know: EpochBegins it sent earlier may still be in flight when the
standby's Resync leaves, and are legal. So :class:`ConnectionState` tracks ``resync_pending``
only on the primary's side (``side=PRIMARY``, or ``side=None``: one global order, as when a test
drives both roles); there an EpochBegin(kind="delta") while pending is a LocalProtocolError.
The standby cannot tell a late delta from an early one, so it does not judge the rule: it must
treat every epoch as untrusted until a full one commits.

Any violation raises :class:`~dirtyring.errors.LocalProtocolError`; ``Connection`` re-raises it
as ``RemoteProtocolError`` when the peer was the sender. Either way the caller then calls
:meth:`ConnectionState.process_error` and both roles are in ERROR for good: after a broken
rule neither side can trust its picture of the other.
"""
from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any, Final, TypeAlias

from dirtyring.errors import LocalProtocolError

from .events import (
    Ack, Checkpoint, EpochBegin, EpochEnd, Event, Failover, Goodbye, Heartbeat, Hello, HelloAck,
    MachineBlob, Pages, Resync,
)

__all__ = [
    "Role", "State", "PRIMARY", "STANDBY", "IDLE", "HANDSHAKE", "SYNCING", "IN_EPOCH", "CLOSED",
    "ERROR", "HelloRejected", "TRANSITIONS", "PEER_TRANSITIONS", "ConnectionState", "event_key",
]


class Role(enum.Enum):
    """Which end of the stream we are; the value is the string used in :class:`Hello`."""

    PRIMARY = "primary"
    STANDBY = "standby"

    # Members are singletons compared by identity: the default Enum hash (of the name, in
    # Python) was a tenth of the per-frame cost of the state machine.
    __hash__ = object.__hash__

    @property
    def peer(self) -> Role:
        return Role.STANDBY if self is Role.PRIMARY else Role.PRIMARY


class State(enum.Enum):
    """Per-role protocol state; see the module docstring for the diagram."""

    IDLE = "IDLE"
    HANDSHAKE = "HANDSHAKE"
    SYNCING = "SYNCING"
    IN_EPOCH = "IN_EPOCH"
    CLOSED = "CLOSED"
    ERROR = "ERROR"

    __hash__ = object.__hash__  # see Role


PRIMARY: Final = Role.PRIMARY
STANDBY: Final = Role.STANDBY
IDLE: Final = State.IDLE
HANDSHAKE: Final = State.HANDSHAKE
SYNCING: Final = State.SYNCING
IN_EPOCH: Final = State.IN_EPOCH
CLOSED: Final = State.CLOSED
ERROR: Final = State.ERROR


class HelloRejected:
    """Table key standing for ``HelloAck(accepted=False)``, which leads somewhere else."""


EventKey: TypeAlias = type
Table: TypeAlias = dict[Role, dict[State, dict[EventKey, State]]]

#: role -> that role's state -> type of event the role sends -> its new state.
TRANSITIONS: Final[Table] = {
    PRIMARY: {
        IDLE: {Hello: HANDSHAKE},
        HANDSHAKE: {Goodbye: CLOSED},
        SYNCING: {EpochBegin: IN_EPOCH, Checkpoint: SYNCING, Heartbeat: SYNCING,
                  Failover: CLOSED, Goodbye: CLOSED},
        IN_EPOCH: {Pages: IN_EPOCH, MachineBlob: IN_EPOCH, EpochEnd: SYNCING,
                   Heartbeat: IN_EPOCH, Failover: CLOSED, Goodbye: CLOSED},
        CLOSED: {},
        ERROR: {},
    },
    STANDBY: {
        IDLE: {},  # the standby says nothing until the primary's Hello arrives
        HANDSHAKE: {HelloAck: SYNCING, HelloRejected: CLOSED, Goodbye: CLOSED},
        SYNCING: {Ack: SYNCING, Resync: SYNCING, Heartbeat: SYNCING, Failover: CLOSED,
                  Goodbye: CLOSED},
        CLOSED: {},
        ERROR: {},
    },
}

#: role -> that role's state -> type of event the *other* role sends -> this role's new state.
PEER_TRANSITIONS: Final[Table] = {
    STANDBY: {IDLE: {Hello: HANDSHAKE}},
    PRIMARY: {HANDSHAKE: {HelloAck: SYNCING, HelloRejected: CLOSED}},
}

#: Appended to "illegal in state" messages so a log line says what the rule is.
_HINTS: Final[dict[EventKey, str]] = {
    Hello: "a session has exactly one Hello, sent first by the primary",
    Pages: "pages belong inside an epoch (EpochBegin ... EpochEnd)",
    MachineBlob: "machine state belongs inside an epoch (EpochBegin ... EpochEnd)",
    EpochEnd: "no epoch is open",
    EpochBegin: "the previous epoch must end first, after the handshake",
    Checkpoint: "a checkpoint is a whole epoch: after the handshake, never inside an epoch",
    Heartbeat: "heartbeats start after the handshake",
    Resync: "only the standby sends Resync, once the handshake is done",
}


def event_key(event: Event) -> EventKey:
    """The table key for ``event``: its type, except a rejecting HelloAck."""
    if isinstance(event, HelloAck) and not event.accepted:
        return HelloRejected
    return type(event)


def _opt(v: int | None) -> str:
    return "none" if v is None else str(v)


class ConnectionState:
    """Both roles' states plus the counters the value rules need; knows no bytes.

    ``side`` is the role whose order of events this object sees (a Connection passes its own
    role), or None for one global order. It matters to a single rule, the Resync one (see the
    module docstring): ``resync_pending`` is only ever set when ``side`` is not STANDBY.
    """

    def __init__(self, side: Role | None = None) -> None:
        self.side = side
        self.resync_pending = False  # the primary owes a full epoch (Resync seen, no EpochBegin)
        self.states: dict[Role, State] = {PRIMARY: IDLE, STANDBY: IDLE}
        self.session_id: bytes | None = None
        self.open_epoch: int | None = None
        self.last_epoch: int | None = None   # last epoch begun
        self.last_ended: int | None = None   # last epoch ended (what an Ack may name)
        self.last_acked: int | None = None
        self.pages_in_epoch = 0
        self.output_seq = 0
        self._heartbeat: dict[Role, int | None] = {PRIMARY: None, STANDBY: None}

    def process_event(self, role: Role, event: Event) -> None:
        """Apply ``event`` sent by ``role``, or raise LocalProtocolError and change nothing."""
        state = self.states[role]
        t = type(event)
        key = HelloRejected if t is HelloAck and not event.accepted else t  # type: ignore[attr-defined]
        step = _STEPS.get((role, state, key))
        if step is None:
            name = "HelloAck(rejected)" if key is HelloRejected else t.__name__
            hint = _HINTS.get(key)
            raise LocalProtocolError(f"{name} from {role.value} is illegal in state {state.value}"
                                     + (f": {hint}" if hint else ""))
        new, check, apply, peer_moves = step
        if check is not None:
            check(self, role, event)
        if apply is not None:
            apply(self, role, event)
        self.states[role] = new
        if peer_moves is not None:
            peer = role.peer
            peer_new = peer_moves.get(self.states[peer])
            if peer_new is not None:
                self.states[peer] = peer_new

    def process_error(self) -> None:
        """Enter ERROR for good (both roles: one broken rule voids the shared picture)."""
        self.states = {PRIMARY: ERROR, STANDBY: ERROR}


# Value rules per event type: one dict lookup per event instead of a chain of isinstance tests
# (the state machine runs for every event on both ends, thousands of times a second).

def _c_hello(st: ConnectionState, role: Role, ev: Any) -> None:
    if ev.role != role.value:
        raise LocalProtocolError(
            f"Hello claims role {ev.role!r} but was sent by the {role.value} side")


def _c_hello_ack(st: ConnectionState, role: Role, ev: Any) -> None:
    if ev.session_id != st.session_id:
        raise LocalProtocolError("HelloAck session_id does not match the Hello's")


def _c_epoch_begin(st: ConnectionState, role: Role, ev: Any) -> None:
    if st.last_epoch is not None and ev.epoch <= st.last_epoch:
        raise LocalProtocolError(f"{type(ev).__name__} epoch {ev.epoch} does not advance "
                                 f"(last epoch {st.last_epoch})")
    if st.resync_pending and ev.kind != "full":
        raise LocalProtocolError(
            f"{type(ev).__name__}(kind={ev.kind!r}) for epoch {ev.epoch} while a Resync is pending: "
            "the first epoch after the standby's Resync must be kind='full'")


def _c_in_epoch(st: ConnectionState, role: Role, ev: Any) -> None:
    if ev.epoch != st.open_epoch:
        raise LocalProtocolError(f"{type(ev).__name__} for epoch {ev.epoch} while epoch "
                                 f"{_opt(st.open_epoch)} is open")


def _c_epoch_end(st: ConnectionState, role: Role, ev: Any) -> None:
    _c_in_epoch(st, role, ev)
    if ev.n_pages != st.pages_in_epoch:
        raise LocalProtocolError(f"EpochEnd says {ev.n_pages} pages but epoch {ev.epoch} "
                                 f"carried {st.pages_in_epoch}")
    if ev.output_seq < st.output_seq:
        raise LocalProtocolError(
            f"EpochEnd output_seq {ev.output_seq} went back from {st.output_seq}")


def _c_checkpoint(st: ConnectionState, role: Role, ev: Any) -> None:
    _c_epoch_begin(st, role, ev)
    if ev.output_seq < st.output_seq:
        raise LocalProtocolError(
            f"Checkpoint output_seq {ev.output_seq} went back from {st.output_seq}")


def _c_ended(st: ConnectionState, role: Role, ev: Any) -> None:
    """An Ack or a Resync names an epoch that has ended."""
    if st.last_ended is None or ev.epoch > st.last_ended:
        raise LocalProtocolError(f"{type(ev).__name__} for epoch {ev.epoch} which has not ended "
                                 f"(last ended epoch: {_opt(st.last_ended)})")


def _c_ack(st: ConnectionState, role: Role, ev: Any) -> None:
    _c_ended(st, role, ev)
    if st.last_acked is not None and ev.epoch <= st.last_acked:
        raise LocalProtocolError(
            f"Ack for epoch {ev.epoch} does not advance (already acked {st.last_acked})")


def _c_heartbeat(st: ConnectionState, role: Role, ev: Any) -> None:
    last = st._heartbeat[role]
    if last is not None and ev.seq <= last:
        raise LocalProtocolError(
            f"Heartbeat seq {ev.seq} from {role.value} does not advance (last {last})")


def _a_hello(st: ConnectionState, role: Role, ev: Any) -> None:
    st.session_id = ev.session_id


def _a_epoch_begin(st: ConnectionState, role: Role, ev: Any) -> None:
    st.open_epoch = st.last_epoch = ev.epoch
    st.pages_in_epoch = 0
    st.resync_pending = False


def _a_pages(st: ConnectionState, role: Role, ev: Any) -> None:
    st.pages_in_epoch += ev.n_pages


def _a_epoch_end(st: ConnectionState, role: Role, ev: Any) -> None:
    st.last_ended = ev.epoch
    st.open_epoch = None
    st.output_seq = ev.output_seq


def _a_checkpoint(st: ConnectionState, role: Role, ev: Any) -> None:
    st.last_epoch = st.last_ended = ev.epoch
    st.open_epoch = None
    st.pages_in_epoch = 0
    st.resync_pending = False
    st.output_seq = ev.output_seq


def _a_ack(st: ConnectionState, role: Role, ev: Any) -> None:
    st.last_acked = ev.epoch


def _a_resync(st: ConnectionState, role: Role, ev: Any) -> None:
    st.resync_pending = st.side is not STANDBY


def _a_heartbeat(st: ConnectionState, role: Role, ev: Any) -> None:
    st._heartbeat[role] = ev.seq


_Rule: TypeAlias = Callable[[ConnectionState, Role, Any], None]
_CHECKS: Final[dict[type, _Rule]] = {
    Hello: _c_hello, HelloAck: _c_hello_ack, EpochBegin: _c_epoch_begin, Pages: _c_in_epoch,
    MachineBlob: _c_in_epoch, EpochEnd: _c_epoch_end, Checkpoint: _c_checkpoint, Ack: _c_ack,
    Resync: _c_ended, Heartbeat: _c_heartbeat}
_APPLIES: Final[dict[type, _Rule]] = {
    Hello: _a_hello, EpochBegin: _a_epoch_begin, Pages: _a_pages, EpochEnd: _a_epoch_end,
    Checkpoint: _a_checkpoint, Ack: _a_ack, Resync: _a_resync, Heartbeat: _a_heartbeat}


_Step: TypeAlias = tuple[State, _Rule | None, _Rule | None, dict[State, State] | None]


def _compile() -> dict[tuple[Role, State, EventKey], _Step]:
    """The tables above as one lookup per event: (sender, its state, event key) -> (new state,
    value check, value update, how the peer's state moves). The state machine runs for every
    event on both ends, thousands of times a second; the chained lookups cost a fifth of it."""
    steps: dict[tuple[Role, State, EventKey], _Step] = {}
    for role, table in TRANSITIONS.items():
        for state, moves in table.items():
            for key, new in moves.items():
                peer_moves = {ps: m[key] for ps, m in PEER_TRANSITIONS.get(role.peer, {}).items()
                              if key in m}
                rules = HelloAck if key is HelloRejected else key  # its values, checked alike
                steps[(role, state, key)] = (new, _CHECKS.get(rules), _APPLIES.get(rules),
                                             peer_moves or None)
    return steps


_STEPS: Final = _compile()
