"""The sans-IO connection: the only glue between bytes, frames and the protocol rules.

There is no networking code here at all. The caller owns the socket, the clock and the threads:
it writes whatever :meth:`Connection.send` returns, feeds whatever it reads to
:meth:`Connection.receive_data`, and pulls events with :meth:`Connection.next_event`. That keeps
every protocol decision testable with plain bytes, and lets replication, migration and snapshot
transports (TCP, unix sockets, a file) share one implementation.
"""
from __future__ import annotations

import enum
import hmac
import struct
from collections import deque
from typing import Final, Literal, TypeAlias

from dirtyring.errors import LocalProtocolError, RemoteProtocolError, TruncatedStream

from .codec import (FRAME_OVERHEAD, HEADER_LEN, MAX_FRAME_SIZE, UNBATCHABLE, Batch, Buffer,
                    FrameType, batch_body, body_len, encode_body, encode_event, frame_parts,
                    frame_size, frame_type_of, page_bytes, read_frame)
from .events import Checkpoint, ConnectionClosed, Event, HelloAck, Pages
from .receivebuffer import ReceiveBuffer
from .states import CLOSED, ConnectionState, Role, State
from .statistics import WireStatistics

__all__ = ["Connection", "NEED_DATA", "NeedData", "WireStatistics", "MIN_KEY_LEN", "session_key"]

#: Shorter keys are only accepted with ``insecure=True`` (HMAC-SHA256 wants >= 128 bits).
MIN_KEY_LEN: Final = 16
_MAX_SEQ: Final = (1 << 64) - 1
_LENGTH: Final = struct.Struct("!I")  # the header's body length, at offset 8
_SUB_HEAD: Final = 6  # a batch sub-frame's type and length
#: Default cap on a BATCH frame's body: small frames batch up, big page runs go alone.
BATCH_MAX_BODY: Final = 1 << 20


def session_key(key: bytes, session_id: bytes, nonce: bytes) -> bytes:
    """The MAC key of one session: HMAC-SHA256(shared key, label | session id | nonce)."""
    return hmac.digest(key, b"dirtyring session v1" + session_id + nonce, "sha256")


class _NeedData(enum.Enum):
    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return "NEED_DATA"


#: Returned by :meth:`Connection.next_event` when no whole frame is buffered yet.
NEED_DATA: Final = _NeedData.NEED_DATA
NeedData: TypeAlias = Literal[_NeedData.NEED_DATA]


