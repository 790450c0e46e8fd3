"""Drives a sans-IO ``wire.Connection`` over a TCP socket; nothing else touches sockets.

Every socket gets TCP_NODELAY: small control frames (acks, heartbeats, epoch ends) must not
wait for Nagle plus delayed ACK (that kept QEMU's COLO at 10-15 checkpoints/s on our hosts).
Sending is serialised by a lock (the Connection assigns sequence numbers as it encodes);
receiving happens on one thread.
"""
from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator

from ..errors import ConfigError, DirtyringError, RemoteProtocolError
from ..errors import LinkClosed as LinkClosed  # (moved to errors; imported from here too)
from ..wire import NEED_DATA, Connection, Event, Goodbye, Hello, HelloAck

IOV_BATCH = 512


class HandshakeRefused(DirtyringError):
    """The standby (or migration target) answered the Hello with a refusal; the message is
    its reason.

    Example::

        except dirtyring.HandshakeRefused as e:
            print("refused:", e)
    """


def parse_addr(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{text!r} is not HOST:PORT")
    return host or "127.0.0.1", int(port)


def tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)


def connect(addr: tuple[str, int], timeout: float = 5.0) -> socket.socket:
    try:
        s = socket.create_connection(addr, timeout=timeout)
    except OSError as e:
        raise LinkClosed(f"cannot connect to {addr[0]}:{addr[1]}: {e.strerror or e}") from None
    tune(s)
    s.settimeout(None)
    return s


def listen(addr: tuple[str, int]) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(addr)
    except OSError as e:
        s.close()
        raise ConfigError(f"cannot listen on {addr[0]}:{addr[1]}: {e.strerror or e}") from None
    s.listen(4)
    return s


class Link:
    """One authenticated protocol connection over one socket."""

    def __init__(self, sock: socket.socket, conn: Connection) -> None:
        self.sock = sock
        self.conn = conn
        self._send_lock = threading.Lock()
        self._conn_lock = threading.Lock()
        self.closed = False

    def send(self, event: Event) -> None:
        with self._send_lock:
            with self._conn_lock:
                parts = self.conn.send_parts(event)
            self._sendmsg(parts)

    def send_epochs(self, entries: list[tuple[list[Event], bool]]) -> list[int]:
        """Send the events of several epochs in one write, packed into as few BATCH frames
        as fit (``Connection.send_epochs``); an epoch flagged skip-if-resync is dropped whole
        if a Resync is pending when its turn comes (checked under the same lock that encodes,
        so a Resync arriving meanwhile can't make a delta illegal mid-write). Returns the
        bytes of each epoch, -1 for a dropped one."""
        with self._send_lock:
            with self._conn_lock:
                parts, sizes = self.conn.send_epochs(entries)
            if parts:
                self._sendmsg(parts)
            return sizes

    def _sendmsg(self, parts: list) -> None:
        try:
            i = 0
            while i < len(parts):
                batch = [memoryview(p).cast("B") for p in parts[i:i + IOV_BATCH]]
                total = sum(len(b) for b in batch)
                sent = self.sock.sendmsg(batch)
                if sent < total:
                    # Partial send: finish this batch byte-exactly, then continue.
                    rest = b"".join(bytes(b) for b in batch)[sent:]
                    self.sock.sendall(rest)
                i += IOV_BATCH
        except OSError as e:
            self.closed = True
            raise LinkClosed(f"connection lost while sending: {e.strerror or e}") from None

    def events(self, timeout: float | None) -> Iterator[Event]:
        """Yield events as they arrive. Raises LinkClosed on EOF/error, TimeoutError when
        nothing arrives for ``timeout`` seconds, RemoteProtocolError on bad frames."""
        self.sock.settimeout(timeout)
        while True:
            with self._conn_lock:
                ev = self.conn.next_event()
            if ev is not NEED_DATA:
                yield ev
                continue
            try:
                data = self.sock.recv(1 << 20)
            except socket.timeout:
                raise TimeoutError("no frame from the peer within the heartbeat timeout") \
                    from None
            except OSError as e:
                self.closed = True
                raise LinkClosed(f"connection lost: {e.strerror or e}") from None
            with self._conn_lock:
                self.conn.receive_data(data)
            if not data:
                with self._conn_lock:
                    try:
                        ev = self.conn.next_event()
                    except RemoteProtocolError:
                        raise
                self.closed = True
                if ev is not NEED_DATA:
                    yield ev
                raise LinkClosed("the peer closed the connection")

    def close(self) -> None:
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def handshake(link: Link, hello: Hello, timeout: float = 10.0) -> HelloAck:
    """Send ``hello`` and wait for the answer; return the accepting HelloAck.

    Raises HandshakeRefused (a refusing HelloAck or a Goodbye, or an acceptance without a
    nonce: its session would be replayable), TimeoutError, LinkClosed or ProtocolError (as
    ``Link.events``). Replication's uplink and migration's source both shake hands here."""
    link.send(hello)
    for ev in link.events(timeout=timeout):
        if isinstance(ev, HelloAck):
            if not ev.accepted:
                raise HandshakeRefused(ev.reason)
            if not ev.nonce:
                raise HandshakeRefused("the standby did not bind the session to a nonce (its "
                                       "frames could be replayed); refusing it")
            return ev
        if isinstance(ev, Goodbye):
            raise HandshakeRefused(ev.reason)
    raise LinkClosed("the peer closed the connection during the handshake")


def load_key(key_hex: str | None, *, allow_insecure: bool = False) -> tuple[bytes, bool]:
    """The shared key from --key (hex) or $DIRTYRING_KEY; returns (key, insecure)."""
    k = key_hex or os.environ.get("DIRTYRING_KEY", "")
    if not k:
        if allow_insecure:
            return b"", True
        raise ConfigError("no shared key: pass --key HEX or set DIRTYRING_KEY (both sides must "
                          "use the same key), or --insecure for a trusted loopback test")
    try:
        key = bytes.fromhex(k)
    except ValueError:
        raise ConfigError("the shared key must be hex (e.g. from `openssl rand -hex 32`)") \
            from None
    if len(key) < 16:
        raise ConfigError("the shared key must be at least 16 bytes (32 hex digits)")
    return key, False
