"""Frames: events <-> bytes. Stateless; ``connection.py`` owns the sequence counters.

Frame layout (all integers big-endian)::

    offset  size  field
         0     4  magic      b"DRW1"
         4     2  version    WIRE_VERSION (1)
         6     2  type       FrameType
         8     4  length     body length in bytes, at most max_frame_size (64 MiB by default)
        12     8  sequence   0, 1, 2, ... per direction; detects replay, loss and reordering
        20     4  crc32      zlib.crc32 over header bytes 0..19 + body
        24     n  body       per-type layout: encode_body / the _d_* decoders below
      24+n    32  mac        HMAC-SHA256(key, header + body)

The MAC alone cannot tell a flipped bit from a wrong key: the CRC is checked first, so
corruption reads "corrupt frame" and only an intact, unauthenticated frame reads
"authentication failed". The MAC covers the sequence number: no replay within a session.

A BATCH frame (type 12) carries several events: its body is a run of sub-frames, each a u16
type and u32 length followed by that type's body. One header, CRC and MAC then cover a whole
epoch; Hello and HelloAck never travel in a batch (the session key changes after them).

Bodies are fixed ``struct`` heads; a variable-length last field (config, reason, blob, digest)
runs to the end of the body; HelloAck's nonce has a u8 length (0 or 16) in the head. Pages and
Checkpoint bodies are described in ``pagecodec.py``.
"""
from __future__ import annotations

import enum
import hashlib
import hmac
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from dirtyring.errors import LocalProtocolError, RemoteProtocolError

from . import events as ev
from .handshakecodec import _d_hello, _d_hello_ack, encode_handshake
from .pagecodec import (EPOCH_KIND_CODES, Buffer, PageEncoding, decode_checkpoint, decode_pages,
                        encode_checkpoint_parts, encode_pages_parts, epoch_kind, page_bytes)
from .receivebuffer import ReceiveBuffer

__all__ = [
    "MAGIC", "WIRE_VERSION", "HEADER_LEN", "MAC_LEN", "FRAME_OVERHEAD", "MAX_FRAME_SIZE",
    "FrameType", "PageEncoding", "Frame", "Batch", "Buffer", "batch_body", "UNBATCHABLE",
    "frame_type_of", "encode_event", "encode_body", "encode_pages_parts", "frame_parts",
    "frame_size", "body_len", "page_bytes", "read_frame", "decode_body",
]

MAGIC: Final = b"DRW1"
WIRE_VERSION: Final = 1
HEADER: Final = struct.Struct("!4sHHIQI")
HEADER_LEN: Final = HEADER.size                # 24
_CRC_OFFSET: Final = 20                        # the crc covers the header up to itself
MAC_LEN: Final = 32
FRAME_OVERHEAD: Final = HEADER_LEN + MAC_LEN
MAX_FRAME_SIZE: Final = 64 * 1024 * 1024
_LENGTH: Final = struct.Struct("!I")


class FrameType(enum.IntEnum):
    """The u16 type field; values are part of the wire format and never reused."""

    HELLO = 1
    HELLO_ACK = 2
    EPOCH_BEGIN = 3
    PAGES = 4
    MACHINE_BLOB = 5
    EPOCH_END = 6
    ACK = 7
    HEARTBEAT = 8
    FAILOVER = 9
    GOODBYE = 10
    RESYNC = 11
    BATCH = 12
    CHECKPOINT = 13


@dataclass(frozen=True, slots=True)
class Batch:
    """A BATCH frame's events with their body lengths; the connection hands them out singly."""

    items: tuple[tuple[ev.Event, int], ...]


UNBATCHABLE: Final = frozenset({FrameType.HELLO, FrameType.HELLO_ACK, FrameType.BATCH})


def batch_body(subs: Sequence[tuple[int, Sequence[Buffer], int]]) -> list[Buffer]:
    """The body of a BATCH frame from (type, body parts, body length) triples."""
    out: list[Buffer] = []
    for ftype, body, length in subs:
        out.append(_BATCH_SUB.pack(ftype, length))
        out.extend(body)
    return out