class Connection:
    """One end of a replication/migration session, as a pure state machine over bytes.

    Args:
        role: ``"primary"`` (sends Hello and epochs) or ``"standby"`` (answers and acks).
        key: shared HMAC key; at least MIN_KEY_LEN bytes unless ``insecure=True``, which also
            allows ``b""`` (frames are then checksummed but not authenticated).
        max_frame_size: largest body accepted or sent, and the most page data one Pages frame
            may carry (so a small frame can't inflate into a huge one).
        compress_level: zlib level for page runs, 0 to never try.

    Any error puts the connection in ERROR for good: ``send`` raises LocalProtocolError and
    ``next_event`` raises RemoteProtocolError from then on.
    """

    def __init__(self, role: Role | str, key: bytes, *, insecure: bool = False,
                 max_frame_size: int = MAX_FRAME_SIZE, compress_level: int = 1) -> None:
        try:
            self._role = Role(role)
        except ValueError:
            raise LocalProtocolError(f"role must be 'primary' or 'standby', got {role!r}") from None
        if not isinstance(key, (bytes, bytearray)):
            raise LocalProtocolError(f"key must be bytes, got {type(key).__name__}")
        if len(key) < MIN_KEY_LEN and not insecure:
            raise LocalProtocolError(f"key is {len(key)} bytes; use at least {MIN_KEY_LEN} or "
                                     "pass insecure=True to run without real authentication")
        if not 0 <= compress_level <= 9:
            raise LocalProtocolError(f"compress_level must be 0..9, got {compress_level}")
        if not 0 < max_frame_size <= 0xFFFF_FFFF:
            raise LocalProtocolError(f"max_frame_size must be in (0, 2**32), got {max_frame_size}")
        self._key = bytes(key)
        self._max_frame_size = max_frame_size
        self._compress_level = compress_level
        self._state = ConnectionState(side=self._role)
        self._buf = ReceiveBuffer()
        self._pending: deque[Event] = deque()  # the rest of a received batch
        self._eof = False
        self._error: str | None = None
        self._seq_out = 0
        self._seq_in = 0
        self._frames_out = self._bytes_out = self._frames_in = self._bytes_in = 0
        self._raw_out = self._wire_out = self._raw_in = self._wire_in = 0

    # -------------------------------------------------------------------- introspection

    @property
    def our_role(self) -> Role:
        return self._role

    @property
    def their_role(self) -> Role:
        return self._role.peer

    @property
    def our_state(self) -> State:
        return self._state.states[self._role]

    @property
    def their_state(self) -> State:
        return self._state.states[self._role.peer]

    @property
    def resync_pending(self) -> bool:
        """The standby asked for a resync and our next EpochBegin must be a full one."""
        return self._state.resync_pending

    @property
    def session_id(self) -> bytes | None:
        """The session id from the Hello, once it has been sent or received."""
        return self._state.session_id

    @property
    def error(self) -> str | None:
        """Why the connection entered ERROR, or None."""
        return self._error

    def statistics(self) -> WireStatistics:
        return WireStatistics(
            our_role=self._role, our_state=self.our_state, their_state=self.their_state,
            frames_out=self._frames_out, bytes_out=self._bytes_out,
            frames_in=self._frames_in, bytes_in=self._bytes_in,
            page_bytes_raw_out=self._raw_out, page_bytes_wire_out=self._wire_out,
            page_bytes_raw_in=self._raw_in, page_bytes_wire_in=self._wire_in,
            bytes_buffered=len(self._buf))

    # -------------------------------------------------------------------- sending

    def send(self, event: Event) -> bytes:
        """Return the bytes of one frame carrying ``event``; raise LocalProtocolError if illegal."""
        return b"".join(self.send_parts(event))

    #: Bytes of the frame the last ``send_parts`` returned.
    last_frame_size = 0

    def send_parts(self, event: Event) -> list[Buffer]:
        """Like :meth:`send`, but as a list of buffers for ``socket.sendmsg`` (page data is not
        copied). The caller must send all of them, in order, before the next frame."""
        if self._error is not None:
            raise LocalProtocolError(f"connection is in ERROR, cannot send: {self._error}")
        try:
            frame_type_of(event)  # reject non-wire objects before they touch the state machine
            if self._seq_out > _MAX_SEQ:
                raise LocalProtocolError("frame sequence space exhausted")
            self._state.process_event(self._role, event)
            parts = encode_event(event, self._seq_out, self._key,
                                 compress_level=self._compress_level,
                                 max_frame_size=self._max_frame_size)
        except LocalProtocolError as exc:
            self._fail(str(exc))
            raise
        self._seq_out += 1
        self._bind(event)
        size = self.last_frame_size = frame_size(parts)
        self._frames_out += 1
        self._bytes_out += size
        self._count_pages_out(event, size - FRAME_OVERHEAD)
        return parts

    def send_batch(self, events: list[Event], *, max_body: int = BATCH_MAX_BODY) -> list[Buffer]:
        """Frames carrying ``events`` in order, as buffers for ``socket.sendmsg``: events are
        packed into BATCH frames of at most ``max_body`` bytes (one header, CRC and MAC for a
        whole epoch); a bigger event, a handshake event or a lone event gets a frame of its
        own. Each event passes the state machine exactly as if sent alone.
        ``last_frame_size`` is then the bytes of all the frames together."""
        return self.send_epochs([(events, False)], max_body=max_body)[0]

    def send_epochs(self, epochs: list[tuple[list[Event], bool]], *,
                    max_body: int = BATCH_MAX_BODY) -> tuple[list[Buffer], list[int]]:
        """Like :meth:`send_batch` for the events of several epochs at once, packed into as
        few frames as fit: each frame's header, CRC and MAC (and the receiver's check of them)
        then cover many small epochs. A frame's events carry at most max_frame_size bytes of
        pages together, all the receiver allows one frame (a batch is no way around the cap).
        An epoch flagged skip-if-resync is left out whole when a Resync is pending at its turn
        (its deltas would be illegal). Returns the buffers and the bytes each epoch adds to the
        wire (a frame's overhead counts to the epoch that opened it), -1 for one left out."""
        out: list[Buffer] = []
        sizes: list[int] = []
        group: list[tuple[Event, FrameType, list[Buffer], int]] = []
        group_len = group_pages = opener = 0  # opener: the epoch whose event opened the group

        def flush() -> None:
            nonlocal group, group_len, group_pages
            if len(group) == 1:
                e, ftype, body, blen = group[0]
                out.extend(self._frame_out(ftype, body, blen, [(e, blen)]))
            elif group:
                body = batch_body([(ft, b, n) for _, ft, b, n in group])
                out.extend(self._frame_out(FrameType.BATCH, body, group_len,
                                           [(e, n) for e, _, _, n in group]))
            else:
                return
            # Every event was counted with a sub-frame head; a lone one has a frame of its own.
            sizes[opener] += FRAME_OVERHEAD - (_SUB_HEAD if len(group) == 1 else 0)
            group, group_len, group_pages = [], 0, 0

        for events, skip in epochs:
            if skip and self._state.resync_pending:
                sizes.append(-1)
                continue
            sizes.append(0)
            i = len(sizes) - 1
            for e in events:
                ftype = frame_type_of(e)
                if ftype in UNBATCHABLE:
                    flush()
                    out.extend(self.send_parts(e))
                    sizes[i] += self.last_frame_size
                    continue
                body, blen = self._encode_checked(e)
                pages = e.nbytes if isinstance(e, (Pages, Checkpoint)) else 0
                if group and (group_len + _SUB_HEAD + blen > max_body
                              or group_pages + pages > self._max_frame_size):
                    flush()
                if not group:
                    opener = i
                group.append((e, ftype, body, blen))
                group_len += _SUB_HEAD + blen
                group_pages += pages
                sizes[i] += _SUB_HEAD + blen
        flush()
        self.last_frame_size = sum(s for s in sizes if s > 0)
        return out, sizes

    def _encode_checked(self, event: Event) -> tuple[list[Buffer], int]:
        """State machine + body encoding for one event of a batch."""
        if self._error is not None:
            raise LocalProtocolError(f"connection is in ERROR, cannot send: {self._error}")
        try:
            if isinstance(event, (Pages, Checkpoint)) and event.nbytes > self._max_frame_size:
                raise LocalProtocolError(
                    f"{type(event).__name__} carries {event.nbytes} bytes of pages, more than "
                    f"max_frame_size={self._max_frame_size}; split it")
            self._state.process_event(self._role, event)
            body = encode_body(event, compress_level=self._compress_level)
            blen = body_len(body)
            if blen > self._max_frame_size:
                raise LocalProtocolError(f"{type(event).__name__} frame body is {blen} bytes, "
                                         f"more than max_frame_size={self._max_frame_size}")
        except LocalProtocolError as exc:
            self._fail(str(exc))
            raise
        return body, blen

    def _frame_out(self, ftype: FrameType, body: list[Buffer], blen: int,
                   items: list[tuple[Event, int]]) -> list[Buffer]:
        if self._seq_out > _MAX_SEQ:
            self._fail("frame sequence space exhausted")
            raise LocalProtocolError("frame sequence space exhausted")
        if ftype is FrameType.BATCH and blen > self._max_frame_size:
            # Only reachable with max_body > max_frame_size: refuse rather than send a frame
            # the peer must reject.
            self._fail("batch larger than max_frame_size")
            raise LocalProtocolError("batch larger than max_frame_size; lower max_body")
        parts = frame_parts(ftype, self._seq_out, body, self._key, blen)
        self._seq_out += 1
        self._frames_out += 1
        self._bytes_out += FRAME_OVERHEAD + blen
        for e, n in items:
            self._count_pages_out(e, n)
        return parts

    def _count_pages_out(self, event: Event, body_length: int) -> None:
        if (pb := page_bytes(event, body_length)) is not None:
            self._raw_out += pb[0]
            self._wire_out += pb[1]

    def _count_pages_in(self, event: Event, body_length: int) -> None:
        if (pb := page_bytes(event, body_length)) is not None:
            self._raw_in += pb[0]
            self._wire_in += pb[1]

    # -------------------------------------------------------------------- receiving

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes read from the peer; ``b""`` means the peer closed its side (EOF)."""
        if self._error is not None:
            raise LocalProtocolError(f"connection is in ERROR, not accepting data: {self._error}")
        if self._eof:
            raise LocalProtocolError("receive_data called after EOF")
        if len(data) == 0:
            self._eof = True
        else:
            self._buf.append(data)

    def frame_ready(self) -> bool:
        """Whether a whole frame is buffered, so :meth:`next_event` will not say NEED_DATA
        (lets a receiver acknowledge once per burst of epochs instead of once per epoch)."""
        if self._pending:
            return True
        head = self._buf.peek(HEADER_LEN)
        if len(head) < HEADER_LEN:
            return False
        return len(self._buf) >= FRAME_OVERHEAD + _LENGTH.unpack_from(head, 8)[0]

    def next_event(self) -> Event | NeedData:
        """Return the next event from the peer, NEED_DATA, or ConnectionClosed after EOF.

        Raises RemoteProtocolError (and enters ERROR) on any malformed, unauthenticated,
        out-of-sequence or illegal frame; TruncatedStream (a RemoteProtocolError) on EOF
        inside a frame: the peer stopped mid-send, which a receiver treats as a lost peer.
        """
        if self._error is not None:
            raise RemoteProtocolError(f"connection is in ERROR: {self._error}")
        if self._pending:
            return self._pending.popleft()
        try:
            frame = read_frame(self._buf, self._key, expected_seq=self._seq_in,
                               max_frame_size=self._max_frame_size)
            if frame is None:
                if not self._eof:
                    return NEED_DATA
                if self._buf:
                    raise TruncatedStream(
                        f"truncated frame at EOF: stream ended {len(self._buf)} bytes into a frame")
                return ConnectionClosed(clean=self.their_state is CLOSED)
            if isinstance(frame.event, Batch):
                return self._receive_batch(frame.event, frame.wire_len)
            try:
                self._state.process_event(self._role.peer, frame.event)
            except LocalProtocolError as exc:
                raise RemoteProtocolError(f"illegal event: {exc}") from None
        except RemoteProtocolError as exc:
            self._fail(str(exc))
            raise
        self._seq_in += 1
        self._bind(frame.event)
        self._frames_in += 1
        self._bytes_in += frame.wire_len
        self._count_pages_in(frame.event, frame.body_len)
        return frame.event

    def _receive_batch(self, batch: Batch, wire_len: int) -> Event:
        """Every event of a batch passes the state machine before the first is handed out:
        a batch with one illegal event is refused whole."""
        for e, _ in batch.items:
            try:
                self._state.process_event(self._role.peer, e)
            except LocalProtocolError as exc:
                raise RemoteProtocolError(f"illegal event in a batch: {exc}") from None
        self._seq_in += 1
        self._frames_in += 1
        self._bytes_in += wire_len
        for e, n in batch.items:
            self._count_pages_in(e, n)
        events = [e for e, _ in batch.items]
        self._pending.extend(events[1:])
        return events[0]

    def _bind(self, event: Event) -> None:
        """After an accepted HelloAck that carries the standby's fresh nonce, both ends
        authenticate with a key derived from the shared key, the Hello's session id and that
        nonce. Frames recorded from any other session (another nonce) then fail
        authentication: a replayed session can't be passed off to a standby, nor a standby's
        old answers to a primary."""
        if isinstance(event, HelloAck) and event.accepted and event.nonce:
            self._key = session_key(self._key, event.session_id, event.nonce)
            self.session_bound = True

    #: True once frames are authenticated with the per-session key (see ``_bind``).
    session_bound = False

    def _fail(self, why: str) -> None:
        self._pending.clear()
        self._error = why
        self._state.process_error()
        self._buf.clear()

    def __repr__(self) -> str:
        return (f"<Connection {self._role.value} ours={self.our_state.value} "
                f"theirs={self.their_state.value} out={self._seq_out} in={self._seq_in}>")
