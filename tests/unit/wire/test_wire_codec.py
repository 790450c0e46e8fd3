"""Frame and body encoding: exact bytes, three-way reads, page runs and compression, bad bodies."""
from __future__ import annotations

import hashlib
import hmac
import os
import struct
import sys
import zlib

import numpy as np
import pytest

from dirtyring.errors import LocalProtocolError, RemoteProtocolError
from dirtyring.wire import (
    Ack, ConnectionClosed, EpochBegin, Event, FrameType, Goodbye, Heartbeat, Hello, HelloAck,
    PageEncoding, Pages, Resync, encode_pages_parts,
)
from dirtyring.wire.codec import (
    _TYPE_OF, FRAME_OVERHEAD, HEADER_LEN, MAGIC, encode_event, frame_parts, read_frame,
)
from dirtyring.wire.pagecodec import MAX_RUN_BYTES
from dirtyring.wire.receivebuffer import ReceiveBuffer

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # wire_helpers sits beside the tests; works in any import mode
    sys.path.insert(0, _HERE)
from wire_helpers import (  # noqa: E402
    KEY, NONCE, PAGE, SESSION, all_events_in_order, feed_ways, mixed_pages, read_one,
)

# (event, sequence number, exact frame bytes with KEY = bytes(range(32))): header | body | mac.
SIMPLE_CASES: list[tuple[Event, int, str]] = [
    (Ack(epoch=7), 0,
     "44525731" "0001" "0007" "00000008" "0000000000000000" "bb0efa6f"
     "0000000000000007"
     "608dc8fd11024183dc13184bc46980808e0f59741d37c9332f16b8a5a4624218"),
    (Ack(epoch=7, token=5), 0,
     "44525731" "0001" "0007" "00000010" "0000000000000000" "f58c10ca"
     "0000000000000007" "0000000000000005"
     "d65353a253ae8fb6593bbafb28a378535019ff0ebf9dc756d84d9205ef6b4e15"),
    (Heartbeat(seq=1, sent_ns=2), 5,
     "44525731" "0001" "0008" "00000010" "0000000000000005" "b0e6dc70"
     "0000000000000001" "0000000000000002"
     "6d332dd67cef2e5e36e6f45d7c1f7c3acdb49061bdd5b0f3675b27f59e521875"),
    (Goodbye(reason="bye"), 2,
     "44525731" "0001" "000a" "00000003" "0000000000000002" "3d607b5c"
     "627965"
     "ccec9ef5c1077b1d006015ae48b6f3c07e38f6291d042c9207c6029982a62d8a"),
    (EpochBegin(epoch=258, kind="delta"), 1,
     "44525731" "0001" "0003" "00000009" "0000000000000001" "58377d85"
     "0000000000000102" "01"
     "7bbc8569002accadeeeb9e6f2838c3727791fcdf6cfa9f8ab8b8ca7494094944"),
    (Resync(epoch=3, reason="bad digest"), 4,
     "44525731" "0001" "000b" "00000012" "0000000000000004" "1a7f7070"
     "0000000000000003" "62616420646967657374"
     "5ee06ed4ba5b3b22d0554cd4a0fe9a048695720473694e9476766b813706c77a"),
    (HelloAck(session_id=SESSION, accepted=True, nonce=NONCE, reason="ok"), 0,
     "44525731" "0001" "0002" "00000024" "0000000000000000" "5293bb0c"
     "6465666768696a6b6c6d6e6f70717273" "01" "10" "c8c9cacbcccdcecfd0d1d2d3d4d5d6d7" "6f6b"
     "80ef47f7aba5ed50f9d0d4c266d6086090e821fbeef03662fba3f90edd7f6d75"),
    (HelloAck(session_id=SESSION, accepted=False, reason="no"), 0,
     "44525731" "0001" "0002" "00000014" "0000000000000000" "f41f7e7f"
     "6465666768696a6b6c6d6e6f70717273" "00" "00" "6e6f"
     "3f4fb55b144b936d2eb7ee959fa136a135832eaab53a018c5ba2ba40e505d977"),
]