def _d_batch(body: memoryview, max_pages_bytes: int) -> Batch:
    items, off = [], 0
    while off < len(body):
        if len(body) - off < _BATCH_SUB.size:
            raise LocalProtocolError("batch ends inside a sub-frame head")
        ftype, length = _BATCH_SUB.unpack_from(body, off)
        off += _BATCH_SUB.size
        if length > len(body) - off:
            raise LocalProtocolError("batch sub-frame runs past the end of the frame")
        try:
            kind = FrameType(ftype)
        except ValueError:
            raise LocalProtocolError(f"unknown frame type {ftype} in a batch") from None
        if kind in UNBATCHABLE:
            raise LocalProtocolError(f"{kind.name} may not travel inside a batch")
        items.append((e := _DECODERS[kind](body[off:off + length], max_pages_bytes), length))
        off, max_pages_bytes = off + length, max_pages_bytes - getattr(e, "nbytes", 0)
    if not items:
        raise LocalProtocolError("empty batch")
    return Batch(items=tuple(items))


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded, verified frame; sizes are for statistics."""

    type: FrameType
    seq: int
    event: ev.Event | Batch
    body_len: int

    @property
    def wire_len(self) -> int:
        return self.body_len + FRAME_OVERHEAD


_TYPE_OF: Final[dict[type, FrameType]] = {
    ev.Hello: FrameType.HELLO, ev.HelloAck: FrameType.HELLO_ACK,
    ev.EpochBegin: FrameType.EPOCH_BEGIN, ev.Pages: FrameType.PAGES,
    ev.MachineBlob: FrameType.MACHINE_BLOB, ev.EpochEnd: FrameType.EPOCH_END,
    ev.Ack: FrameType.ACK, ev.Heartbeat: FrameType.HEARTBEAT,
    ev.Failover: FrameType.FAILOVER, ev.Goodbye: FrameType.GOODBYE,
    ev.Resync: FrameType.RESYNC, ev.Checkpoint: FrameType.CHECKPOINT,
}

_EPOCH_BEGIN: Final = struct.Struct("!QB")    # epoch, kind
_U64: Final = struct.Struct("!Q")             # MachineBlob/Resync.epoch, then more
_ACK: Final = struct.Struct("!QQ")            # epoch, token (just epoch: token 0)
_EPOCH_END: Final = struct.Struct("!QQQ")     # epoch, n_pages, output_seq; then digest
_HEARTBEAT: Final = struct.Struct("!QQ")      # seq, sent_ns
_BATCH_SUB: Final = struct.Struct("!HI")       # type, body length; then the body


# ------------------------------------------------------------------------------- encoding


def encode_body(event: ev.Event, *, compress_level: int = 1) -> list[Buffer]:
    """Encode the body of ``event`` (no header, no MAC) as a list of buffers."""
    if isinstance(event, ev.Pages):
        return encode_pages_parts(event, compress_level=compress_level)
    if isinstance(event, ev.Checkpoint):
        return encode_checkpoint_parts(event, compress_level=compress_level)
    if isinstance(event, (ev.Hello, ev.HelloAck)):
        return encode_handshake(event)
    if isinstance(event, ev.EpochBegin):
        return [_EPOCH_BEGIN.pack(event.epoch, EPOCH_KIND_CODES[event.kind])]
    if isinstance(event, ev.MachineBlob):
        return [_U64.pack(event.epoch), event.blob]
    if isinstance(event, ev.EpochEnd):
        return [_EPOCH_END.pack(event.epoch, event.n_pages, event.output_seq), event.digest]
    if isinstance(event, ev.Ack):
        if not event.token:
            return [_U64.pack(event.epoch)]
        return [_ACK.pack(event.epoch, event.token)]
    if isinstance(event, ev.Resync):
        return [_U64.pack(event.epoch), event.reason.encode("utf-8")]
    if isinstance(event, ev.Heartbeat):
        return [_HEARTBEAT.pack(event.seq, event.sent_ns)]
    if isinstance(event, (ev.Failover, ev.Goodbye)):
        return [event.reason.encode("utf-8")]
    raise LocalProtocolError(f"{type(event).__name__} is not a wire event")


_MAC_TEMPLATES: dict[bytes, Any] = {}
_JOIN_MAX: Final = 64 * 1024  # bodies up to this size are joined before crc and MAC


def _mac(key: bytes) -> Any:
    """A fresh HMAC-SHA256 for ``key``, copied from a keyed template (keying costs as much as
    hashing a small frame, and every frame needs one)."""
    t = _MAC_TEMPLATES.get(key)
    if t is None:
        if len(_MAC_TEMPLATES) > 64:
            _MAC_TEMPLATES.clear()
        t = _MAC_TEMPLATES[key] = hmac.new(key, digestmod=hashlib.sha256)
    return t.copy()


def body_len(body: Sequence[Buffer]) -> int:
    return sum(b.nbytes if type(b) is memoryview else len(b) for b in body)


def frame_parts(ftype: int, seq: int, body: Sequence[Buffer], key: bytes,
                length: int | None = None) -> list[Buffer]:
    """Wrap body buffers into a frame: ``[header, *body, mac]``; the body is not copied."""
    if length is None:
        length = body_len(body)
    if length > 0xFFFF_FFFF:
        raise LocalProtocolError(f"frame body of {length} bytes does not fit the length field")
    if len(body) > 2 and length <= _JOIN_MAX:  # a batch: one copy beats a MAC update per piece
        body = [b"".join(body)]
    crc = zlib.crc32(HEADER.pack(MAGIC, WIRE_VERSION, ftype, length, seq, 0)[:_CRC_OFFSET])
    for b in body:
        crc = zlib.crc32(b, crc)
    header = HEADER.pack(MAGIC, WIRE_VERSION, ftype, length, seq, crc)
    mac = _mac(key)
    mac.update(header)
    for b in body:
        mac.update(b)
    return [header, *body, mac.digest()]


def frame_type_of(event: object) -> FrameType:
    """The frame type that carries ``event``; LocalProtocolError if it never goes on the wire."""
    ftype = _TYPE_OF.get(type(event))
    if ftype is None:
        raise LocalProtocolError(f"{type(event).__name__} is not a wire event")
    return ftype


def encode_event(event: ev.Event, seq: int, key: bytes, *, compress_level: int = 1,
                 max_frame_size: int = MAX_FRAME_SIZE) -> list[Buffer]:
    """Encode ``event`` as frame number ``seq``; raises LocalProtocolError if it can't be sent."""
    ftype = frame_type_of(event)
    if isinstance(event, (ev.Pages, ev.Checkpoint)) and event.nbytes > max_frame_size:
        # The receiver caps how far one frame may expand by the same limit.
        raise LocalProtocolError(f"{type(event).__name__} carries {event.nbytes} bytes of pages, more than "
                                 f"max_frame_size={max_frame_size}; split it")
    body = encode_body(event, compress_level=compress_level)
    length = body_len(body)
    if length > max_frame_size:
        raise LocalProtocolError(f"{type(event).__name__} frame body is {length} bytes, more "
                                 f"than max_frame_size={max_frame_size}; split it")
    return frame_parts(ftype, seq, body, key, length)


