"""Connection end to end in memory: sessions, splits, statistics, and every way input goes bad."""
from __future__ import annotations

import os
import random
import struct
import sys
from collections.abc import Callable

import numpy as np
import pytest

from dirtyring.errors import LocalProtocolError, RemoteProtocolError
from dirtyring.wire import (
    CLOSED, ERROR, HANDSHAKE, IDLE, IN_EPOCH, NEED_DATA, SYNCING, Ack, Connection,
    ConnectionClosed, EpochBegin, EpochEnd, Event, Failover, Goodbye, Heartbeat, MachineBlob,
    Pages, Resync, Role,
)
from dirtyring.wire.codec import HEADER_LEN, encode_event, frame_parts

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # wire_helpers sits beside the tests; works in any import mode
    sys.path.insert(0, _HERE)
from wire_helpers import (  # noqa: E402
    KEY, NONCE, SESSION, ConnectionPair, all_events_in_order, hello, hello_ack, mixed_pages,
)

SPLITS: dict[str, Callable[[bytes], list[bytes]]] = {
    "whole": lambda b: [b],
    "bytewise": lambda b: [b[i:i + 1] for i in range(len(b))],
    "halves": lambda b: [b[:len(b) // 2], b[len(b) // 2:]],
}


@pytest.mark.parametrize("split", SPLITS, ids=list(SPLITS))
def test_full_session_every_event_type(split: str) -> None:
    pair = ConnectionPair()
    small = split == "bytewise"
    for sender, event in all_events_in_order():
        if small and isinstance(event, Pages):  # keep byte-by-byte feeding quick
            event = mixed_pages(1, n=6)
        if small and isinstance(event, EpochEnd) and event.epoch == 1:
            event = EpochEnd(epoch=1, n_pages=6, digest=event.digest, output_seq=9)
        conn = pair.primary if sender == "primary" else pair.standby
        pair.send(conn, event, SPLITS[split])
    assert pair.primary.our_state is CLOSED and pair.standby.our_state is CLOSED
    assert pair.primary.statistics().frames_out == pair.standby.statistics().frames_in


def test_pipelined_stream_with_trailing_bytes_in_every_chunk() -> None:
    """All of a session's primary frames in one stream, cut at random points."""
    pair = ConnectionPair()
    pair.handshake()
    sent: list[Event] = []
    stream = b""
    for epoch in (1, 2, 3):
        p = mixed_pages(epoch, n=12, seed=epoch)
        for ev in (EpochBegin(epoch=epoch, kind="delta"), p, MachineBlob(epoch=epoch, blob=b"s"),
                   Heartbeat(seq=epoch, sent_ns=epoch),
                   EpochEnd(epoch=epoch, n_pages=12, output_seq=epoch)):
            stream += pair.primary.send(ev)
            sent.append(ev)
    rng = random.Random(11)
    got: list[object] = []
    pos = 0
    while pos < len(stream):
        step = rng.choice([1, 7, HEADER_LEN + 1, 5000, 70000])
        pair.standby.receive_data(stream[pos:pos + step])
        pos += step
        while (out := pair.standby.next_event()) is not NEED_DATA:
            got.append(out)
    assert got == sent
    pair.send(pair.standby, Ack(epoch=3))  # cumulative ack of all three


def test_ack_crossing_the_next_epoch() -> None:
    pair = ConnectionPair()
    pair.handshake()
    pair.one_epoch(1)
    pair.send(pair.primary, EpochBegin(epoch=2, kind="delta"))
    assert pair.primary.our_state is IN_EPOCH
    pair.send(pair.standby, Ack(epoch=1))
    assert pair.primary.our_state is IN_EPOCH


# ------------------------------------------------------------------------------ resync


def resynced(split: Callable[[bytes], list[bytes]] = SPLITS["whole"]) -> ConnectionPair:
    """Two epochs, both acked, then the standby's Resync naming the first (already acked)."""
    pair = ConnectionPair()
    pair.handshake()
    pair.one_epoch(1)
    pair.one_epoch(2)
    pair.send(pair.standby, Ack(epoch=2))
    pair.send(pair.standby, Resync(epoch=1, reason="digest mismatch"), split)
    assert pair.standby.our_state is SYNCING and pair.primary.their_state is SYNCING
    return pair


@pytest.mark.parametrize("split", SPLITS, ids=list(SPLITS))
def test_full_epoch_after_resync_is_accepted(split: str) -> None:
    pair = resynced(SPLITS[split])
    pair.send(pair.primary, EpochBegin(epoch=3, kind="full"), SPLITS[split])
    p = mixed_pages(3, n=6)
    pair.send(pair.primary, p, SPLITS[split])
    pair.send(pair.primary, EpochEnd(epoch=3, n_pages=6, output_seq=3), SPLITS[split])
    pair.send(pair.standby, Ack(epoch=3))
    pair.send(pair.standby, Resync(epoch=3, reason="still wrong"))  # may be asked again
    pair.send(pair.primary, EpochBegin(epoch=4, kind="full"))
    pair.send(pair.primary, EpochEnd(epoch=4, n_pages=0, output_seq=4))
    pair.one_epoch(5)  # deltas again once a full epoch followed the Resync
    assert pair.primary.our_state is SYNCING and pair.standby.statistics().frames_in == 18


def test_delta_after_resync_is_refused_at_send() -> None:
    pair = resynced()
    with pytest.raises(LocalProtocolError, match="EpochBegin.kind='delta'. for epoch 3 while a "
                                                 "Resync is pending.*kind='full'"):
        pair.primary.send(EpochBegin(epoch=3, kind="delta"))
    assert pair.primary.our_state is ERROR and "Resync is pending" in str(pair.primary.error)


def test_resync_crossing_a_delta_epoch_in_flight() -> None:
    """The standby's Resync and the primary's next delta epoch cross on the wire: both legal.

    Only epochs the primary begins *after* it has processed the Resync must be full; the standby
    cannot tell which those are, so it accepts the early delta (and must not trust it)."""
    pair = ConnectionPair()
    pair.handshake()
    pair.one_epoch(1)
    in_flight = pair.primary.send(EpochBegin(epoch=2, kind="delta"))
    resync = pair.standby.send(Resync(epoch=1, reason="digest mismatch"))
    pair.standby.receive_data(in_flight)
    assert pair.standby.next_event() == EpochBegin(epoch=2, kind="delta")
    pair.primary.receive_data(resync)
    assert pair.primary.next_event() == Resync(epoch=1, reason="digest mismatch")
    pair.send(pair.primary, mixed_pages(2, n=3))  # the open delta epoch may still finish
    pair.send(pair.primary, EpochEnd(epoch=2, n_pages=3, output_seq=2))
    pair.send(pair.standby, Ack(epoch=2))
    with pytest.raises(LocalProtocolError, match="while a Resync is pending"):
        pair.primary.send(EpochBegin(epoch=3, kind="delta"))


def test_hello_ack_nonce_reaches_the_primary() -> None:
    pair = ConnectionPair()
    pair.send(pair.primary, hello())
    data = pair.send(pair.standby, hello_ack(nonce=NONCE))
    assert NONCE in data and pair.primary.our_state is SYNCING


def test_states_through_the_handshake() -> None:
    pair = ConnectionPair()
    p, s = pair.primary, pair.standby
    assert (p.our_state, p.their_state, s.our_state) == (IDLE, IDLE, IDLE)
    pair.send(p, hello())
    assert (p.our_state, s.our_state, s.their_state) == (HANDSHAKE, HANDSHAKE, HANDSHAKE)
    assert p.session_id == s.session_id == SESSION
    pair.send(s, hello_ack())
    assert (p.our_state, p.their_state, s.our_state) == (SYNCING, SYNCING, SYNCING)
    assert p.our_role is Role.PRIMARY and p.their_role is Role.STANDBY


def test_rejected_hello() -> None:
    pair = ConnectionPair()
    pair.send(pair.primary, hello())
    pair.send(pair.standby, hello_ack(accepted=False))
    assert pair.primary.our_state is CLOSED and pair.primary.their_state is CLOSED
    with pytest.raises(LocalProtocolError, match="EpochBegin from primary .* state CLOSED"):
        pair.primary.send(EpochBegin(epoch=1, kind="full"))


def test_statistics_and_compression_ratio() -> None:
    pair = ConnectionPair()
    pair.handshake()
    p = Pages(epoch=1, slot=0, page_size=4096, pages=np.arange(256),
              data=bytes(128 * 4096) + b"xy" * (64 * 4096))
    pair.one_epoch(1, p)
    out, inn = pair.primary.statistics(), pair.standby.statistics()
    assert out.frames_out == inn.frames_in == 5 and out.frames_in == inn.frames_out == 1
    assert out.bytes_out == inn.bytes_in and out.bytes_in == inn.bytes_out
    assert out.page_bytes_raw_out == inn.page_bytes_raw_in == 256 * 4096
    assert out.page_bytes_wire_out == inn.page_bytes_wire_in < 4096
    assert out.compression_ratio_out == inn.compression_ratio_in > 250
    assert out.compression_ratio_in == 1.0 and out.bytes_buffered == 0
    with pytest.raises(AttributeError):
        out.frames_out = 0  # type: ignore[misc]


def test_send_parts_is_send_split_up() -> None:
    a, b = ConnectionPair(), ConnectionPair()
    for pair in (a, b):
        pair.handshake()
        pair.send(pair.primary, EpochBegin(epoch=1, kind="full"))
    p = mixed_pages(1, n=96)
    parts = a.primary.send_parts(p)
    assert b"".join(parts) == b.primary.send(p)
    assert any(isinstance(x, memoryview) and x.obj is p.data for x in parts)


# ------------------------------------------------------------------------------ EOF


def test_clean_and_unclean_eof() -> None:
    pair = ConnectionPair()
    pair.handshake()
    pair.send(pair.primary, Goodbye(reason="done"))
    pair.standby.receive_data(b"")
    assert pair.standby.next_event() == ConnectionClosed(clean=True)
    assert pair.standby.next_event() == ConnectionClosed(clean=True)  # idempotent
    with pytest.raises(LocalProtocolError, match="after EOF"):
        pair.standby.receive_data(b"x")

    pair = ConnectionPair()
    pair.handshake()
    pair.primary.receive_data(b"")
    assert pair.primary.next_event() == ConnectionClosed(clean=False)


def test_failover_closes_the_sender() -> None:
    pair = ConnectionPair()
    pair.handshake()
    pair.send(pair.standby, Failover(reason="took over"))
    assert pair.standby.our_state is CLOSED and pair.primary.their_state is CLOSED
    pair.send(pair.primary, Heartbeat(seq=1, sent_ns=1))  # the primary may still speak
    pair.standby.receive_data(b"")
    with pytest.raises(LocalProtocolError, match="illegal in state CLOSED"):
        pair.standby.send(Heartbeat(seq=1, sent_ns=1))


# ------------------------------------------------------------------------------ remote errors


def flip(data: bytes, offset: int) -> bytes:
    b = bytearray(data)
    b[offset] ^= 0x10
    return bytes(b)


def hello_frame(key: bytes = KEY) -> bytes:
    return b"".join(encode_event(hello(), 0, key))


def started() -> ConnectionPair:
    pair = ConnectionPair()
    pair.handshake()
    return pair


def case_reordered() -> tuple[Connection, bytes]:
    pair = started()
    pair.primary.send(EpochBegin(epoch=1, kind="full"))
    return pair.standby, pair.primary.send(Heartbeat(seq=1, sent_ns=0))


def case_ack_before_end() -> tuple[Connection, bytes]:
    pair = started()
    pair.send(pair.primary, EpochBegin(epoch=1, kind="full"))
    return pair.primary, b"".join(encode_event(Ack(epoch=1), 1, KEY))


def case_resync_before_hello_ack() -> tuple[Connection, bytes]:
    primary = Connection("primary", KEY)
    primary.send(hello())
    return primary, b"".join(encode_event(Resync(epoch=0, reason="x"), 0, KEY))


def case_resync_before_end() -> tuple[Connection, bytes]:
    pair = started()
    pair.send(pair.primary, EpochBegin(epoch=1, kind="full"))
    return pair.primary, b"".join(encode_event(Resync(epoch=1, reason="x"), 1, KEY))


def case_pages_outside_epoch() -> tuple[Connection, bytes]:
    pair = started()
    return pair.standby, b"".join(encode_event(mixed_pages(1, n=3), 1, KEY))


def fresh_standby() -> Connection:
    return Connection("standby", KEY)


def oversize_header() -> bytes:
    return struct.pack("!4sHHIQI", b"DRW1", 1, 8, 1 << 30, 0, 0)


# (name, make () -> (receiver, bytes, eof?), message needle). A few categories are shared on
# purpose: a flipped MAC bit is indistinguishable from a wrong key, and a flipped header bit
# from a flipped body bit; everything else has its own message.
REMOTE_ERRORS: list[tuple[str, Callable[[], tuple[Connection, bytes, bool]]]] = [
    ("authentication failed", lambda: (fresh_standby(), hello_frame(b"K" * 32), False)),
    ("authentication failed", lambda: (fresh_standby(), flip(hello_frame(), -1), False)),
    ("corrupt frame", lambda: (fresh_standby(), flip(hello_frame(), HEADER_LEN + 3), False)),
    ("corrupt frame", lambda: (fresh_standby(), flip(hello_frame(), 19), False)),
    ("corrupt frame", lambda: (fresh_standby(), flip(hello_frame(), 21), False)),
    ("bad magic", lambda: (fresh_standby(), flip(hello_frame(), 1), False)),
    ("bad magic", lambda: (fresh_standby(), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", False)),
    ("unsupported wire version 17", lambda: (fresh_standby(), flip(hello_frame(), 5), False)),
    ("oversize frame", lambda: (fresh_standby(), oversize_header(), False)),
    ("truncated frame at EOF", lambda: (fresh_standby(), hello_frame()[:-1], True)),
    ("truncated frame at EOF", lambda: (fresh_standby(), hello_frame()[:HEADER_LEN - 2], True)),
    ("replayed frame", lambda: (fresh_standby(), hello_frame() * 2, False)),
    ("out-of-order frame", lambda: case_reordered() + (False,)),
    ("a session has exactly one Hello",
     lambda: (started().standby, b"".join(encode_event(hello(), 1, KEY)), False)),
    ("Ack for epoch 1 which has not ended", lambda: case_ack_before_end() + (False,)),
    ("Resync from standby is illegal in state HANDSHAKE",
     lambda: case_resync_before_hello_ack() + (False,)),
    ("Resync for epoch 1 which has not ended", lambda: case_resync_before_end() + (False,)),
    ("pages belong inside an epoch", lambda: case_pages_outside_epoch() + (False,)),
    ("heartbeats start after the handshake",
     lambda: (fresh_standby(), b"".join(encode_event(Heartbeat(seq=0, sent_ns=0), 0, KEY)),
              False)),
    ("unknown frame type 99",
     lambda: (fresh_standby(), b"".join(frame_parts(99, 0, [], KEY)), False)),
]


@pytest.mark.parametrize("needle,make", REMOTE_ERRORS,
                         ids=[f"{i}-{n[:24]}" for i, (n, _) in enumerate(REMOTE_ERRORS)])
def test_bad_input_raises_remote_error_and_enters_error(
        needle: str, make: Callable[[], tuple[Connection, bytes, bool]]) -> None:
    conn, data, eof = make()
    with pytest.raises(RemoteProtocolError, match=needle) as info:
        conn.receive_data(data)
        if eof:
            conn.receive_data(b"")
        for _ in range(3):
            conn.next_event()
    assert conn.our_state is ERROR and conn.their_state is ERROR
    assert conn.error == str(info.value)
    assert conn.statistics().bytes_buffered == 0
    with pytest.raises(RemoteProtocolError, match="connection is in ERROR"):
        conn.next_event()
    with pytest.raises(LocalProtocolError, match="connection is in ERROR"):
        conn.receive_data(b"more")
    with pytest.raises(LocalProtocolError, match="connection is in ERROR"):
        conn.send(Goodbye())


def test_remote_error_messages_are_distinct_per_category() -> None:
    """Each message matches its own category's needle and no other category's."""
    needles = sorted({n for n, _ in REMOTE_ERRORS})
    for needle, make in REMOTE_ERRORS:
        conn, data, eof = make()
        with pytest.raises(RemoteProtocolError) as info:
            conn.receive_data(data)
            if eof:
                conn.receive_data(b"")
            for _ in range(3):
                conn.next_event()
        assert [n for n in needles if n in str(info.value)] == [needle]


# ------------------------------------------------------------------------------ local errors


def test_illegal_send_raises_local_error_and_enters_error() -> None:
    conn = Connection("primary", KEY)
    with pytest.raises(LocalProtocolError, match="EpochBegin from primary .* state IDLE"):
        conn.send(EpochBegin(epoch=1, kind="full"))
    assert conn.our_state is ERROR
    with pytest.raises(LocalProtocolError, match="connection is in ERROR"):
        conn.send(hello())


@pytest.mark.parametrize("role,event,needle", [
    ("standby", hello(), "Hello from standby is illegal"),
    ("primary", ConnectionClosed(clean=True), "not a wire event"),
    ("primary", "Hello", "str is not a wire event"),
    ("standby", Ack(epoch=0), "Ack from standby is illegal in state IDLE"),
    ("standby", Resync(epoch=0, reason=""), "Resync from standby is illegal in state IDLE"),
    ("primary", Resync(epoch=0, reason=""), "Resync from primary is illegal in state IDLE"),
])
def test_more_illegal_sends(role: str, event: Event, needle: str) -> None:
    with pytest.raises(LocalProtocolError, match=needle):
        Connection(role, KEY).send(event)


def test_resync_is_refused_during_the_handshake_and_before_any_epoch_ended() -> None:
    standby = Connection("standby", KEY)
    standby.receive_data(hello_frame())
    assert standby.next_event() == hello()
    with pytest.raises(LocalProtocolError, match="Resync from standby is illegal in state "
                                                 "HANDSHAKE: only the standby sends Resync"):
        standby.send(Resync(epoch=0, reason="x"))
    pair = started()
    pair.send(pair.primary, EpochBegin(epoch=1, kind="full"))
    with pytest.raises(LocalProtocolError, match="Resync for epoch 1 which has not ended "
                                                 r"\(last ended epoch: none\)"):
        pair.standby.send(Resync(epoch=1, reason="x"))
    assert pair.standby.our_state is ERROR


def test_primary_cannot_send_resync() -> None:
    pair = started()
    pair.one_epoch(1)
    with pytest.raises(LocalProtocolError, match="Resync from primary is illegal in state SYNCING"):
        pair.primary.send(Resync(epoch=1, reason="x"))


def test_second_hello_cannot_be_sent() -> None:
    pair = started()
    with pytest.raises(LocalProtocolError, match="exactly one Hello"):
        pair.primary.send(hello())


def test_epoch_end_must_count_the_pages() -> None:
    pair = started()
    pair.send(pair.primary, EpochBegin(epoch=1, kind="full"))
    pair.send(pair.primary, mixed_pages(1, n=6))
    with pytest.raises(LocalProtocolError, match="says 5 pages but epoch 1 carried 6"):
        pair.primary.send(EpochEnd(epoch=1, n_pages=5, output_seq=0))


@pytest.mark.parametrize("kw,needle", [
    (dict(role="primary", key=b""), "insecure=True"),
    (dict(role="primary", key=b"short"), "at least 16"),
    (dict(role="primary", key="x" * 32), "key must be bytes"),
    (dict(role="leader", key=KEY), "role must be"),
    (dict(role="primary", key=KEY, compress_level=10), "compress_level"),
    (dict(role="primary", key=KEY, max_frame_size=0), "max_frame_size"),
])
def test_constructor_checks(kw: dict[str, object], needle: str) -> None:
    with pytest.raises(LocalProtocolError, match=needle):
        Connection(**kw)  # type: ignore[arg-type]


def test_insecure_empty_key_works_between_insecure_peers() -> None:
    pair = ConnectionPair(key=b"", insecure=True)
    pair.handshake()
    pair.one_epoch(1)
    secure = Connection("standby", KEY)
    secure.receive_data(Connection("primary", b"", insecure=True).send(hello()))
    with pytest.raises(RemoteProtocolError, match="authentication failed"):
        secure.next_event()


def test_frames_above_the_cap_are_refused_both_ways() -> None:
    pair = ConnectionPair(max_frame_size=8192)
    pair.handshake()
    pair.send(pair.primary, EpochBegin(epoch=1, kind="full"))
    with pytest.raises(LocalProtocolError, match="split it"):
        pair.primary.send(MachineBlob(epoch=1, blob=os.urandom(9000)))
    assert pair.primary.our_state is ERROR

    roomy = started()
    small = Connection("standby", KEY, max_frame_size=100)
    small.receive_data(hello_frame())
    assert small.next_event() == hello()
    small.send(hello_ack())
    small.receive_data(roomy.primary.send(Goodbye(reason="x" * 200))[:HEADER_LEN])
    with pytest.raises(RemoteProtocolError, match="oversize frame: body length 200"):
        small.next_event()


def test_frame_ready_says_whether_next_event_has_a_whole_frame() -> None:
    from dirtyring.wire import PRIMARY, STANDBY, Connection, Hello, WIRE_VERSION
    key = b"k" * 32
    p, s = Connection(PRIMARY, key), Connection(STANDBY, key)
    wire = p.send(Hello(role="primary", version=WIRE_VERSION, session_id=b"s" * 16,
                        config=b"{}"))
    assert not s.frame_ready()
    s.receive_data(wire[:10])
    assert not s.frame_ready()          # not even the header
    s.receive_data(wire[10:-1])
    assert not s.frame_ready()          # all but the last MAC byte
    s.receive_data(wire[-1:])
    assert s.frame_ready()
    assert isinstance(s.next_event(), Hello)
    assert not s.frame_ready()


def _bound_pair(key: bytes, nonce: bytes, sid: bytes = b"s" * 16):
    from dirtyring.wire import PRIMARY, STANDBY, Connection, Hello, HelloAck, WIRE_VERSION
    p, s = Connection(PRIMARY, key), Connection(STANDBY, key)
    hello = p.send(Hello(role="primary", version=WIRE_VERSION, session_id=sid, config=b"{}"))
    s.receive_data(hello)
    s.next_event()
    p.receive_data(s.send(HelloAck(session_id=sid, accepted=True, nonce=nonce)))
    p.next_event()
    return p, s, hello


def test_a_nonce_binds_the_session_key_and_frames_still_flow() -> None:
    from dirtyring.wire import EpochBegin, EpochEnd
    p, s, _ = _bound_pair(b"k" * 32, b"n" * 16)
    assert p.session_bound and s.session_bound
    s.receive_data(p.send(EpochBegin(epoch=1, kind="full"))
                   + p.send(EpochEnd(epoch=1, n_pages=0, output_seq=0)))
    assert isinstance(s.next_event(), EpochBegin)
    assert isinstance(s.next_event(), EpochEnd)


def test_a_recorded_session_replayed_to_a_new_standby_fails_authentication() -> None:
    """Same shared key, same session id, same Hello: only the standby's nonce differs, and the
    replayed frames after the handshake are refused."""
    import pytest
    from dirtyring.errors import RemoteProtocolError
    from dirtyring.wire import STANDBY, Connection, EpochBegin, HelloAck
    key = b"k" * 32
    p, _, hello = _bound_pair(key, b"a" * 16)
    recorded = p.send(EpochBegin(epoch=1, kind="full"))
    victim = Connection(STANDBY, key)
    victim.receive_data(hello)
    victim.next_event()
    victim.send(HelloAck(session_id=b"s" * 16, accepted=True, nonce=b"b" * 16))
    victim.receive_data(recorded)
    with pytest.raises(RemoteProtocolError, match="authentication failed"):
        victim.next_event()


def test_without_a_nonce_the_shared_key_stays_in_use() -> None:
    p, s, _ = _bound_pair(b"k" * 32, b"")
    assert not p.session_bound and not s.session_bound