def frame(event: Event, seq: int = 0, key: bytes = KEY, **kw: int) -> bytes:
    return b"".join(encode_event(event, seq, key, **kw))


@pytest.mark.parametrize("event,seq,hexbytes", SIMPLE_CASES)
def test_simple_cases_write_exact_bytes(event: Event, seq: int, hexbytes: str) -> None:
    assert frame(event, seq).hex() == hexbytes


@pytest.mark.parametrize("event,seq,hexbytes", SIMPLE_CASES)
def test_simple_cases_read_exact_bytes_three_ways(event: Event, seq: int, hexbytes: str) -> None:
    data = bytes.fromhex(hexbytes)
    nxt = frame(Ack(epoch=1), seq + 1)
    for how, chunks in feed_ways(data, trailing=nxt[:HEADER_LEN + 3]):
        got, buf = read_one(chunks, seq=seq)
        assert got == event, how
        assert len(buf) == (HEADER_LEN + 3 if how == "trailing" else 0), how


@pytest.mark.parametrize("event,seq,hexbytes", SIMPLE_CASES)
def test_crc_and_mac_match_an_independent_computation(event: Event, seq: int,
                                                      hexbytes: str) -> None:
    data = bytes.fromhex(hexbytes)
    magic, version, ftype, length, fseq, crc = struct.unpack("!4sHHIQI", data[:24])
    body, mac = data[24:24 + length], data[24 + length:]
    assert (magic, version, fseq, len(mac)) == (b"DRW1", 1, seq, 32)
    assert zlib.crc32(data[:20] + body) == crc
    assert hmac.new(KEY, data[:24 + length], hashlib.sha256).digest() == mac


@pytest.mark.parametrize("sender,event", all_events_in_order(),
                         ids=[type(e).__name__ for _, e in all_events_in_order()])
def test_every_event_round_trips_three_ways(sender: str, event: Event) -> None:
    data = frame(event, seq=3)
    for how, chunks in feed_ways(data, trailing=frame(Ack(epoch=1), seq=4)[:10]):
        got, _ = read_one(chunks, seq=3)
        assert got == event and type(got) is type(event), how


def test_the_sample_session_covers_every_wire_event_type() -> None:
    assert {type(e) for _, e in all_events_in_order()} == set(_TYPE_OF)
    # BATCH carries other events and has no event type of its own
    assert len(set(_TYPE_OF.values())) == len(_TYPE_OF) == len(FrameType) - 1


@pytest.mark.parametrize("event", [
    Resync(epoch=0, reason=""),
    Resync(epoch=(1 << 64) - 1, reason="lost confidence \N{WARNING SIGN}"),
    HelloAck(session_id=SESSION, accepted=True),
    HelloAck(session_id=SESSION, accepted=True, nonce=bytes(16)),
    HelloAck(session_id=SESSION, accepted=False, reason="no room", nonce=NONCE),
], ids=repr)
def test_resync_and_hello_ack_nonce_round_trip_three_ways(event: Event) -> None:
    data = frame(event, seq=9)
    for how, chunks in feed_ways(data, trailing=frame(Ack(epoch=1), seq=10)[:HEADER_LEN + 1]):
        got, buf = read_one(chunks, seq=9)
        assert got == event and type(got) is type(event), how
        assert len(buf) == (HEADER_LEN + 1 if how == "trailing" else 0), how


def test_two_frames_in_one_chunk_come_out_in_order() -> None:
    buf = ReceiveBuffer()
    buf.append(frame(Ack(epoch=1), 0) + frame(Ack(epoch=2), 1))
    first = read_frame(buf, KEY, expected_seq=0)
    second = read_frame(buf, KEY, expected_seq=1)
    assert first is not None and second is not None
    assert (first.event, second.event) == (Ack(epoch=1), Ack(epoch=2))
    assert read_frame(buf, KEY, expected_seq=2) is None and len(buf) == 0


