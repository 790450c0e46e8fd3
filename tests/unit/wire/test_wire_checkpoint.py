"""Checkpoint: a whole epoch in one event. It must mean exactly what EpochBegin, Pages,
MachineBlob and EpochEnd mean together, pass the same rules, and be refused whole when any part
of it is malformed; several of them pack into one frame with per-epoch byte counts."""
from __future__ import annotations

import struct

import numpy as np
import pytest

from dirtyring.errors import LocalProtocolError, RemoteProtocolError
from dirtyring.wire import (NEED_DATA, PRIMARY, STANDBY, Ack, Checkpoint, Connection, EpochBegin,
                            EpochEnd, Hello, HelloAck, MachineBlob, Pages, Resync, WIRE_VERSION)
from dirtyring.wire.codec import FrameType, encode_body, encode_event, frame_parts

KEY = b"k" * 32
SID = b"s" * 16


def pair(nonce: bytes = b"n" * 16) -> tuple[Connection, Connection]:
    p, s = Connection(PRIMARY, KEY), Connection(STANDBY, KEY)
    s.receive_data(p.send(Hello(role="primary", version=WIRE_VERSION, session_id=SID,
                                config=b"{}")))
    s.next_event()
    p.receive_data(s.send(HelloAck(session_id=SID, accepted=True, nonce=nonce)))
    p.next_event()
    return p, s


def pages(epoch: int, slot: int = 1, first: int = 0, n: int = 2, fill: int = 7) -> Pages:
    data = np.zeros((n, 4096), np.uint8)
    data[:, 100] = fill  # a delta that changed one byte per page: sparse on the wire
    return Pages(epoch=epoch, slot=slot, page_size=4096, pages=np.arange(first, first + n),
                 data=data.tobytes(), delta=True)


def cp(epoch: int, kind: str = "delta", output_seq: int = 0, blob: bytes = b"state" * 9,
       digest: bytes = b"d" * 32) -> Checkpoint:
    return Checkpoint(epoch=epoch, kind=kind, pages=(pages(epoch, 0, 3, 1), pages(epoch, 1)),
                      blob=blob, digest=digest, output_seq=output_seq)


def wire(parts: list) -> bytes:
    return b"".join(bytes(memoryview(x).cast("B")) for x in parts)


def drain(s: Connection) -> list:
    out = []
    while (ev := s.next_event()) is not NEED_DATA:
        out.append(ev)
    return out


# --- the event ---------------------------------------------------------------------------

def test_it_says_what_the_four_events_say() -> None:
    c = cp(5, output_seq=3)
    assert c.n_pages == 3 and c.nbytes == 3 * 4096
    assert c == cp(5, output_seq=3) and c != cp(5, output_seq=4)
    assert "state" not in repr(c)  # the blob stays out of log lines


@pytest.mark.parametrize("kw,match", [
    (dict(pages=[object()]), "tuple of Pages"),
    (dict(pages=(pages(4),)), "epoch 4 inside the checkpoint of epoch 5"),
    (dict(kind="half"), "kind must be one of"),
    (dict(digest=b"x" * 65), "digest is 65 bytes"),
    (dict(blob="text"), "blob must be bytes"),
    (dict(output_seq=-1), "output_seq=-1 out of range"),
])
def test_bad_values_are_refused_when_built(kw: dict, match: str) -> None:
    args = dict(epoch=5, kind="delta", pages=(), blob=b"", digest=b"", output_seq=0) | kw
    with pytest.raises(LocalProtocolError, match=match):
        Checkpoint(**args)  # type: ignore[arg-type]


# --- the rules ---------------------------------------------------------------------------

def test_a_checkpoint_is_a_whole_epoch_for_the_rules() -> None:
    p, s = pair()
    s.receive_data(wire(p.send_batch([cp(1, kind="full"), cp(2)])))
    got = drain(s)
    assert got == [cp(1, kind="full"), cp(2)]
    p.receive_data(s.send(Ack(epoch=2)))
    assert p.next_event().epoch == 2  # an Ack may name a checkpoint: it has ended
    # and after it the classic events go on, with the same counters
    p.send_batch([EpochBegin(epoch=3, kind="delta"), pages(3), EpochEnd(epoch=3, n_pages=2,
                                                                          output_seq=0)])