def frame_size(parts: Sequence[Buffer]) -> int:
    """Bytes on the wire of a frame ``encode_event`` returned (its header says)."""
    return FRAME_OVERHEAD + _LENGTH.unpack_from(parts[0], 8)[0]


# ------------------------------------------------------------------------------- decoding


def read_frame(buf: ReceiveBuffer, key: bytes, *, expected_seq: int,
               max_frame_size: int = MAX_FRAME_SIZE) -> Frame | None:
    """Cut one verified frame off the front of ``buf``; None if more bytes are needed.

    Checks run cheapest-and-most-specific first, so the error names the real problem: magic,
    version and size as soon as the header is in; then crc (corruption), MAC (key or tampering),
    sequence (replay/reorder), type and body. Raises RemoteProtocolError.
    """
    head = buf.peek(HEADER_LEN)
    if head[:len(MAGIC)] != MAGIC[:len(head)]:
        raise RemoteProtocolError(f"bad magic {head[:len(MAGIC)]!r} (expected {MAGIC!r}): "
                                  "not a dirtyring wire stream, or the stream lost sync")
    if len(head) < HEADER_LEN:
        return None
    _, version, ftype, length, seq, crc = HEADER.unpack(head)
    if version != WIRE_VERSION:
        raise RemoteProtocolError(
            f"unsupported wire version {version} (this end speaks {WIRE_VERSION})")
    if length > max_frame_size:
        raise RemoteProtocolError(
            f"oversize frame: body length {length} exceeds the {max_frame_size}-byte cap")
    total = HEADER_LEN + length + MAC_LEN
    if len(buf) < total:
        return None
    frame = memoryview(buf.consume(total))
    signed = frame[:HEADER_LEN + length]
    body = frame[HEADER_LEN:HEADER_LEN + length]
    if zlib.crc32(body, zlib.crc32(frame[:_CRC_OFFSET])) != crc:
        raise RemoteProtocolError(
            f"corrupt frame: crc32 mismatch (frame with a {length}-byte body; bit error, "
            "truncation or a cut-and-spliced stream)")
    if not hmac.compare_digest(hmac.digest(key, signed, "sha256"),
                               frame[HEADER_LEN + length:]):
        raise RemoteProtocolError(
            "authentication failed: HMAC mismatch (wrong key, or the frame was forged)")
    if seq < expected_seq:
        raise RemoteProtocolError(
            f"replayed frame: sequence {seq} was already received (expected {expected_seq})")
    if seq > expected_seq:
        raise RemoteProtocolError(f"out-of-order frame: sequence {seq}, expected {expected_seq} "
                                  "(frames lost or reordered)")
    try:
        kind = FrameType(ftype)
    except ValueError:
        raise RemoteProtocolError(f"unknown frame type {ftype}") from None
    event = decode_body(kind, body, max_pages_bytes=max_frame_size)
    return Frame(type=kind, seq=seq, event=event, body_len=length)


