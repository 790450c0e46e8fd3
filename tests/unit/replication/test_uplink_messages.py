"""The epoch loop ↔ uplink control messages (``uplink_messages.py``), without KVM:

- every message type survives encode + decode, and send + receive over the real kind of
  socket (SOCK_SEQPACKET), as the same typed value (parts come back as ``Part``);
- what is not a message is refused with a RemoteProtocolError that says what was wrong (and
  sending a non-message with a LocalProtocolError), never another exception;
- the uplink's dispatcher (``uplink_process._Control``) handles each type: checkpoints and
  staged parts wait for the flow-control window, in order, a steady record expanded into its
  checkpoints; an urgent message asks for the last epoch's ack; Close stops; anything else is
  a protocol error.
"""
from __future__ import annotations

import pickle
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from dirtyring._bindings.mapping import memfd
from dirtyring.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from dirtyring.replication import uplink_messages as um
from dirtyring.replication.staging_area import Staging
from dirtyring.replication.uplink_messages import (
    MESSAGE_TYPES, Acked, CheckpointEnd, Checkpoints, Close, Handshake, HandshakeDone, Lost,
    Part, ResyncRequested, RevokerArmed, Skipped, StagedParts, StandbyTookOver, Start,
    SteadyCheckpoints, SteadyEpochs, WireStats, decode, encode, recv_msg, send_msg)
from dirtyring.replication.uplink_process import _Control
from dirtyring.wire import Hello

PARTS = [Part(3, 0, 0, 64, -1), Part(3, 64, 1, 2, 17)]
STEADY = SteadyEpochs(epoch=10, seq=6, count=2, sizes=[(0, 2), (1, 3)],
                      words=[[1, 2], [3, -1]], state_size=3, devices=b"dev",
                      digests=[b"a" * 32, b"b" * 32])
#: One of each message, as the two sides make them.
EXAMPLES: list[Any] = [
    Start(b"k" * 32, False, 1, 0.1, 1.0, 64, 1024, [1 << 20, 4096], None),
    Start(b"k" * 32, True, 0, 1, 2, 4, 16, [1 << 20], {"endpoints": ["h:1"], "id": 7}),
    Handshake(Hello(role="primary", version=2, session_id=b"s" * 16, config=b"{}", token=9)),
    StagedParts(1, "full", PARTS),
    Checkpoints([CheckpointEnd(5, "delta", PARTS, b"state" * 1000, b"", 3),
                 SteadyCheckpoints(STEADY, 4),
                 CheckpointEnd(12, "full", [], b"", b"d" * 32, 4)], True),
    Checkpoints([SteadyCheckpoints(SteadyEpochs(1, 2, 1, [(0, 64)], None, 0, b"", None), 0)],
                False),
    Close("primary shutting down"),
    HandshakeDone(True, ""),
    HandshakeDone(False, "this standby already follows a primary"),
    Acked(41),
    ResyncRequested(4, "memory digest mismatch"),
    StandbyTookOver("standby took over"),
    Lost("no frame from the standby for 1 s"),
    Skipped(8),
    WireStats({"compression_ratio": 1.5, "bytes_out": 10, "sent_epoch": 3}),
    RevokerArmed(),
]


def test_the_examples_cover_every_message_type() -> None:
    assert {type(m) for m in EXAMPLES} == set(MESSAGE_TYPES)


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_survives_encoding(msg: Any) -> None:
    got = decode(encode(msg))
    assert got == msg and type(got) is type(msg)
    for e in getattr(got, "ended", []):
        if isinstance(e, CheckpointEnd):
            assert all(type(p) is Part for p in e.parts)
    assert all(type(p) is Part for p in getattr(got, "parts", []))


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a.settimeout(10)
    b.settimeout(10)
    yield a, b
    a.close()
    b.close()