def test_connection_closed_is_not_a_wire_event() -> None:
    with pytest.raises(LocalProtocolError, match="not a wire event"):
        frame(ConnectionClosed(clean=True))


# ------------------------------------------------------------------------------ pages codec


def runs_of(body: bytes) -> list[tuple[int, int, PageEncoding, int]]:
    """Parse the run heads of a Pages body (independently of the decoder)."""
    n_runs = struct.unpack_from("!I", body, 20)[0]
    off, out = 25, []
    for _ in range(n_runs):
        first, count, enc, plen = struct.unpack_from("!QIBI", body, off)
        out.append((first, count, PageEncoding(enc), plen))
        off += 17 + plen
    assert off == len(body)
    return out


def body_of(p: Pages, **kw: int) -> bytes:
    return b"".join(encode_pages_parts(p, **kw))


def sparse_of(body: bytes) -> tuple[list[tuple[int, int]], list[int], list[int]]:
    """Parse a sparse Pages body (flags bit 1): runs, word offsets, values (independently)."""
    n_runs, flags = struct.unpack_from("!IB", body, 20)
    assert flags & 2
    runs = [struct.unpack_from("!QI", body, 25 + 12 * i) for i in range(n_runs)]
    off = 25 + 12 * n_runs
    (k,) = struct.unpack_from("!I", body, off)
    where = list(struct.unpack_from(f"!{k}I", body, off + 4))
    vals = list(struct.unpack_from(f"!{k}Q", body, off + 4 + 4 * k))
    assert off + 4 + 12 * k == len(body)
    return runs, where, vals


def test_all_zero_pages_encode_tiny() -> None:
    p = Pages(epoch=1, slot=0, page_size=PAGE, pages=np.arange(4096), data=bytes(4096 * PAGE))
    body = body_of(p)
    assert len(body) == 25 + 12 + 4  # one run and no words for 16 MiB
    assert sparse_of(body) == ([(0, 4096)], [], [])
    assert read_one([frame(p)])[0] == p


