"""The events of the replication/migration wire protocol.

Events are plain immutable values: the codec turns them into frames and back, and the state
machine in ``states.py`` decides which are legal when. Every constructor validates and
normalizes its input, so an event that exists is always encodable. Invalid values raise
:class:`~dirtyring.errors.LocalProtocolError` (the caller built something wrong); the codec
turns that into :class:`~dirtyring.errors.RemoteProtocolError` when the values came off the wire.

Don't subclass these: the codec and the state tables dispatch on the exact type.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from dirtyring.errors import LocalProtocolError

__all__ = [
    "Event", "Hello", "HelloAck", "EpochBegin", "Pages", "MachineBlob", "EpochEnd", "Ack",
    "Resync", "Heartbeat", "Failover", "Goodbye", "ConnectionClosed", "ROLES", "EPOCH_KINDS",
    "SESSION_ID_LEN", "NONCE_LEN", "MAX_DIGEST_LEN", "MAX_REASON_LEN", "MIN_PAGE_SIZE",
    "MAX_PAGE_SIZE"]

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

_U16: Final = (1 << 16) - 1
_U32: Final = (1 << 32) - 1
_U64: Final = (1 << 64) - 1


def _uint(name: str, value: object, limit: int = _U64) -> int:
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


def _bytes(name: str, value: object, *, exact: int | None = None,
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


def _reason(value: object) -> str:
    if not isinstance(value, str):
        raise LocalProtocolError(f"reason must be str, got {type(value).__name__}")
    try:
        encoded = value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise LocalProtocolError(f"reason is not encodable as UTF-8: {exc}") from None
    if len(encoded) > MAX_REASON_LEN:
        raise LocalProtocolError(f"reason longer than {MAX_REASON_LEN} bytes of UTF-8")
    return value


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise LocalProtocolError(f"{name} must be one of {allowed}, got {value!r}")
    return str(value)


def _set(obj: object, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)  # frozen dataclass: normalize in __post_init__


class Event:
    """Base of every protocol event; use it for isinstance checks and type hints."""

    __slots__ = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Hello(Event):
    """First frame of a session, sent by the primary: who it is and what VM it replicates.

    ``config`` is opaque (JSON of the VM configuration) so the wire layer never depends on the
    machine layer; the standby decides whether it can host that VM and answers :class:`HelloAck`.
    ``version`` is the sender's replication protocol version, for the standby to accept or
    refuse with a reason; the wire format version is separate and lives in every frame header.
    """

    role: str
    version: int
    session_id: bytes
    config: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _set(self, "role", _choice("role", self.role, ROLES))
        _set(self, "version", _uint("version", self.version, _U32))
        _set(self, "session_id", _bytes("session_id", self.session_id, exact=SESSION_ID_LEN))
        _set(self, "config", _bytes("config", self.config))


@dataclass(frozen=True, slots=True, kw_only=True)
class HelloAck(Event):
    """The standby's answer to :class:`Hello`; echoes the session id so answers can't cross.

    ``nonce`` is empty (no nonce) or NONCE_LEN fresh random bytes of the standby's, which a
    transport may mix into its session keys to bind the session to this standby's answer.
    """

    session_id: bytes
    accepted: bool
    reason: str = ""
    nonce: bytes = b""

    def __post_init__(self) -> None:
        _set(self, "session_id", _bytes("session_id", self.session_id, exact=SESSION_ID_LEN))
        if not isinstance(self.accepted, bool):
            raise LocalProtocolError("accepted must be bool")
        _set(self, "reason", _reason(self.reason))
        nonce = _bytes("nonce", self.nonce)
        if len(nonce) not in (0, NONCE_LEN):
            raise LocalProtocolError(
                f"nonce must be empty or exactly {NONCE_LEN} bytes, got {len(nonce)}")
        _set(self, "nonce", nonce)


@dataclass(frozen=True, slots=True, kw_only=True)
class EpochBegin(Event):
    """Opens epoch ``epoch``: ``kind`` "full" is all of memory (pages it leaves out are zero),
    "delta" only the pages dirtied since the previous epoch."""

    epoch: int
    kind: str

    def __post_init__(self) -> None:
        _set(self, "epoch", _uint("epoch", self.epoch))
        _set(self, "kind", _choice("kind", self.kind, EPOCH_KINDS))


@dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class Pages(Event):
    """A batch of guest pages of one memory slot, in ascending page-index order.

    ``pages`` may be given as a tuple or any integer array; it is stored as a read-only 1-D
    ``numpy.int64`` array (use :attr:`indices` for a precisely typed view). Indices must be
    strictly increasing so the codec can find runs with one vectorized pass and the receiver can
    apply them in one sweep. ``data`` holds ``len(pages) * page_size`` bytes, page ``i`` at
    ``data[i*page_size:(i+1)*page_size]``. With ``delta`` the data is the XOR of the new
    contents with the receiver's copy (mostly zero when a page changed a little: the codec
    sends sparse words). Equality compares values (arrays by content)."""

    epoch: int
    slot: int
    page_size: int
    pages: npt.NDArray[np.int64] | tuple[int, ...]
    data: bytes
    delta: bool = False
    #: Set by the decoder when the frame carried only the non-zero 64-bit words of ``data``:
    #: (word offsets into ``data``, their values). A receiver can apply a mostly-zero delta
    #: from these without touching every byte. Not part of equality.
    words: tuple[npt.NDArray[np.int64], npt.NDArray[np.uint64]] | None = field(
        default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        _set(self, "epoch", _uint("epoch", self.epoch))
        _set(self, "slot", _uint("slot", self.slot, _U32))
        ps = _uint("page_size", self.page_size, _U32)
        if ps < MIN_PAGE_SIZE or ps > MAX_PAGE_SIZE or ps & (ps - 1):
            raise LocalProtocolError(
                f"page_size={ps} must be a power of two in [{MIN_PAGE_SIZE}, {MAX_PAGE_SIZE}]")
        _set(self, "page_size", ps)
        given = isinstance(self.pages, np.ndarray)
        try:
            raw = self.pages if given else np.asarray(self.pages)
        except (TypeError, ValueError, OverflowError) as exc:
            raise LocalProtocolError(f"pages must be integer page indices: {exc}") from None
        assert isinstance(raw, np.ndarray)
        if raw.ndim != 1 or raw.size == 0:
            raise LocalProtocolError("pages must be a non-empty 1-D sequence of page indices")
        if raw.dtype.kind not in "iu":  # floats would truncate silently, bools are a bug
            raise LocalProtocolError(f"pages must be integer page indices, not {raw.dtype}")
        if raw.dtype == np.uint64 and raw.size and int(raw.max()) > np.iinfo(np.int64).max:
            raise LocalProtocolError("page index does not fit in int64")
        # Own an immutable copy: the caller may reuse its array for the next harvest.
        idx = raw.astype(np.int64, copy=given)
        if idx[0] < 0:
            raise LocalProtocolError("page indices must be non-negative")
        if idx.size > 1 and not bool(np.all(idx[1:] > idx[:-1])):
            raise LocalProtocolError("page indices must be strictly increasing")
        idx.setflags(write=False)
        _set(self, "pages", idx)
        data = _bytes("data", self.data)
        if len(data) != idx.size * ps:
            raise LocalProtocolError(
                f"data is {len(data)} bytes, expected {idx.size} pages * {ps} = {idx.size * ps}")
        _set(self, "data", data)

    @classmethod
    def decoded(cls, *, epoch: int, slot: int, page_size: int, pages: npt.NDArray[np.int64],
                data: bytes | None, delta: bool,
                words: tuple[npt.NDArray[np.int64], npt.NDArray[np.uint64]] | None = None
                ) -> Pages:
        """Build from values already checked (by the wire decoder, or our own sender) without
        checking them again: replication builds thousands a second. ``data=None`` with
        ``words`` (increasing word offsets, all other words zero) builds the bytes only when
        read: whoever works from the words never pays for 256 KiB of mostly zero bytes."""
        obj = object.__new__(cls)
        pages.setflags(write=False)
        for name, value in (("epoch", epoch), ("slot", slot), ("page_size", page_size),
                            ("pages", pages), ("data", data), ("delta", delta),
                            ("words", words)):
            _set(obj, name, value)
        return obj

    @property
    def nbytes(self) -> int:  # of page data, without building lazy data
        return len(self.pages) * self.page_size

    @property
    def lazy(self) -> bool:  # is ``data`` still only its sparse ``words``?
        return _PAGES_DATA.__get__(self, Pages) is None

    @property
    def indices(self) -> npt.NDArray[np.int64]:
        """The page indices as the read-only int64 array they are stored as."""
        assert isinstance(self.pages, np.ndarray)
        return self.pages

    @property
    def n_pages(self) -> int:
        return len(self.pages)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Pages):
            return NotImplemented
        return (self.epoch == other.epoch and self.slot == other.slot
                and self.page_size == other.page_size and self.delta == other.delta
                and np.array_equal(self.indices, other.indices) and self.data == other.data)

    def __hash__(self) -> int:
        return hash((self.epoch, self.slot, self.page_size, self.indices.tobytes(), self.data))

    def __repr__(self) -> str:  # never dump megabytes of page data into a log line
        return (f"Pages(epoch={self.epoch}, slot={self.slot}, page_size={self.page_size}, "
                f"{'delta, ' if self.delta else ''}"
                f"n_pages={self.n_pages}, first={int(self.indices[0])}, "
                f"last={int(self.indices[-1])})")


class _LazyData:
    """``Pages.data`` over the dataclass's own slot: built from the words on first read."""

    def __get__(self, obj: Any, owner: Any = None) -> Any:
        if obj is None:
            return self
        if (data := _PAGES_DATA.__get__(obj, owner)) is None:
            out = np.zeros(len(obj.pages) * obj.page_size // 8, np.uint64)
            out[obj.words[0]] = obj.words[1]
            _PAGES_DATA.__set__(obj, data := out.tobytes())
        return data

    def __set__(self, obj: Any, value: Any) -> None:
        _PAGES_DATA.__set__(obj, value)


_PAGES_DATA: Final = Pages.__dict__["data"]
Pages.data = _LazyData()  # type: ignore[assignment,misc]


@dataclass(frozen=True, slots=True, kw_only=True)
class MachineBlob(Event):
    """Opaque vCPU/device state for ``epoch`` (the machine layer's versioned format bytes)."""

    epoch: int
    blob: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _set(self, "epoch", _uint("epoch", self.epoch))
        _set(self, "blob", _bytes("blob", self.blob))


@dataclass(frozen=True, slots=True, kw_only=True)
class EpochEnd(Event):
    """Closes ``epoch``: the standby may commit it once it has seen ``n_pages`` pages.

    ``digest`` (optional, may be empty) is a memory digest the receiver can check after applying
    the epoch; ``output_seq`` is the primary's output sequence this epoch's state covers, so
    output buffered up to it can be released once the epoch is acknowledged.
    """

    epoch: int
    n_pages: int
    digest: bytes = b""
    output_seq: int

    def __post_init__(self) -> None:
        _set(self, "epoch", _uint("epoch", self.epoch))
        _set(self, "n_pages", _uint("n_pages", self.n_pages))
        _set(self, "digest", _bytes("digest", self.digest, limit=MAX_DIGEST_LEN))
        _set(self, "output_seq", _uint("output_seq", self.output_seq))


@dataclass(frozen=True, slots=True, kw_only=True)
class Ack(Event):
    """The standby has committed every epoch up to and including ``epoch`` (cumulative)."""

    epoch: int

    def __post_init__(self) -> None:
        _set(self, "epoch", _uint("epoch", self.epoch))


@dataclass(frozen=True, slots=True, kw_only=True)
class Resync(Event):
    """The standby no longer trusts its committed memory and asks for a full copy.

    Sent when verification found that committed memory differs from what the primary computed
    for ``epoch`` (its EpochEnd digest), or the standby otherwise lost confidence. ``epoch``
    names an epoch that has ended; unlike :class:`Ack` it need not be past the last Ack (an
    acked epoch can fail verification later). The primary's next EpochBegin must be ``full``.
    """

    epoch: int
    reason: str

    def __post_init__(self) -> None:
        _set(self, "epoch", _uint("epoch", self.epoch))
        _set(self, "reason", _reason(self.reason))


@dataclass(frozen=True, slots=True, kw_only=True)
class Heartbeat(Event):
    """Liveness probe; ``sent_ns`` is the sender's monotonic clock, echoed for RTT estimates."""

    seq: int
    sent_ns: int

    def __post_init__(self) -> None:
        _set(self, "seq", _uint("seq", self.seq))
        _set(self, "sent_ns", _uint("sent_ns", self.sent_ns))


@dataclass(frozen=True, slots=True, kw_only=True)
class Failover(Event):
    """The sender ends replication by failing over.

    From the primary it means "take over now" (planned switchover, end of a migration); from
    the standby, "I have taken over" (fencing a primary that is still alive).
    """

    reason: str

    def __post_init__(self) -> None:
        _set(self, "reason", _reason(self.reason))


@dataclass(frozen=True, slots=True, kw_only=True)
class Goodbye(Event):
    """Orderly end of the session from the sender's side."""

    reason: str = ""

    def __post_init__(self) -> None:
        _set(self, "reason", _reason(self.reason))


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionClosed(Event):
    """Not a frame: ``next_event`` returns it once the peer's byte stream ended at a frame boundary.

    ``clean`` is True when the peer said Goodbye or Failover first; False means the stream just
    stopped, which a standby usually treats as "primary lost".
    """

    clean: bool
