"""BATCH frames: several events under one header, CRC and MAC, each still checked by the state
machine as if sent alone; a bad batch is refused whole."""
from __future__ import annotations

import struct

import numpy as np
import pytest

from dirtyring.errors import LocalProtocolError, RemoteProtocolError
from dirtyring.wire import (NEED_DATA, PRIMARY, STANDBY, Connection, EpochBegin, EpochEnd,
                            Hello, HelloAck, MachineBlob, Pages, WIRE_VERSION)
from dirtyring.wire.codec import FrameType, frame_parts

KEY = b"k" * 32
SID = b"s" * 16


def pair() -> tuple[Connection, Connection]:
    p, s = Connection(PRIMARY, KEY), Connection(STANDBY, KEY)
    s.receive_data(p.send(Hello(role="primary", version=WIRE_VERSION, session_id=SID,
                                config=b"{}")))
    s.next_event()
    p.receive_data(s.send(HelloAck(session_id=SID, accepted=True, nonce=b"n" * 16)))
    p.next_event()
    return p, s


def epoch(e: int, n: int = 3, noise: bool = False) -> list:
    data = np.zeros((n, 4096), np.uint8)
    if noise:  # incompressible: the Pages body is as big as its pages
        data[:] = np.random.default_rng(e).integers(0, 256, data.shape, dtype=np.uint8)
    data[:, :8] = e
    return [EpochBegin(epoch=e, kind="full" if e == 1 else "delta"),
            Pages(epoch=e, slot=1, page_size=4096, pages=np.arange(n), data=data.tobytes(),
                  delta=e > 1),
            MachineBlob(epoch=e, blob=b"state" * 100),
            EpochEnd(epoch=e, n_pages=n, output_seq=0)]


def drain(s: Connection) -> list:
    out = []
    while (ev := s.next_event()) is not NEED_DATA:
        out.append(ev)
    return out


def test_an_epoch_goes_in_one_frame_and_comes_out_event_by_event() -> None:
    p, s = pair()
    evs = epoch(1) + epoch(2)
    parts = p.send_batch(evs)
    wire = b"".join(bytes(memoryview(x).cast("B")) for x in parts)
    assert p.last_frame_size == len(wire)
    assert struct.unpack_from("!H", wire, 6)[0] == FrameType.BATCH
    assert p.statistics().frames_out == 2  # the Hello, then one batch for both epochs
    s.receive_data(wire)
    assert s.frame_ready()
    got = drain(s)
    assert got == evs
    assert s.statistics().frames_in == 2 and not s.frame_ready()


def test_big_events_and_lone_events_get_frames_of_their_own() -> None:
    p, s = pair()
    evs = epoch(1, n=64, noise=True)
    parts = p.send_batch(evs, max_body=64 * 1024)  # the 256 KiB Pages can't join the batch
    s.receive_data(b"".join(bytes(memoryview(x).cast("B")) for x in parts))
    assert drain(s) == evs
    assert s.statistics().frames_in == 1 + 3  # Hello; EpochBegin; Pages; Blob + End batched
    single = p.send_batch([EpochBegin(epoch=2, kind="full")])
    assert struct.unpack_from("!H", bytes(memoryview(single[0]).cast("B")), 6)[0] == \
        FrameType.EPOCH_BEGIN


def test_an_illegal_event_in_a_batch_is_refused_before_any_is_sent() -> None:
    p, _ = pair()
    with pytest.raises(LocalProtocolError):
        p.send_batch([EpochBegin(epoch=1, kind="full"), EpochBegin(epoch=2, kind="full")])


def forged_batch(subs: list[tuple[int, bytes]], seq: int) -> bytes:
    body = b"".join(struct.pack("!HI", t, len(b)) + b for t, b in subs)
    return b"".join(frame_parts(FrameType.BATCH, seq, [body], KEY))


@pytest.mark.parametrize("subs,match", [
    ([(FrameType.EPOCH_BEGIN, struct.pack("!QB", 1, 0)),
      (FrameType.EPOCH_BEGIN, struct.pack("!QB", 2, 0))], "illegal event in a batch"),
    ([(FrameType.HEARTBEAT, struct.pack("!QQ", 1, 1)), (FrameType.BATCH, b"")],
     "malformed BATCH"),
    ([(FrameType.HELLO_ACK, struct.pack("!16sBB", SID, 1, 0))], "malformed BATCH"),
    ([(99, b"")], "malformed BATCH"),
    ([], "malformed BATCH"),
])
def test_bad_batches_are_refused_whole(subs: list, match: str) -> None:
    # an unbound pair: forged frames are MAC'd with the shared key
    p, s = Connection(PRIMARY, KEY), Connection(STANDBY, KEY)
    s.receive_data(p.send(Hello(role="primary", version=WIRE_VERSION, session_id=SID,
                                config=b"{}")))
    s.next_event()
    p.receive_data(s.send(HelloAck(session_id=SID, accepted=True)))
    s.receive_data(forged_batch(subs, seq=1))
    with pytest.raises(RemoteProtocolError, match=match):
        s.next_event()
    assert not s.frame_ready()


def test_a_sub_frame_running_past_the_batch_is_malformed() -> None:
    s = Connection(STANDBY, KEY)
    s.receive_data(b"".join(frame_parts(
        FrameType.BATCH, 0, [struct.pack("!HI", FrameType.ACK, 100) + b"x" * 8], KEY)))
    with pytest.raises(RemoteProtocolError, match="malformed BATCH"):
        s.next_event()