def decode_body(ftype: FrameType, body: memoryview, *,
                max_pages_bytes: int) -> ev.Event | Batch:
    """Decode a verified body; any malformation raises RemoteProtocolError naming the type."""
    try:
        return _DECODERS[ftype](body, max_pages_bytes)
    except (struct.error, UnicodeDecodeError, KeyError, LocalProtocolError) as exc:
        raise RemoteProtocolError(f"malformed {ftype.name} frame: {exc}") from None


def _exact(s: struct.Struct, body: memoryview) -> tuple[Any, ...]:
    if len(body) != s.size:
        raise struct.error(f"body is {len(body)} bytes, expected {s.size}")
    return s.unpack(body)


def _head(s: struct.Struct, body: memoryview) -> tuple[tuple[Any, ...], memoryview]:
    if len(body) < s.size:
        raise struct.error(f"body is {len(body)} bytes, shorter than its {s.size}-byte head")
    return s.unpack_from(body), body[s.size:]


def _d_epoch_begin(body: memoryview, _: int) -> ev.Event:
    epoch, kind = _exact(_EPOCH_BEGIN, body)
    return ev.EpochBegin(epoch=epoch, kind=epoch_kind(kind))


def _d_machine_blob(body: memoryview, _: int) -> ev.Event:
    (epoch,), rest = _head(_U64, body)
    return ev.MachineBlob(epoch=epoch, blob=bytes(rest))


def _d_epoch_end(body: memoryview, _: int) -> ev.Event:
    (epoch, n_pages, output_seq), rest = _head(_EPOCH_END, body)
    return ev.EpochEnd(epoch=epoch, n_pages=n_pages, output_seq=output_seq, digest=bytes(rest))


def _d_ack(body: memoryview, _: int) -> ev.Event:
    if len(body) == _U64.size:
        return ev.Ack(epoch=_exact(_U64, body)[0])
    epoch, token = _exact(_ACK, body)
    if not token:
        raise LocalProtocolError("an Ack with a token field carries token 0")
    return ev.Ack(epoch=epoch, token=token)


def _d_resync(body: memoryview, _: int) -> ev.Event:
    (epoch,), rest = _head(_U64, body)
    return ev.Resync(epoch=epoch, reason=str(rest, "utf-8"))


def _d_heartbeat(body: memoryview, _: int) -> ev.Event:
    seq, sent_ns = _exact(_HEARTBEAT, body)
    return ev.Heartbeat(seq=seq, sent_ns=sent_ns)


def _d_failover(body: memoryview, _: int) -> ev.Event:
    return ev.Failover(reason=str(body, "utf-8"))


def _d_goodbye(body: memoryview, _: int) -> ev.Event:
    return ev.Goodbye(reason=str(body, "utf-8"))


_DECODERS: Final[dict[FrameType, Callable[[memoryview, int], ev.Event]]] = {
    FrameType.HELLO: _d_hello, FrameType.HELLO_ACK: _d_hello_ack,
    FrameType.EPOCH_BEGIN: _d_epoch_begin, FrameType.PAGES: decode_pages,
    FrameType.MACHINE_BLOB: _d_machine_blob, FrameType.EPOCH_END: _d_epoch_end,
    FrameType.ACK: _d_ack, FrameType.HEARTBEAT: _d_heartbeat,
    FrameType.FAILOVER: _d_failover, FrameType.GOODBYE: _d_goodbye,
    FrameType.RESYNC: _d_resync, FrameType.CHECKPOINT: decode_checkpoint,
}
_DECODERS[FrameType.BATCH] = _d_batch  # type: ignore[assignment]
