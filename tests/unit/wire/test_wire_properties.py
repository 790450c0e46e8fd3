"""Property tests (Hypothesis) of the wire protocol, as a fuzzer would probe it.

1. encode -> decode is the identity for every event type, alone and in batches.
2. Any mutation of a valid frame (bit flips, truncation, extension, replaced, inserted or
   deleted bytes, interesting integers written over fields) is refused with the protocol's own
   error, or reads back as the original frame; a mutated body re-authenticated with the right
   key (so it gets past CRC and MAC to the decoders) decodes to a *valid* event (the
   constructor's checks pass on its values and it round-trips) or raises RemoteProtocolError.
   The same holds for whole sessions fed to a Connection.
3. The state machine rejects every out-of-order event: legal sessions are perturbed (events
   swapped, dropped, repeated, moved, foreign events inserted) and a Connection must accept
   exactly what an independent model of the rules in ``states.py``'s docstring accepts, and
   refuse the first event the model refuses, for good.

Examples are bounded and there is no deadline: the tests check behaviour, never speed.
"""
from __future__ import annotations

import dataclasses
import os
import struct
import sys
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dirtyring.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from dirtyring.wire import (
    ERROR, NEED_DATA, PROTOCOL_VERSION, Ack, Checkpoint, Connection, ConnectionClosed,
    EpochBegin, EpochEnd, Event, Failover, FrameType, Goodbye, Heartbeat, Hello, HelloAck,
    MachineBlob, Pages, Resync,
)
from dirtyring.wire.codec import (
    _TYPE_OF, FRAME_OVERHEAD, HEADER, HEADER_LEN, MAC_LEN, Batch, batch_body,
    encode_body, encode_event, frame_parts, frame_type_of, read_frame,
)
from dirtyring.wire.receivebuffer import ReceiveBuffer

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # the helpers sit beside the tests; works in any import mode
    sys.path.insert(0, _HERE)
from wire_helpers import KEY, SESSION  # noqa: E402
from wire_strategies import EVENTS, U64, any_event, pages  # noqa: E402

