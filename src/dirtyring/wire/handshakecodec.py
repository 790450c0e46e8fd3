"""Bodies of the two handshake events, Hello and HelloAck (``codec.py`` frames them).

Hello: ``!BI16s`` (role, version, session_id), then the config to the end of the body. A
primary that holds the group's key in etcd adds its fencing token: the role byte's high bit
(``HAS_TOKEN``) says a u64 token follows the config. A Hello without a token is byte for
byte what it was before tokens existed, so snapshot files (which start with a Hello frame)
written before still read.

HelloAck: ``!16sBB`` (session_id, accepted, len(nonce)), then the nonce and the reason.
"""
from __future__ import annotations

import struct
from typing import Any, Final

from dirtyring.errors import LocalProtocolError

from . import events as ev

_HELLO: Final = struct.Struct("!BI16s")       # role, version, session_id; config[, token]
_HELLO_ACK: Final = struct.Struct("!16sBB")   # session_id, accepted, len(nonce); nonce, reason
_TOKEN: Final = struct.Struct("!Q")
#: In Hello's role byte: a fencing token follows the config.
HAS_TOKEN: Final = 0x80
ROLE_CODES: Final = {"primary": 0, "standby": 1}


def encode_handshake(event: ev.Hello | ev.HelloAck) -> list[Any]:
    """The body of a Hello or HelloAck, as buffers."""
    if isinstance(event, ev.HelloAck):
        return [_HELLO_ACK.pack(event.session_id, event.accepted, len(event.nonce)),
                event.nonce + event.reason.encode("utf-8")]
    role = ROLE_CODES[event.role]
    if not event.token:
        return [_HELLO.pack(role, event.version, event.session_id), event.config]
    return [_HELLO.pack(role | HAS_TOKEN, event.version, event.session_id), event.config,
            _TOKEN.pack(event.token)]


def _head(s: struct.Struct, body: memoryview) -> tuple[tuple[Any, ...], memoryview]:
    if len(body) < s.size:
        raise struct.error(f"body is {len(body)} bytes, shorter than its {s.size}-byte head")
    return s.unpack_from(body), body[s.size:]


def _role(code: int) -> str:
    for name, c in ROLE_CODES.items():
        if c == code:
            return name
    raise LocalProtocolError(f"unknown role code {code}")


def _d_hello(body: memoryview, _: int) -> ev.Event:
    (role, version, session_id), rest = _head(_HELLO, body)
    token = 0
    if role & HAS_TOKEN:
        if len(rest) < _TOKEN.size:
            raise struct.error("the Hello ends inside its fencing token")
        (token,) = _TOKEN.unpack_from(rest, len(rest) - _TOKEN.size)
        rest, role = rest[:len(rest) - _TOKEN.size], role & ~HAS_TOKEN
        if not token:
            raise LocalProtocolError("a Hello flagged with a fencing token carries token 0")
    return ev.Hello(role=_role(role), version=version, session_id=session_id,
                    config=bytes(rest), token=token)


def _d_hello_ack(body: memoryview, _: int) -> ev.Event:
    (session_id, accepted, nonce_len), rest = _head(_HELLO_ACK, body)
    if accepted > 1:
        raise LocalProtocolError(f"accepted flag must be 0 or 1, got {accepted}")
    if nonce_len not in (0, ev.NONCE_LEN):
        raise LocalProtocolError(f"nonce length must be 0 or {ev.NONCE_LEN}, got {nonce_len}")
    if len(rest) < nonce_len:
        raise struct.error(f"body ends {nonce_len - len(rest)} bytes into the nonce")
    return ev.HelloAck(session_id=session_id, accepted=bool(accepted),
                       nonce=bytes(rest[:nonce_len]), reason=str(rest[nonce_len:], "utf-8"))
