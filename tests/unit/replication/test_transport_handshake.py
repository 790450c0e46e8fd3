"""``transport.handshake``, shared by replication's uplink and migration's source: an accepting
answer with a nonce is returned; a refusal, a Goodbye or an answer without a nonce is refused."""
from __future__ import annotations

import socket
import threading

import pytest

from dirtyring.replication.transport import HandshakeRefused, Link, handshake
from dirtyring.wire import (NEED_DATA, PRIMARY, STANDBY, Connection, Goodbye, Hello, HelloAck,
                            WIRE_VERSION)

KEY = b"k" * 32
SID = b"s" * 16


def answer_with(reply: object) -> Link:
    """A primary-side link whose peer answers the first Hello with ``reply``."""
    a, b = socket.socketpair()
    conn = Connection(STANDBY, KEY)

    def peer() -> None:
        while (ev := conn.next_event()) is NEED_DATA:
            conn.receive_data(b.recv(65536))
        assert isinstance(ev, Hello)
        b.sendall(conn.send(reply))  # type: ignore[arg-type]

    threading.Thread(target=peer, daemon=True).start()
    return Link(a, Connection(PRIMARY, KEY))


def hello() -> Hello:
    return Hello(role="primary", version=WIRE_VERSION, session_id=SID, config=b"{}")


def test_an_accepting_answer_with_a_nonce_is_returned() -> None:
    link = answer_with(HelloAck(session_id=SID, accepted=True, nonce=b"n" * 16))
    try:
        ack = handshake(link, hello(), timeout=5)
        assert ack.accepted and link.conn.session_bound
    finally:
        link.close()


@pytest.mark.parametrize("reply,match", [
    (HelloAck(session_id=SID, accepted=False, reason="busy"), "busy"),
    (HelloAck(session_id=SID, accepted=True), "nonce"),
    (Goodbye(reason="go away"), "go away"),
], ids=["refused", "no nonce", "goodbye"])
def test_refusals_raise_handshake_refused(reply: object, match: str) -> None:
    link = answer_with(reply)
    try:
        with pytest.raises(HandshakeRefused, match=match):
            handshake(link, hello(), timeout=5)
    finally:
        link.close()