def test_messages_go_one_per_packet_in_order(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    for m in EXAMPLES:
        send_msg(a, m)
    assert [recv_msg(b) for _ in EXAMPLES] == EXAMPLES
    b.settimeout(None)  # (as the uplink's: a timeout would make Python wait for it)
    with pytest.raises(BlockingIOError):
        recv_msg(b, socket.MSG_DONTWAIT)
    a.close()
    assert recv_msg(b) is None  # the end of the socket


def test_each_thread_reads_into_its_own_buffer(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    got: list[Any] = []
    send_msg(a, Acked(1))
    t = threading.Thread(target=lambda: got.append(recv_msg(b)))
    t.start()
    t.join(10)
    send_msg(a, Acked(2))
    assert got == [Acked(1)] and recv_msg(b) == Acked(2)


def _tagged(*flat: Any) -> bytes:
    return pickle.dumps(flat, protocol=pickle.HIGHEST_PROTOCOL)


@pytest.mark.parametrize("data, says", [
    (b"", "undecodable"),
    (b"\x80\x05garbage", "undecodable"),
    (b"not a pickle at all", "undecodable"),
    (pickle.dumps(["a", "list"]), "is a list, not a tagged tuple"),
    (pickle.dumps(()), "is a tuple, not a tagged tuple"),
    (_tagged("cps", [], False), "unknown uplink control message tag 'cps'"),
    (_tagged(99), "unknown uplink control message tag 99"),
    (_tagged(Acked.TAG), "malformed Acked message: 0 fields, 1 expected"),
    (_tagged(Acked.TAG, 1, 2), "malformed Acked message: 2 fields, 1 expected"),
    (_tagged(Acked.TAG, "41"), "malformed Acked message: str where int was expected"),
    (_tagged(HandshakeDone.TAG, 1, ""), "malformed HandshakeDone message: int where bool"),
    (_tagged(Close.TAG, None), "malformed Close message"),
    (_tagged(StagedParts.TAG, 1, "full", [(3, 0, 0)]), "malformed StagedParts message"),
    (_tagged(StagedParts.TAG, 1, "full", "parts"), "malformed StagedParts message"),
    (_tagged(Checkpoints.TAG, [(7, 1)], False), "malformed Checkpoints message"),
    (_tagged(Checkpoints.TAG, [(4, 5, "delta", [], b"", b"")], False),
     "malformed Checkpoints message: 5 fields, 6 expected"),
    (_tagged(Checkpoints.TAG, [(5, 1, 2, 3)], True), "malformed Checkpoints message"),
    (_tagged(Checkpoints.TAG, (), False), "malformed Checkpoints message"),
    (_tagged(Handshake.TAG, "primary", 2, b"short", b"{}", 0), "malformed Handshake message"),
    (_tagged(Handshake.TAG, "mallory", 2, b"s" * 16, b"{}", 0), "malformed Handshake message"),
])
def test_what_is_not_a_message_is_a_protocol_error_that_says_why(data: bytes, says: str) -> None:
    with pytest.raises(RemoteProtocolError, match=says.replace("(", r"\(")):
        decode(data)


def test_a_bad_packet_on_the_socket_is_a_protocol_error(
        pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.sendall(b"\x00\x01\x02")
    send_msg(a, Acked(3))
    with pytest.raises(RemoteProtocolError):
        recv_msg(b)
    assert recv_msg(b) == Acked(3)  # one packet, one message: the next is whole


def test_sending_what_is_not_a_message_is_our_error() -> None:
    for bad in (("cps", [], False), Part(1, 2, 3, 4, 5), STEADY, None):
        with pytest.raises(LocalProtocolError, match="not an uplink control message"):
            encode(bad)
    assert issubclass(LocalProtocolError, ProtocolError)


def test_a_steady_record_expands_into_its_checkpoints() -> None:
    staging = Staging(memfd("test-messages", Staging.size_for(8, 8)), 8, 8)
    try:
        for k in range(8):
            staging.state_area(k)[:3] = [k, k, k]
        got = SteadyCheckpoints(STEADY, 4).expand(staging)
        assert got == [
            CheckpointEnd(10, "delta", STEADY.parts(0), b"\x06\x06\x06dev", b"a" * 32, 4),
            CheckpointEnd(11, "delta", STEADY.parts(1), b"\x07\x07\x07dev", b"b" * 32, 4)]
        assert Checkpoints([CheckpointEnd(3, "delta", [], b"", b"", 0),
                            SteadyCheckpoints(STEADY, 4)], False).last_epoch == 11
    finally:
        staging.close()


# --- the uplink's dispatcher ------------------------------------------------------------------
class FakeSender:
    """What ``_Control`` uses of the uplink's ``_Sender``: records what it is asked to do."""

    def __init__(self, window: bool = True) -> None:
        self.st = object()  # (only steady records read it: see ``expand``, patched below)
        self.lock = threading.Lock()
        self.report_ack = 0
        self.open: tuple[int, str, bool] | None = None
        self.outgoing: list[Any] = []
        self.window = window
        self.did: list[Any] = []

    def window_open(self) -> bool:
        return self.window

    def flush(self) -> None:
        self.did.append("flush")
        self.outgoing = []

    def on_parts(self, msg: StagedParts) -> None:
        self.did.append(msg)

    def on_checkpoint(self, cp: CheckpointEnd) -> None:
        self.did.append(cp)
        self.outgoing.append(cp.epoch)


def cp(epoch: int) -> CheckpointEnd:
    return CheckpointEnd(epoch, "delta", [Part(epoch, 0, 0, 1, -1)], b"s", b"", 1)


def test_the_dispatcher_handles_each_message_by_type(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(SteadyCheckpoints, "expand",
                        lambda self, staging: [cp(self.epochs.epoch + i)
                                               for i in range(self.epochs.count)])
    s = FakeSender(window=False)
    c = _Control(s)  # type: ignore[arg-type]
    parts = StagedParts(1, "full", PARTS)
    assert c.take(parts) is None
    assert c.take(Checkpoints([cp(1), SteadyCheckpoints(STEADY, 4)], urgent=False)) is None
    assert s.report_ack == 0
    assert list(c.pending) == [parts, cp(1), cp(10), cp(11)]
    c.send_pending()
    assert s.did == [] and len(c.pending) == 4  # the window is shut: no epoch begins
    s.window = True
    c.send_pending()
    assert s.did == ["flush", parts, cp(1), cp(10), cp(11)] and not c.pending
    assert c.take(Checkpoints([cp(12)], urgent=True)) is None
    assert s.report_ack == 12  # the primary waits for this one's ack
    assert c.take(Checkpoints([SteadyCheckpoints(STEADY, 4)], urgent=True)) is None
    assert s.report_ack == 12  # (10, 11: older)
    assert c.take(Close("bye")) == Close("bye")
    for other in EXAMPLES:
        if not isinstance(other, (StagedParts, Checkpoints, Close)):
            with pytest.raises(RemoteProtocolError, match=type(other).__name__):
                c.take(other)


def test_the_dispatcher_sends_a_full_write_at_once_and_finishes_a_begun_epoch() -> None:
    s = FakeSender(window=True)
    c = _Control(s)  # type: ignore[arg-type]
    c.take(Checkpoints([cp(e) for e in range(1, 21)], urgent=False))
    c.send_pending()
    assert s.did.count("flush") == 1 and len(s.outgoing) == 4  # 16 went in one write
    s.window, s.open = False, (21, "delta", False)  # an epoch begun is finished regardless
    c.take(Checkpoints([cp(21)], urgent=False))
    c.send_pending()
    assert s.did[-1] == cp(21)


def test_message_module_has_no_staging_import_at_runtime() -> None:
    """The messages load without the staging area (only its type is named)."""
    assert "Staging" not in vars(um)