@pytest.mark.parametrize("first,then,match", [
    ([EpochBegin(epoch=1, kind="full")], cp(2), "Checkpoint from primary is illegal in state "
                                                 "IN_EPOCH: a checkpoint is a whole epoch"),
    ([cp(2)], cp(2), "Checkpoint epoch 2 does not advance"),
    ([cp(2, output_seq=5)], cp(3, output_seq=4), "output_seq 4 went back from 5"),
])
def test_it_passes_the_rules_of_the_events_it_stands_for(first: list, then: Checkpoint,
                                                         match: str) -> None:
    p, _ = pair()
    p.send_batch(first)
    with pytest.raises(LocalProtocolError, match=match):
        p.send(then)


def test_after_a_resync_only_a_full_checkpoint_is_legal_and_it_clears_the_debt() -> None:
    p, s = pair()
    s.receive_data(p.send(cp(1)))
    drain(s)
    p.receive_data(s.send(Resync(epoch=1, reason="digest mismatch")))
    p.next_event()
    assert p.resync_pending
    p2, s2 = pair()  # the same in a fresh pair, where the delta is refused
    s2.receive_data(p2.send(cp(1)))
    drain(s2)
    p2.receive_data(s2.send(Resync(epoch=1, reason="digest mismatch")))
    p2.next_event()
    with pytest.raises(LocalProtocolError, match="while a Resync is pending"):
        p2.send(cp(2))
    p.send(cp(2, kind="full"))
    assert not p.resync_pending


def test_a_standby_may_not_send_one() -> None:
    p, s = pair()
    with pytest.raises(LocalProtocolError, match="Checkpoint from standby is illegal"):
        s.send(cp(1))


# --- the body ----------------------------------------------------------------------------

def _body(c: Checkpoint) -> bytes:
    return b"".join(bytes(memoryview(b).cast("B")) for b in encode_body(c))


def _forged(body: bytes, seq: int = 1) -> bytes:
    return b"".join(frame_parts(FrameType.CHECKPOINT, seq, [body], KEY))


def _unbound() -> tuple[Connection, Connection]:
    return pair(nonce=b"")  # forged frames are MAC'd with the shared key


def _pages_body(epoch: int) -> bytes:
    return b"".join(bytes(memoryview(b).cast("B")) for b in encode_body(pages(epoch)))


HEAD = struct.Struct("!QBQHIB")


@pytest.mark.parametrize("body,match", [
    (_body(cp(1))[:-1], "malformed CHECKPOINT"),
    (_body(cp(1)) + b"\0", "trailing bytes after the last Pages"),
    (HEAD.pack(1, 1, 0, 0, 0, 65) + b"x" * 65, "digest of 65 bytes"),
    (HEAD.pack(1, 1, 0, 0, 100, 0) + b"x" * 10, "inside the digest or the machine state"),
    (HEAD.pack(1, 1, 0, 1, 0, 0) + struct.pack("!I", 9999) + b"x",
     "runs past the end of the frame"),
    (HEAD.pack(1, 1, 0, 2, 0, 0) + struct.pack("!I", len(_pages_body(1))) + _pages_body(1),
     "malformed CHECKPOINT"),  # says two Pages, carries one
    (HEAD.pack(1, 1, 0, 1, 0, 0) + struct.pack("!I", len(_pages_body(2))) + _pages_body(2),
     "Pages for epoch 2 inside the checkpoint of epoch 1"),
    (HEAD.pack(1, 7, 0, 0, 0, 0), "unknown epoch kind code 7"),
])
def test_malformed_bodies_are_refused_whole(body: bytes, match: str) -> None:
    _, s = _unbound()
    s.receive_data(_forged(body))
    with pytest.raises(RemoteProtocolError, match=match):
        s.next_event()


