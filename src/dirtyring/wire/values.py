"""What wire events are made of: their base class, the checks on their values, and limits.

Every event's constructor validates and normalizes its input with these checks, so an event
that exists is always encodable. Invalid values raise
:class:`~dirtyring.errors.LocalProtocolError` (the caller built something wrong); the codec
turns that into :class:`~dirtyring.errors.RemoteProtocolError` when the values came off the wire.
"""
from __future__ import annotations

import operator
from typing import Any, Final

from dirtyring.errors import LocalProtocolError

__all__ = [
    "Event", "ROLES", "EPOCH_KINDS", "SESSION_ID_LEN", "NONCE_LEN", "MAX_DIGEST_LEN",
    "MAX_REASON_LEN", "MIN_PAGE_SIZE", "MAX_PAGE_SIZE", "U32_MAX", "check_uint", "check_bytes",
    "check_reason", "check_choice", "set_field"]

ROLES: Final = ("primary", "standby")
EPOCH_KINDS: Final = ("full", "delta")
SESSION_ID_LEN: Final = 16
#: HelloAck.nonce is this long, or empty (no nonce).
NONCE_LEN: Final = 16
#: A digest longer than SHA-512 is surely a bug; the bound also keeps EpochEnd tiny.
MAX_DIGEST_LEN: Final = 64
#: Reasons are for humans and logs, not for payloads.
MAX_REASON_LEN: Final = 4096
#: Page sizes are powers of two; 512 keeps pages a multiple of 8 bytes (numpy u64 zero scan),
#: and 1 GiB covers the largest x86 huge page.
MIN_PAGE_SIZE: Final = 512
MAX_PAGE_SIZE: Final = 1 << 30

U32_MAX: Final = (1 << 32) - 1
U64_MAX: Final = (1 << 64) - 1


def check_uint(name: str, value: object, limit: int = U64_MAX) -> int:
    """Return ``value`` as a plain int in ``[0, limit]`` (bool is rejected: it is a bug)."""
    if isinstance(value, bool):
        raise LocalProtocolError(f"{name} must be an integer, not bool")
    try:
        v = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise LocalProtocolError(f"{name} must be an integer, got {type(value).__name__}") from None
    if not 0 <= v <= limit:
        raise LocalProtocolError(f"{name}={v} out of range [0, {limit}]")
    return int(v)


def check_bytes(name: str, value: object, *, exact: int | None = None,
           limit: int | None = None) -> bytes:
    """Return ``value`` as immutable bytes (bytearray/memoryview are copied once)."""
    if isinstance(value, bytes):
        b = value
    elif isinstance(value, (bytearray, memoryview)):
        b = bytes(value)
    else:
        raise LocalProtocolError(f"{name} must be bytes, got {type(value).__name__}")
    if exact is not None and len(b) != exact:
        raise LocalProtocolError(f"{name} must be exactly {exact} bytes, got {len(b)}")
    if limit is not None and len(b) > limit:
        raise LocalProtocolError(f"{name} is {len(b)} bytes, limit is {limit}")
    return b


def check_reason(value: object) -> str:
    if not isinstance(value, str):
        raise LocalProtocolError(f"reason must be str, got {type(value).__name__}")
    try:
        encoded = value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise LocalProtocolError(f"reason is not encodable as UTF-8: {exc}") from None
    if len(encoded) > MAX_REASON_LEN:
        raise LocalProtocolError(f"reason longer than {MAX_REASON_LEN} bytes of UTF-8")
    return value


def check_choice(name: str, value: object, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise LocalProtocolError(f"{name} must be one of {allowed}, got {value!r}")
    return str(value)


def set_field(obj: object, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)  # frozen dataclass: normalize in __post_init__


class Event:
    """Base of every protocol event; use it for isinstance checks and type hints."""

    __slots__ = ()