def test_sparse_body_lists_runs_and_words_of_the_whole_frame() -> None:
    words = np.zeros(4 * PAGE // 8, np.uint64)
    words[[3, 600, 1500, 2047]] = [7, 8, 9, 2**64 - 1]
    p = Pages(epoch=4, slot=2, page_size=PAGE, pages=(5, 6, 9, 40), data=words.tobytes(),
              delta=True)
    body = body_of(p)
    assert sparse_of(body) == ([(5, 2), (9, 1), (40, 1)], [3, 600, 1500, 2047],
                               [7, 8, 9, 2**64 - 1])
    got = read_one([frame(p)])[0]
    assert got == p and got.delta and got.words is not None
    assert got.words[0].tolist() == [3, 600, 1500, 2047]


def test_random_pages_are_not_inflated_beyond_run_heads() -> None:
    rng = np.random.default_rng(3)
    n = 300
    p = Pages(epoch=1, slot=0, page_size=PAGE, pages=np.arange(n), data=rng.bytes(n * PAGE))
    body = body_of(p)
    runs = runs_of(body)
    assert all(enc is PageEncoding.RAW for _, _, enc, _ in runs)
    assert len(runs) == -(-n * PAGE // MAX_RUN_BYTES)  # split into 1 MiB runs
    assert len(body) - n * PAGE == 25 + 17 * len(runs)
    assert read_one([frame(p)])[0] == p


def test_compressible_pages_are_deflated() -> None:
    n = 64
    p = Pages(epoch=1, slot=0, page_size=PAGE, pages=np.arange(n), data=b"ab" * (n * PAGE // 2))
    body = body_of(p)
    assert [enc for _, _, enc, _ in runs_of(body)] == [PageEncoding.ZLIB]
    assert len(body) < n * PAGE // 50
    assert read_one([frame(p)])[0] == p
    assert [enc for _, _, enc, _ in runs_of(body_of(p, compress_level=0))] == [PageEncoding.RAW]


def test_runs_follow_index_gaps_and_zero_boundaries() -> None:
    rng = np.random.default_rng(1)
    data = bytearray(7 * PAGE)
    data[0] = 1                  # page 10: one word
    data[3 * PAGE + 5] = 1       # page 13: one word after two zero pages
    data[6 * PAGE:] = rng.bytes(PAGE)  # page 30: random, so the frame is not mostly zero
    p = Pages(epoch=2, slot=1, page_size=PAGE, pages=(10, 11, 12, 13, 20, 21, 30),
              data=bytes(data))
    heads = [(first, count, enc) for first, count, enc, _ in runs_of(body_of(p))]
    assert heads == [(10, 1, PageEncoding.SPARSE64), (11, 2, PageEncoding.ZERO),
                     (13, 1, PageEncoding.SPARSE64), (20, 2, PageEncoding.ZERO),
                     (30, 1, PageEncoding.RAW)]
    assert read_one([frame(p)])[0] == p


def test_sparse_pages_and_xor_deltas_are_small_and_round_trip() -> None:
    # what an XOR delta of 64 pages that each changed 24 bytes looks like
    rng = np.random.default_rng(9)
    data = bytearray(64 * PAGE)
    for i in range(64):
        data[i * PAGE:i * PAGE + 24] = rng.bytes(24)
    p = Pages(epoch=3, slot=1, page_size=PAGE, pages=np.arange(100, 164), data=bytes(data),
              delta=True)
    body = body_of(p)
    runs, where, _ = sparse_of(body)
    assert runs == [(100, 64)] and len(where) == 64 * 3
    assert len(body) < 64 * 3 * 12 + 100
    for how, chunks in feed_ways(frame(p), trailing=b"DRW"):
        got = read_one(chunks)[0]
        assert got == p and got.delta, how
    plain = Pages(epoch=3, slot=1, page_size=PAGE, pages=np.arange(100, 164), data=bytes(data))
    assert read_one([frame(plain)])[0].delta is False


def test_mixed_pages_round_trip_bytewise_with_small_pages() -> None:
    rng = np.random.default_rng(5)
    raw = bytearray(rng.bytes(40 * 512))
    raw[512 * 5:512 * 9] = bytes(512 * 4)
    p = Pages(epoch=9, slot=7, page_size=512, pages=np.arange(0, 80, 2), data=bytes(raw))
    for how, chunks in feed_ways(frame(p), trailing=b"DRW"):
        assert read_one(chunks)[0] == p, how


def test_big_raw_runs_are_passed_by_reference() -> None:
    p = mixed_pages(n=96)
    parts = encode_pages_parts(p)
    views = [x for x in parts if isinstance(x, memoryview)]
    assert views and all(v.obj is p.data for v in views)
    assert len(parts) <= 2 * len(views) + 1  # small pieces are coalesced between them


def test_pages_larger_than_the_frame_cap_are_refused_at_send() -> None:
    p = mixed_pages(n=16)
    with pytest.raises(LocalProtocolError, match="split it"):
        frame(p, max_frame_size=15 * PAGE)


# -------------------------------------------------------------------------- malformed bodies


def forged(ftype: int, body: bytes, seq: int = 0) -> bytes:
    """A correctly framed and authenticated frame around an arbitrary body."""
    return b"".join(frame_parts(ftype, seq, [body], KEY))


def pages_body(runs: list[tuple[int, int, int, bytes]], n: int | None = None,
               page_size: int = 512) -> bytes:
    n = sum(c for _, c, _, _ in runs) if n is None else n
    out = struct.pack("!QIIIIB", 1, 0, page_size, n, len(runs), 0)
    for first, count, enc, payload in runs:
        out += struct.pack("!QIBI", first, count, enc, len(payload)) + payload
    return out


def sparse_body(runs: list[tuple[int, int]], n: int | None = None,
                words: list[tuple[int, int]] = (), k: int | None = None) -> bytes:  # type: ignore[assignment]
    n = sum(c for _, c in runs) if n is None else n
    out = struct.pack("!QIIIIB", 1, 0, 512, n, len(runs), 2)
    for first, count in runs:
        out += struct.pack("!QI", first, count)
    out += struct.pack("!I", len(words) if k is None else k)
    out += b"".join(struct.pack("!I", w) for w, _ in words)
    return out + b"".join(struct.pack("!Q", v) for _, v in words)


MALFORMED: list[tuple[str, int, bytes]] = [
    ("Ack trailing", FrameType.ACK, struct.pack("!Q", 1) + b"x"),
    ("Ack short", FrameType.ACK, b"\x00" * 7),
    ("bad kind", FrameType.EPOCH_BEGIN, struct.pack("!QB", 1, 7)),
    ("bad role", FrameType.HELLO, struct.pack("!BI16s", 9, 1, b"s" * 16)),
    ("accepted flag", FrameType.HELLO_ACK, struct.pack("!16sBB", b"s" * 16, 2, 0)),
    ("HelloAck v0 head", FrameType.HELLO_ACK, struct.pack("!16sB", b"s" * 16, 1)),
    ("nonce length", FrameType.HELLO_ACK, struct.pack("!16sBB", b"s" * 16, 1, 8) + b"n" * 8),
    ("nonce cut short", FrameType.HELLO_ACK, struct.pack("!16sBB", b"s" * 16, 1, 16) + b"n" * 15),
    ("Resync short", FrameType.RESYNC, b"\x00" * 7),
    ("Resync bad utf-8", FrameType.RESYNC, struct.pack("!Q", 1) + b"\xff\xfe"),
    ("bad utf-8", FrameType.GOODBYE, b"\xff\xfe"),
    ("digest too long", FrameType.EPOCH_END, struct.pack("!QQQ", 1, 0, 0) + b"d" * 65),
    ("xor delta", FrameType.PAGES, pages_body([(0, 1, PageEncoding.XOR_DELTA, b"x")])),
    ("unknown encoding", FrameType.PAGES, pages_body([(0, 1, 9, b"")])),
    ("sparse short", FrameType.PAGES, pages_body([(0, 1, PageEncoding.SPARSE64, b"\x00")])),
    ("sparse count", FrameType.PAGES,
     pages_body([(0, 1, PageEncoding.SPARSE64, struct.pack("!I", 2) + bytes(12))])),
    ("sparse range", FrameType.PAGES,
     pages_body([(0, 1, PageEncoding.SPARSE64, struct.pack("!IIQ", 1, 64, 5))])),
    ("sparse order", FrameType.PAGES,
     pages_body([(0, 1, PageEncoding.SPARSE64, struct.pack("!IIIQQ", 2, 3, 1, 5, 6))])),
    ("raw wrong size", FrameType.PAGES, pages_body([(0, 1, PageEncoding.RAW, b"x" * 511)])),
    ("zero with payload", FrameType.PAGES, pages_body([(0, 1, PageEncoding.ZERO, b"x")])),
    ("zlib bomb", FrameType.PAGES,
     pages_body([(0, 1, PageEncoding.ZLIB, zlib.compress(bytes(1 << 20)))])),
    ("zlib short", FrameType.PAGES,
     pages_body([(0, 2, PageEncoding.ZLIB, zlib.compress(bytes(512)))])),
    ("zlib garbage", FrameType.PAGES, pages_body([(0, 1, PageEncoding.ZLIB, b"nope")])),
    ("overlap", FrameType.PAGES,
     pages_body([(5, 2, PageEncoding.ZERO, b""), (6, 1, PageEncoding.ZERO, b"")])),
    ("count mismatch", FrameType.PAGES, pages_body([(0, 1, PageEncoding.ZERO, b"")], n=2)),
    ("too many pages", FrameType.PAGES, pages_body([(0, 3, PageEncoding.ZERO, b"")], n=2)),
    ("bad page size", FrameType.PAGES, pages_body([(0, 1, PageEncoding.ZERO, b"")], page_size=768)),
    ("expands past cap", FrameType.PAGES,
     pages_body([(0, 1 << 20, PageEncoding.ZERO, b"")], page_size=1 << 20)),
    ("trailing run bytes", FrameType.PAGES, pages_body([(0, 1, PageEncoding.ZERO, b"")]) + b"!"),
    ("cut run head", FrameType.PAGES, pages_body([(0, 1, PageEncoding.ZERO, b"")])[:-3]),
    ("unknown flag", FrameType.PAGES, struct.pack("!QIIIIB", 1, 0, 512, 1, 1, 4)),
    ("sparse table short", FrameType.PAGES, sparse_body([(0, 1)])[:-8]),
    ("sparse zero run", FrameType.PAGES, sparse_body([(0, 0), (1, 1)], n=1)),
    ("sparse run sum", FrameType.PAGES, sparse_body([(0, 2)], n=1)),
    ("sparse overlap", FrameType.PAGES, sparse_body([(5, 2), (6, 1)])),
    ("sparse backwards", FrameType.PAGES, sparse_body([(5, 1), (2, 1)])),
    ("sparse huge first", FrameType.PAGES, sparse_body([(1 << 63, 1)])),
    ("sparse word count", FrameType.PAGES, sparse_body([(0, 1)], words=[(1, 5)])[:-4]),
    ("sparse too many words", FrameType.PAGES, sparse_body([(0, 1)], k=65)),
    ("sparse word range", FrameType.PAGES, sparse_body([(0, 1)], words=[(64, 5)])),
    ("sparse word order", FrameType.PAGES, sparse_body([(0, 1)], words=[(3, 5), (1, 6)])),
    ("sparse trailing", FrameType.PAGES, sparse_body([(0, 1)]) + b"!"),
]


@pytest.mark.parametrize("name,ftype,body", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_bodies_are_remote_errors(name: str, ftype: int, body: bytes) -> None:
    buf = ReceiveBuffer()
    buf.append(forged(ftype, body))
    with pytest.raises(RemoteProtocolError, match=f"malformed {FrameType(ftype).name} frame"):
        read_frame(buf, KEY, expected_seq=0)


def test_unknown_frame_type_is_reported_after_authentication() -> None:
    buf = ReceiveBuffer()
    buf.append(forged(99, b""))
    with pytest.raises(RemoteProtocolError, match="unknown frame type 99"):
        read_frame(buf, KEY, expected_seq=0)


def test_bad_magic_is_seen_from_the_first_wrong_byte() -> None:
    buf = ReceiveBuffer()
    buf.append(MAGIC[:2])
    assert read_frame(buf, KEY, expected_seq=0) is None
    buf.append(b"X")
    with pytest.raises(RemoteProtocolError, match="bad magic"):
        read_frame(buf, KEY, expected_seq=0)


def test_oversize_is_reported_from_the_header_alone() -> None:
    buf = ReceiveBuffer()
    buf.append(frame(Goodbye(reason="x" * 100))[:HEADER_LEN])
    with pytest.raises(RemoteProtocolError, match="oversize frame"):
        read_frame(buf, KEY, expected_seq=0, max_frame_size=99)


def test_frame_overhead_is_56_bytes() -> None:
    assert FRAME_OVERHEAD == 56 and len(frame(Goodbye())) == 56


@pytest.mark.parametrize("token", [0, 1, 2**63 + 5])
def test_the_fencing_token_travels_in_hello_and_ack(token: int) -> None:
    """The revision of the group's key in etcd (issue 16) reaches the other side exactly."""
    hello = Hello(role="primary", version=3, session_id=b"s" * 16, config=b"{}", token=token)
    for ev in (hello, Ack(epoch=9, token=token)):
        got, _ = read_one([frame(ev, 0)], seq=0)
        assert got == ev and got.token == token  # type: ignore[attr-defined]
    with pytest.raises(LocalProtocolError):
        Ack(epoch=1, token=-1)