def test_the_page_cap_counts_every_part_together() -> None:
    c = cp(1)
    p = Connection(PRIMARY, KEY, max_frame_size=c.nbytes)
    s = Connection(STANDBY, KEY, max_frame_size=c.nbytes - 1)
    s.receive_data(p.send(Hello(role="primary", version=WIRE_VERSION, session_id=SID,
                                config=b"{}")))
    s.next_event()
    p.receive_data(s.send(HelloAck(session_id=SID, accepted=True)))
    p.next_event()
    s.receive_data(p.send(c))  # each part alone is under the receiver's cap; together not
    with pytest.raises(RemoteProtocolError, match="beyond the"):
        s.next_event()
    with pytest.raises(LocalProtocolError, match="Checkpoint carries"):
        encode_event(c, 0, KEY, max_frame_size=c.nbytes - 1)


def test_page_statistics_count_its_pages_not_its_state() -> None:
    p, s = pair()
    big_state = cp(1, blob=b"s" * 50_000)
    s.receive_data(p.send(big_state))
    assert drain(s) == [big_state]
    for st in (p.statistics(), s.statistics()):
        raw, wired = (st.page_bytes_raw_out, st.page_bytes_wire_out) if st.our_role is PRIMARY \
            else (st.page_bytes_raw_in, st.page_bytes_wire_in)
        assert raw == 3 * 4096
        assert 0 < wired < 1000  # two sparse Pages bodies; the 50 kB of state not among them


# --- several epochs in one write -----------------------------------------------------------

def test_several_epochs_share_frames_and_each_is_counted() -> None:
    p, s = pair()
    before = p.statistics().frames_out
    parts, sizes = p.send_epochs([([cp(e)], True) for e in range(1, 6)])
    data = wire(parts)
    assert p.statistics().frames_out == before + 1  # one BATCH frame for all five
    assert sum(sizes) == len(data) == p.last_frame_size
    assert all(s_ > 0 for s_ in sizes) and sizes[0] > sizes[1]  # the opener carries the frame
    s.receive_data(data)
    assert drain(s) == [cp(e) for e in range(1, 6)]


def test_an_epoch_flagged_skip_is_left_out_whole_while_a_resync_is_pending() -> None:
    p, s = pair()
    s.receive_data(p.send(cp(1)))
    drain(s)
    p.receive_data(s.send(Resync(epoch=1, reason="digest mismatch")))
    p.next_event()
    classic = [EpochBegin(epoch=3, kind="delta"), pages(3), MachineBlob(epoch=3, blob=b"x"),
               EpochEnd(epoch=3, n_pages=2, output_seq=0)]
    # (a full epoch is never flagged: it is what the Resync asks for)
    parts, sizes = p.send_epochs([([cp(2)], True), (classic, True),
                                  ([cp(4, kind="full")], False), ([cp(5)], True)])
    assert sizes[:2] == [-1, -1] and sizes[2] > 0 and sizes[3] > 0
    s.receive_data(wire(parts))
    assert drain(s) == [cp(4, kind="full"), cp(5)]


def test_big_events_still_get_frames_of_their_own() -> None:
    p, s = pair()
    noisy = np.random.default_rng(1).integers(0, 256, (64, 4096), dtype=np.uint8)
    big = Checkpoint(epoch=2, kind="delta", output_seq=0, blob=b"", digest=b"",
                     pages=(Pages(epoch=2, slot=1, page_size=4096, pages=np.arange(64),
                                  data=noisy.tobytes()),))
    parts, sizes = p.send_epochs([([cp(1)], False), ([big], False), ([cp(3)], False)],
                                 max_body=64 * 1024)
    data = wire(parts)
    assert sum(sizes) == len(data)
    assert p.statistics().frames_out == 1 + 3
    s.receive_data(data)
    assert drain(s) == [cp(1), big, cp(3)]