#: DIRTYRING_PROPERTY_SCALE=N runs N times as many examples (a longer local campaign).
_SCALE = max(1, int(os.environ.get("DIRTYRING_PROPERTY_SCALE", "1")))
PROPS = settings(max_examples=100 * _SCALE, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FEW = settings(PROPS, max_examples=50 * _SCALE)


# ------------------------------------------------------------------------------ helpers


def frame(event: Event, seq: int = 0, key: bytes = KEY, **kw: Any) -> bytes:
    return b"".join(encode_event(event, seq, key, **kw))


def read_all(data: bytes, seq: int = 0, key: bytes = KEY) -> list[Any]:
    """Every frame that can be cut from ``data``; RemoteProtocolError as read_frame raises it."""
    buf = ReceiveBuffer()
    buf.append(data)
    out: list[Any] = []
    while (f := read_frame(buf, key, expected_seq=seq + len(out))) is not None:
        out.append(f)
    return out


def events_of(frames: list[Any]) -> list[Event]:
    return [e for f in frames
            for e in ([e for e, _ in f.event.items] if isinstance(f.event, Batch) else [f.event])]


def assert_valid(event: Event) -> None:
    """A decoded event is one its constructor accepts, and it round-trips again.

    The decoder builds Pages and Checkpoint without the constructor's checks (for speed), so
    this is where a decoder that lets a malformed value through is caught."""
    assert type(event) in _TYPE_OF, event
    ps = event.pages if isinstance(event, Checkpoint) else (event,) if isinstance(event, Pages) \
        else ()
    for p in ps:
        Pages(epoch=p.epoch, slot=p.slot, page_size=p.page_size, pages=p.indices, data=p.data,
              delta=p.delta)
    if not isinstance(event, Pages):
        dataclasses.replace(event)  # __post_init__ checks the decoded values
    [again] = events_of(read_all(frame(event)))
    assert again == event and type(again) is type(event)


INTERESTING = [0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0xFFFF, 0x7FFF_FFFF, 0xFFFF_FFFF,
               (1 << 63) - 1, 1 << 63, U64, 512, 4096, 1 << 30]


@st.composite
def mutated(draw: Any, data: bytes, max_ops: int = 3) -> bytes:
    """``data`` after 1..max_ops byte-level mutations, as a fuzzer makes them."""
    b = bytearray(data)
    for _ in range(draw(st.integers(1, max_ops))):
        op = draw(st.sampled_from(["flip", "truncate", "extend", "replace", "insert", "delete",
                                   "integer"]))
        pos = draw(st.integers(0, max(len(b) - 1, 0)))
        if op == "flip" and b:
            b[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del b[pos:]
        elif op == "extend":
            b += draw(st.binary(min_size=1, max_size=48))
        elif op == "replace" and b:
            b[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            b[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del b[pos:pos + draw(st.integers(1, 8))]
        elif op == "integer":
            width = draw(st.sampled_from([1, 2, 4, 8]))
            v = draw(st.sampled_from(INTERESTING)) & ((1 << 8 * width) - 1)
            b[pos:pos + width] = v.to_bytes(width, "big")
    return bytes(b)


def split_frame(data: bytes) -> tuple[int, bytes]:
    """(type, body) of one whole frame."""
    _, _, ftype, length, _, _ = HEADER.unpack_from(data)
    assert len(data) == HEADER_LEN + length + MAC_LEN
    return ftype, data[HEADER_LEN:HEADER_LEN + length]


# ------------------------------------------------------------------------------ 1. identity


@pytest.mark.parametrize("name", sorted(EVENTS))
@PROPS
@given(data=st.data())
def test_encode_decode_is_the_identity_for_every_event_type(name: str, data: Any) -> None:
    event = data.draw(EVENTS[name], label="event")
    seq = data.draw(st.integers(0, U64), label="seq")
    level = data.draw(st.integers(0, 9), label="compress_level")
    wire = frame(event, seq, compress_level=level)
    [got] = read_all(wire, seq)
    assert type(got.event) is type(event) and got.event == event
    assert got.seq == seq and got.wire_len == len(wire) == got.body_len + FRAME_OVERHEAD
    assert got.type is frame_type_of(event)
    if isinstance(event, Pages):  # the lazily built data of a sparse frame, and the words
        assert got.event.data == event.data and got.event.indices.dtype == np.int64


def test_the_strategies_cover_every_wire_event_type() -> None:
    assert set(EVENTS) == {t.__name__ for t in _TYPE_OF}


batchable = st.one_of(*(s for n, s in EVENTS.items() if n not in ("Hello", "HelloAck")))


@PROPS
@given(events=st.lists(batchable, min_size=1, max_size=5), seq=st.integers(0, U64))
def test_a_batch_decodes_to_its_events_in_order(events: list[Event], seq: int) -> None:
    subs = []
    for e in events:
        body = encode_body(e)
        subs.append((frame_type_of(e), body, sum(len(bytes(b)) for b in body)))
    body = batch_body(subs)
    wire = b"".join(frame_parts(FrameType.BATCH, seq, body, KEY))
    assert events_of(read_all(wire, seq)) == events


# ------------------------------------------------------------------------------ 2. mutations


@PROPS
@given(data=st.data())
def test_a_mutated_frame_is_refused_or_reads_as_the_original(data: Any) -> None:
    """CRC and MAC cover every byte: no mutation turns a frame into another valid one."""
    event = data.draw(any_event, label="event")
    seq = data.draw(st.integers(0, 1000), label="seq")
    wire = frame(event, seq)
    bad = data.draw(mutated(wire), label="mutated")
    try:
        frames = read_all(bad, seq)
    except RemoteProtocolError:
        return
    assert len(frames) <= 1 and all(f.event == event for f in frames)
    assert not frames or bad.startswith(wire)


@st.composite
def reauthenticated(draw: Any) -> tuple[int, bytes]:
    """(type, body) of a valid frame's body after mutations, maybe under another type."""
    event = draw(any_event, label="event")
    ftype, body = split_frame(frame(event))
    body = draw(mutated(body, max_ops=4), label="body")
    if draw(st.integers(0, 9)) == 0:
        ftype = draw(st.one_of(st.sampled_from(list(FrameType)), st.integers(0, 0xFFFF)),
                     label="type")
    return ftype, body


def check_reauthenticated(ftype: int, body: bytes, seq: int = 7) -> None:
    wire = b"".join(frame_parts(ftype, seq, [body], KEY))
    try:
        frames = read_all(wire, seq)
    except RemoteProtocolError:
        return
    assert len(frames) == 1 and frames[0].body_len == len(body)
    for e in events_of(frames):
        assert_valid(e)


@PROPS
@given(case=reauthenticated())
def test_a_mutated_body_past_the_mac_decodes_to_a_valid_event_or_a_protocol_error(
        case: tuple[int, bytes]) -> None:
    check_reauthenticated(*case)


#: Page numbers a run may start at: small, just below and at the int64 limit, anywhere in u64.
run_firsts = st.one_of(st.integers(0, 16), st.sampled_from([(1 << 63) - k for k in range(5)]),
                       st.integers(0, U64))
run_counts = st.one_of(st.integers(1, 4), st.sampled_from([0, 0xFFFF_FFFF, 1 << 31]))


@st.composite
def pages_bodies(draw: Any) -> bytes:
    """A Pages body with an arbitrary head and run table (either layout), payloads that fit
    their runs or not: the decoder's arithmetic on indices and counts, head on."""
    ps = draw(st.sampled_from([512, 4096]))
    runs = draw(st.lists(st.tuples(run_firsts, run_counts), min_size=1, max_size=4))
    if draw(st.booleans()):  # in order, as a sender writes them
        runs.sort()
    total = sum(c for _, c in runs) & 0xFFFF_FFFF
    n = draw(st.sampled_from([total, total, total - 1, total + 1])) & 0xFFFF_FFFF
    sparse = draw(st.booleans())
    head = struct.pack("!QIIIIB", 1, 0, ps, n, len(runs), (2 if sparse else 0)
                       | draw(st.sampled_from([0, 1])))
    if sparse:
        words = draw(st.lists(st.integers(0, 64), max_size=3, unique=True).map(sorted))
        return (head + b"".join(struct.pack("!QI", f, c) for f, c in runs)
                + struct.pack("!I", len(words)) + b"".join(struct.pack("!I", w) for w in words)
                + b"\x01" * 8 * len(words))
    body = head
    for f, c in runs:
        enc = draw(st.sampled_from([0, 1, 4]))  # RAW, ZERO, SPARSE64
        payload = {0: bytes(min(c, 4) * ps), 1: b"", 4: struct.pack("!I", 0)}[enc]
        body += struct.pack("!QIBI", f, c, enc, len(payload)) + payload
    return body


@settings(PROPS, max_examples=400 * _SCALE)  # quick examples, and the decoder's core
@given(body=pages_bodies())
def test_any_run_table_decodes_to_valid_pages_or_a_protocol_error(body: bytes) -> None:
    check_reauthenticated(FrameType.PAGES, body)


@st.composite
def mutated_batch(draw: Any) -> bytes:
    events = draw(st.lists(batchable, min_size=1, max_size=4))
    subs = []
    for e in events:
        body = b"".join(bytes(b) for b in encode_body(e))
        subs.append((frame_type_of(e), [body], len(body)))
    return draw(mutated(b"".join(bytes(b) for b in batch_body(subs)), max_ops=4))


@PROPS
@given(body=mutated_batch())
def test_a_mutated_batch_past_the_mac_decodes_to_valid_events_or_a_protocol_error(
        body: bytes) -> None:
    check_reauthenticated(FrameType.BATCH, body)


def _zero_pages_body(n: int, page_size: int = 4096) -> bytes:
    """A Pages body of ``n`` zero pages in one ZERO run: 42 bytes whatever ``n``."""
    return struct.pack("!QIIIIB", 1, 0, page_size, n, 1, 0) + struct.pack("!QIBI", 0, n, 1, 0)


@pytest.mark.parametrize("ftype,body,match", [
    # SPARSE Pages, two runs, the second starting at 2**63 - 1 with 2 pages: its end is past
    # the int64 range (a wrapped end once decoded page indices 2**63 - 1 and -2**63).
    (FrameType.PAGES, struct.pack("!QIIIIB", 1, 0, 512, 3, 2, 2) + struct.pack("!QI", 0, 1)
     + struct.pack("!QI", (1 << 63) - 1, 2) + struct.pack("!I", 0), "malformed PAGES"),
    # A 1 KiB BATCH of 20 Pages of 1 MiB of zero pages each, against a 1 MiB cap: each
    # sub-frame was held to the cap alone, so one frame inflated to 20 MiB (64 MiB frames:
    # to any size). The pages of a frame's events now share one cap, as a Checkpoint's do.
    (FrameType.BATCH, b"".join(batch_body([(FrameType.PAGES, [_zero_pages_body(256)], 42)] * 20)),
     "malformed BATCH.*expand beyond"),
], ids=["sparse-run-past-int64", "batch-inflates-past-the-cap"])
def test_found_bodies_are_refused(ftype: int, body: bytes, match: str) -> None:
    """Bodies the properties here found once: each must stay refused."""
    with pytest.raises(RemoteProtocolError, match=match):
        buf = ReceiveBuffer()
        buf.append(b"".join(frame_parts(ftype, 0, [body], KEY)))
        read_frame(buf, KEY, expected_seq=0, max_frame_size=1 << 20)


@FEW
@given(events=st.lists(pages(epoch=1), min_size=1, max_size=8),
       max_body=st.sampled_from([1 << 10, 1 << 16, 1 << 20]))
def test_a_sender_splits_batches_so_the_receiver_takes_every_frame(
        events: list[Pages], max_body: int) -> None:
    """Batches never carry more pages than the receiver allows one frame (max_frame_size)."""
    cap = 32 * 1024  # pages() makes at most 6 pages of 4 KiB: each event fits alone
    primary = Connection("primary", KEY, max_frame_size=cap)
    standby = Connection("standby", KEY, max_frame_size=cap)
    standby.receive_data(primary.send(Hello(role="primary", version=PROTOCOL_VERSION,
                                            session_id=SESSION, config=b"")))
    standby.next_event()
    primary.receive_data(standby.send(HelloAck(session_id=SESSION, accepted=True)))
    primary.next_event()
    sent = [EpochBegin(epoch=1, kind="full"), *events,
            EpochEnd(epoch=1, n_pages=sum(p.n_pages for p in events), output_seq=0)]
    standby.receive_data(b"".join(bytes(b) for b in primary.send_batch(sent, max_body=max_body)))
    got = []
    while (e := standby.next_event()) is not NEED_DATA:
        got.append(e)
    assert got == sent


@FEW
@given(data=st.data())
def test_a_mutated_session_fed_to_a_connection_raises_only_protocol_errors(data: Any) -> None:
    """The fuzz target's harness (``bench/fuzz.py``: a standby or primary Connection fed a
    script of frames it re-authenticates, every event checked, errors checked to stick) run on
    mutated legal sessions."""
    from dirtyring.bench import fuzz
    seed = data.draw(st.sampled_from(fuzz.seeds("connection")), label="seed")
    script = data.draw(mutated(seed, max_ops=4), label="script")
    try:
        fuzz.run_connection(script)
    except ProtocolError:
        pass


# ------------------------------------------------------------------------------ 3. order


def small_pages(epoch: int, n: int, first: int = 0) -> Pages:
    data = bytearray(n * 512)
    data[::97] = b"\x01" * len(data[::97])
    return Pages(epoch=epoch, slot=0, page_size=512, pages=np.arange(first, first + n),
                 data=bytes(data))


@st.composite
def primary_sessions(draw: Any) -> list[Event]:
    """A legal stream from the primary: Hello, epochs (or Checkpoints) with pages, machine
    state and heartbeats, maybe an ending."""
    out: list[Event] = [Hello(role="primary", version=PROTOCOL_VERSION, session_id=SESSION,
                              config=b"{}")]
    epoch = output = beat = 0

    def heartbeat() -> None:
        nonlocal beat
        if draw(st.integers(0, 3)) == 0:
            beat += draw(st.integers(1, 3))
            out.append(Heartbeat(seq=beat, sent_ns=beat))

    for _ in range(draw(st.integers(0, 4))):
        heartbeat()
        epoch += draw(st.integers(1, 3))
        output += draw(st.integers(0, 2))
        kind = draw(st.sampled_from(["full", "delta"]))
        if draw(st.booleans()):
            out.append(Checkpoint(epoch=epoch, kind=kind, blob=b"s", output_seq=output,
                                  pages=tuple(small_pages(epoch, draw(st.integers(1, 3)))
                                              for _ in range(draw(st.integers(0, 2))))))
            continue
        out.append(EpochBegin(epoch=epoch, kind=kind))
        n = 0
        for item in draw(st.lists(st.sampled_from(["pages", "blob", "beat"]), max_size=4)):
            if item == "pages":
                p = small_pages(epoch, draw(st.integers(1, 3)), first=n)
                n += p.n_pages
                out.append(p)
            elif item == "blob":
                out.append(MachineBlob(epoch=epoch, blob=b"cpu"))
            else:
                heartbeat()
        out.append(EpochEnd(epoch=epoch, n_pages=n, output_seq=output))
    end = draw(st.sampled_from([None, "failover", "goodbye"]))
    if end:
        out.append(Failover(reason="over") if end == "failover" else Goodbye(reason="bye"))
    return out


class PrimaryStreamModel:
    """The primary's stream as a standby sees it, from ``states.py``'s docstring alone (the
    standby answers the Hello at once, so the handshake state is never seen)."""

    def __init__(self) -> None:
        self.state = "idle"
        self.last_epoch: int | None = None
        self.open: int | None = None
        self.pages = self.output = 0
        self.beat: int | None = None

    def accepts(self, e: Event) -> bool:
        """Whether ``e`` is legal now; if so, apply it."""
        s, t = self.state, type(e)
        if s == "idle":
            if t is Hello and e.role == "primary":  # type: ignore[attr-defined]
                self.state = "syncing"
                return True
            return False
        if s == "closed":
            return False
        if t is Heartbeat:
            if self.beat is not None and e.seq <= self.beat:  # type: ignore[attr-defined]
                return False
            self.beat = e.seq  # type: ignore[attr-defined]
            return True
        if t in (Failover, Goodbye):
            self.state = "closed"
            return True
        advances = isinstance(e, (EpochBegin, Checkpoint)) and (
            self.last_epoch is None or e.epoch > self.last_epoch)
        if s == "syncing" and t is EpochBegin and advances:
            self.state, self.open, self.last_epoch, self.pages = "in_epoch", e.epoch, e.epoch, 0
            return True
        if s == "syncing" and isinstance(e, Checkpoint) and advances \
                and e.output_seq >= self.output:
            self.last_epoch, self.output = e.epoch, e.output_seq
            return True
        if s == "in_epoch" and isinstance(e, (Pages, MachineBlob)) and e.epoch == self.open:
            self.pages += e.n_pages if isinstance(e, Pages) else 0
            return True
        if s == "in_epoch" and isinstance(e, EpochEnd) and e.epoch == self.open \
                and e.n_pages == self.pages and e.output_seq >= self.output:
            self.state, self.open, self.output = "syncing", None, e.output_seq
            return True
        return False


#: Epochs the primary has sent (and ended) once its Hello is accepted, for Acks to name.
SENT_EPOCHS = 3


@st.composite
def standby_sessions(draw: Any) -> list[Event]:
    """A legal stream from the standby: HelloAck, then Acks, Resyncs, heartbeats, an ending."""
    out: list[Event] = [HelloAck(session_id=SESSION, accepted=True)]
    acked = beat = 0
    for _ in range(draw(st.integers(0, 6))):
        what = draw(st.sampled_from(["ack", "resync", "beat"]))
        if what == "ack" and acked < SENT_EPOCHS:
            acked = draw(st.integers(acked + 1, SENT_EPOCHS))
            out.append(Ack(epoch=acked))
        elif what == "resync":
            out.append(Resync(epoch=draw(st.integers(0, SENT_EPOCHS)), reason="digest"))
        else:
            beat += draw(st.integers(1, 3))
            out.append(Heartbeat(seq=beat, sent_ns=0))
    end = draw(st.sampled_from([None, "failover", "goodbye"]))
    if end:
        out.append(Failover(reason="took over") if end == "failover" else Goodbye(reason="bye"))
    return out


class StandbyStreamModel:
    """The standby's stream as the primary sees it once it sent its Hello (and, when the
    HelloAck accepted it, epochs 1..SENT_EPOCHS)."""

    def __init__(self) -> None:
        self.state = "handshake"
        self.acked: int | None = None
        self.beat: int | None = None

    def accepts(self, e: Event) -> bool:
        s = self.state
        if s == "handshake":
            if isinstance(e, HelloAck) and e.session_id == SESSION:
                self.state = "syncing" if e.accepted else "closed"
                return True
            if isinstance(e, Goodbye):
                self.state = "closed"
                return True
            return False
        if s == "closed":
            return False
        if isinstance(e, Ack):
            if e.epoch > SENT_EPOCHS or (self.acked is not None and e.epoch <= self.acked):
                return False
            self.acked = e.epoch
            return True
        if isinstance(e, Resync):
            return e.epoch <= SENT_EPOCHS
        if isinstance(e, Heartbeat):
            if self.beat is not None and e.seq <= self.beat:
                return False
            self.beat = e.seq
            return True
        if isinstance(e, (Failover, Goodbye)):
            self.state = "closed"
            return True
        return False


@st.composite
def perturbed(draw: Any, events: list[Event]) -> list[Event]:
    """``events`` with one thing out of order: two swapped, one dropped, repeated or moved,
    or a foreign event (any type, any values) inserted."""
    ev = list(events)
    i = draw(st.integers(0, len(ev) - 1))
    op = draw(st.sampled_from(["swap", "drop", "repeat", "move", "insert"]))
    if op == "swap" and len(ev) > 1:
        j = draw(st.integers(0, len(ev) - 1))
        ev[i], ev[j] = ev[j], ev[i]
    elif op == "drop":
        del ev[i]
    elif op == "repeat":
        ev.insert(draw(st.integers(i + 1, len(ev))), ev[i])
    elif op == "move":
        e = ev.pop(i)
        ev.insert(draw(st.integers(0, len(ev))), e)
    else:
        ev.insert(i + draw(st.integers(0, 1)), draw(any_event, label="foreign"))
    return ev


def feed(conn: Connection, model: Any, events: list[Event],
         on_accept: Any = lambda e: None) -> int:
    """Send each event as the next frame; the Connection must agree with ``model``. Returns
    the number of events accepted before the first refused one (or all)."""
    for seq, e in enumerate(events):
        legal = model.accepts(e)
        conn.receive_data(frame(e, seq))
        if legal:
            assert conn.next_event() == e, e
            on_accept(e)
            continue
        with pytest.raises(RemoteProtocolError, match="illegal event"):
            conn.next_event()
        assert conn.our_state is ERROR and conn.their_state is ERROR
        with pytest.raises(RemoteProtocolError):  # refused for good, whatever comes next
            conn.next_event()
        with pytest.raises(LocalProtocolError):
            conn.receive_data(frame(e, seq + 1))
        return seq
    return len(events)


def standby_receiver() -> tuple[Connection, Any]:
    conn = Connection("standby", KEY)

    def answer(e: Event) -> None:
        if isinstance(e, Hello):
            conn.send(HelloAck(session_id=e.session_id, accepted=True))
    return conn, answer


def primary_receiver() -> tuple[Connection, Any]:
    conn = Connection("primary", KEY)
    conn.send(Hello(role="primary", version=PROTOCOL_VERSION, session_id=SESSION, config=b"{}"))

    def epochs(e: Event) -> None:
        if isinstance(e, HelloAck) and e.accepted:
            for n in range(1, SENT_EPOCHS + 1):
                conn.send(EpochBegin(epoch=n, kind="full" if n == 1 else "delta"))
                conn.send(EpochEnd(epoch=n, n_pages=0, output_seq=n))
    return conn, epochs


@FEW
@given(events=primary_sessions())
def test_a_legal_primary_stream_is_accepted_whole(events: list[Event]) -> None:
    conn, answer = standby_receiver()
    assert feed(conn, PrimaryStreamModel(), events, answer) == len(events)
    conn.receive_data(b"")
    closed = conn.next_event()
    assert isinstance(closed, ConnectionClosed)
    assert closed.clean == isinstance(events[-1], (Failover, Goodbye))


@FEW
@given(events=standby_sessions())
def test_a_legal_standby_stream_is_accepted_whole(events: list[Event]) -> None:
    conn, epochs = primary_receiver()
    assert feed(conn, StandbyStreamModel(), events, epochs) == len(events)


@PROPS
@given(data=st.data())
def test_a_standby_refuses_every_out_of_order_primary_event(data: Any) -> None:
    events = data.draw(perturbed(data.draw(primary_sessions(), label="legal")), label="sent")
    conn, answer = standby_receiver()
    feed(conn, PrimaryStreamModel(), events, answer)


@PROPS
@given(data=st.data())
def test_a_primary_refuses_every_out_of_order_standby_event(data: Any) -> None:
    events = data.draw(perturbed(data.draw(standby_sessions(), label="legal")), label="sent")
    conn, epochs = primary_receiver()
    feed(conn, StandbyStreamModel(), events, epochs)


HELLO = Hello(role="primary", version=PROTOCOL_VERSION, session_id=SESSION, config=b"{}")


@pytest.mark.parametrize("legal,bad", [
    ([HELLO], Ack(epoch=1)),                                       # the standby's event
    ([], EpochBegin(epoch=1, kind="full")),                        # before the Hello
    ([HELLO, EpochBegin(epoch=1, kind="full")], EpochBegin(epoch=2, kind="full")),  # nested
    ([HELLO, EpochBegin(epoch=2, kind="full"), EpochEnd(epoch=2, n_pages=0, output_seq=0)],
     EpochBegin(epoch=2, kind="delta")),                           # an epoch again
    ([HELLO], EpochEnd(epoch=1, n_pages=0, output_seq=0)),         # an end without a begin
    ([HELLO, EpochBegin(epoch=1, kind="full")], EpochEnd(epoch=1, n_pages=1, output_seq=0)),
    ([HELLO], small_pages(1, 1)),                                  # pages outside an epoch
    ([HELLO, Heartbeat(seq=5, sent_ns=0)], Heartbeat(seq=5, sent_ns=1)),  # a beat repeated
    ([HELLO, Goodbye(reason="")], Heartbeat(seq=1, sent_ns=0)),    # after the end
    ([HELLO], HELLO),                                              # a second Hello
], ids=["ack", "begin-before-hello", "nested", "epoch-again", "end-alone", "miscount",
        "pages-outside", "beat-repeat", "after-goodbye", "second-hello"])
def test_the_model_and_the_connection_refuse_known_out_of_order_events(
        legal: list[Event], bad: Event) -> None:
    """The model is not vacuous: it refuses these, and the Connection with it."""
    conn, answer = standby_receiver()
    assert feed(conn, PrimaryStreamModel(), [*legal, bad], answer) == len(legal)
