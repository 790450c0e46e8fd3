"""Shared helpers for the wire tests (not collected: no ``test_`` prefix, no conftest)."""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np

from dirtyring.wire import (
    NEED_DATA, Ack, Checkpoint, Connection, EpochBegin, EpochEnd, Event, Failover, Goodbye, Heartbeat, Hello,
    HelloAck, MachineBlob, Pages, Resync,
)
from dirtyring.wire.codec import read_frame
from dirtyring.wire.receivebuffer import ReceiveBuffer

KEY = bytes(range(32))
SESSION = bytes(range(100, 116))
NONCE = bytes(range(200, 216))
PAGE = 4096


def hello(session: bytes = SESSION) -> Hello:
    return Hello(role="primary", version=1, session_id=session, config=b'{"mem_mib": 64}')


def hello_ack(session: bytes = SESSION, accepted: bool = True, nonce: bytes = b"") -> HelloAck:
    return HelloAck(session_id=session, accepted=accepted, reason="" if accepted else "no room",
                    nonce=nonce)


def mixed_pages(epoch: int = 1, n: int = 64, seed: int = 7) -> Pages:
    """Pages with zero, random and compressible runs and a gap in the indices."""
    rng = np.random.default_rng(seed)
    data = bytearray(n * PAGE)
    third = n // 3
    data[: third * PAGE] = rng.bytes(third * PAGE)                     # incompressible
    data[2 * third * PAGE:] = b"A" * ((n - 2 * third) * PAGE)        # compressible
    idx = np.arange(n, dtype=np.int64)
    idx[n // 2:] += 1000                                               # a gap
    return Pages(epoch=epoch, slot=2, page_size=PAGE, pages=idx, data=bytes(data))


def checkpoint(epoch: int, output_seq: int = 11) -> Checkpoint:
    """A whole delta epoch: a sparse XOR delta of one slot and plain pages of another."""
    delta = bytearray(2 * PAGE)
    delta[8:16] = b"\x01" * 8
    delta[PAGE + 64:PAGE + 72] = b"\xff" * 8
    return Checkpoint(
        epoch=epoch, kind="delta",
        pages=(Pages(epoch=epoch, slot=0, page_size=PAGE, pages=(5, 6), data=bytes(delta),
                     delta=True),
               mixed_pages(epoch, n=6)),
        blob=b"\x02cpu-state" * 50, digest=b"\x22" * 32, output_seq=output_seq)


def feed_ways(data: bytes, trailing: bytes = b"") -> Iterator[tuple[str, list[bytes]]]:
    """The three h11-style ways to deliver a buffer: whole, byte by byte, with trailing bytes."""
    yield "whole", [data]
    yield "bytewise", [data[i:i + 1] for i in range(len(data))]
    yield "trailing", [data + trailing]


def read_one(chunks: Sequence[bytes], key: bytes = KEY,
             seq: int = 0) -> tuple[Event, ReceiveBuffer]:
    """Feed ``chunks`` to a ReceiveBuffer, reading after each; exactly one frame must come out."""
    buf = ReceiveBuffer()
    got: list[Event] = []
    for c in chunks:
        buf.append(c)
        frame = read_frame(buf, key, expected_seq=seq + len(got))
        if frame is not None:
            got.append(frame.event)
    assert len(got) == 1, got
    return got[0], buf


class ConnectionPair:
    """A primary and a standby wired through in-memory bytes (h11's helpers.ConnectionPair)."""

    def __init__(self, key: bytes = KEY, **kw: object) -> None:
        self.primary = Connection("primary", key, **kw)  # type: ignore[arg-type]
        self.standby = Connection("standby", key, **kw)  # type: ignore[arg-type]

    def peer(self, conn: Connection) -> Connection:
        return self.standby if conn is self.primary else self.primary

    def send(self, sender: Connection, event: Event,
             split: Callable[[bytes], list[bytes]] = lambda b: [b]) -> bytes:
        """Send ``event`` and assert the peer sees exactly it, then NEED_DATA."""
        data = sender.send(event)
        receiver = self.peer(sender)
        got: list[object] = []
        for chunk in split(data):
            receiver.receive_data(chunk)
            while (e := receiver.next_event()) is not NEED_DATA:
                got.append(e)
        assert got == [event], (got, event)
        return data

    def handshake(self) -> None:
        self.send(self.primary, hello())
        self.send(self.standby, hello_ack())

    def one_epoch(self, epoch: int = 1, pages: Pages | None = None) -> None:
        pages = pages if pages is not None else mixed_pages(epoch)
        self.send(self.primary, EpochBegin(epoch=epoch, kind="full" if epoch == 1 else "delta"))
        self.send(self.primary, pages)
        self.send(self.primary, MachineBlob(epoch=epoch, blob=b"\x01cpu-state"))
        self.send(self.primary, EpochEnd(epoch=epoch, n_pages=pages.n_pages, output_seq=epoch,
                                         digest=b"\xaa" * 32))


def all_events_in_order() -> list[tuple[str, Event]]:
    """One legal session covering every wire event type: (sender role, event)."""
    pages = mixed_pages(1)
    return [
        ("primary", hello()),
        ("standby", hello_ack(nonce=NONCE)),
        ("primary", Heartbeat(seq=1, sent_ns=123_456_789)),
        ("standby", Heartbeat(seq=1, sent_ns=987_654_321)),
        ("primary", EpochBegin(epoch=1, kind="full")),
        ("primary", pages),
        ("primary", MachineBlob(epoch=1, blob=bytes(range(256)) * 3)),
        ("primary", EpochEnd(epoch=1, n_pages=pages.n_pages, digest=b"\x11" * 32, output_seq=9)),
        ("standby", Ack(epoch=1)),
        ("standby", Resync(epoch=1, reason="digest mismatch after commit")),
        ("primary", EpochBegin(epoch=2, kind="full")),
        ("primary", EpochEnd(epoch=2, n_pages=0, output_seq=10)),
        ("standby", Ack(epoch=2)),
        ("primary", checkpoint(3)),
        ("standby", Ack(epoch=3)),
        ("primary", Failover(reason="planned switchover \N{RIGHTWARDS ARROW} standby")),
        ("standby", Goodbye(reason="bye")),
    ]
