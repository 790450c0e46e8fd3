"""The events of the replication/migration wire protocol.

Events are plain immutable values: the codec turns them into frames and back, and the state
machine in ``states.py`` decides which are legal when. Every constructor validates and
normalizes its input (with the checks in ``values.py``), so an event that exists is always
encodable. The events that carry pages are in ``pages.py`` and re-exported here.

Don't subclass these: the codec and the state tables dispatch on the exact type.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from dirtyring.errors import LocalProtocolError

from .pages import Checkpoint, Pages
from .values import (EPOCH_KINDS, MAX_DIGEST_LEN, MAX_PAGE_SIZE, MAX_REASON_LEN, MIN_PAGE_SIZE,
                     NONCE_LEN, ROLES, SESSION_ID_LEN, U32_MAX, Event, check_bytes, check_choice,
                     check_reason, check_uint, set_field)

__all__ = [
    "Event", "Hello", "HelloAck", "EpochBegin", "Pages", "MachineBlob", "EpochEnd",
    "Checkpoint", "Ack", "Resync", "Heartbeat", "Failover", "Goodbye", "ConnectionClosed",
    "ROLES", "EPOCH_KINDS", "SESSION_ID_LEN", "NONCE_LEN", "MAX_DIGEST_LEN", "MAX_REASON_LEN",
    "MIN_PAGE_SIZE", "MAX_PAGE_SIZE", "PROTOCOL_VERSION"]


#: The replication protocol (the events peers exchange and what they mean), sent in
#: ``Hello.version``: 2 added Checkpoint. A standby or migration target refuses another version
#: at the handshake, with the reason, instead of failing at the first event it does not know.
#: The frame format's own version (``WIRE_VERSION``) is separate: snapshot files use it too.
PROTOCOL_VERSION: Final = 3


@dataclass(frozen=True, slots=True, kw_only=True)
class Hello(Event):
    """First frame of a session, sent by the primary: who it is and what VM it replicates.

    ``config`` is opaque (JSON of the VM configuration) so the wire layer never depends on the
    machine layer; the standby decides whether it can host that VM and answers :class:`HelloAck`.
    ``version`` is the sender's replication protocol version, for the standby to accept or
    refuse with a reason; the wire format version is separate and lives in every frame header.
    ``token`` is the primary's fencing token: the revision of the group's key in etcd it holds
    (0: no arbiter), so a standby can refuse a primary whose tenure is over.
    """

    role: str
    version: int
    session_id: bytes
    config: bytes = field(repr=False)
    token: int = 0

    def __post_init__(self) -> None:
        set_field(self, "role", check_choice("role", self.role, ROLES))
        set_field(self, "version", check_uint("version", self.version, U32_MAX))
        set_field(self, "token", check_uint("token", self.token))
        set_field(self, "session_id", check_bytes("session_id", self.session_id, exact=SESSION_ID_LEN))
        set_field(self, "config", check_bytes("config", self.config))


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
        set_field(self, "session_id", check_bytes("session_id", self.session_id, exact=SESSION_ID_LEN))
        if not isinstance(self.accepted, bool):
            raise LocalProtocolError("accepted must be bool")
        set_field(self, "reason", check_reason(self.reason))
        nonce = check_bytes("nonce", self.nonce)
        if len(nonce) not in (0, NONCE_LEN):
            raise LocalProtocolError(
                f"nonce must be empty or exactly {NONCE_LEN} bytes, got {len(nonce)}")
        set_field(self, "nonce", nonce)


@dataclass(frozen=True, slots=True, kw_only=True)
class EpochBegin(Event):
    """Opens epoch ``epoch``: ``kind`` "full" is all of memory (pages it leaves out are zero),
    "delta" only the pages dirtied since the previous epoch."""

    epoch: int
    kind: str

    def __post_init__(self) -> None:
        set_field(self, "epoch", check_uint("epoch", self.epoch))
        set_field(self, "kind", check_choice("kind", self.kind, EPOCH_KINDS))




@dataclass(frozen=True, slots=True, kw_only=True)
class MachineBlob(Event):
    """Opaque vCPU/device state for ``epoch`` (the machine layer's versioned format bytes)."""

    epoch: int
    blob: bytes = field(repr=False)

    def __post_init__(self) -> None:
        set_field(self, "epoch", check_uint("epoch", self.epoch))
        set_field(self, "blob", check_bytes("blob", self.blob))


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
        set_field(self, "epoch", check_uint("epoch", self.epoch))
        set_field(self, "n_pages", check_uint("n_pages", self.n_pages))
        set_field(self, "digest", check_bytes("digest", self.digest, limit=MAX_DIGEST_LEN))
        set_field(self, "output_seq", check_uint("output_seq", self.output_seq))




@dataclass(frozen=True, slots=True, kw_only=True)
class Ack(Event):
    """The standby has committed every epoch up to and including ``epoch`` (cumulative), for
    the primary whose fencing token is ``token`` (its Hello's; 0: no arbiter)."""

    epoch: int
    token: int = 0

    def __post_init__(self) -> None:
        set_field(self, "epoch", check_uint("epoch", self.epoch))
        set_field(self, "token", check_uint("token", self.token))


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
        set_field(self, "epoch", check_uint("epoch", self.epoch))
        set_field(self, "reason", check_reason(self.reason))


@dataclass(frozen=True, slots=True, kw_only=True)
class Heartbeat(Event):
    """Liveness probe; ``sent_ns`` is the sender's monotonic clock, echoed for RTT estimates."""

    seq: int
    sent_ns: int

    def __post_init__(self) -> None:
        set_field(self, "seq", check_uint("seq", self.seq))
        set_field(self, "sent_ns", check_uint("sent_ns", self.sent_ns))


@dataclass(frozen=True, slots=True, kw_only=True)
class Failover(Event):
    """The sender ends replication by failing over.

    From the primary it means "take over now" (planned switchover, end of a migration); from
    the standby, "I have taken over" (fencing a primary that is still alive).
    """

    reason: str

    def __post_init__(self) -> None:
        set_field(self, "reason", check_reason(self.reason))


@dataclass(frozen=True, slots=True, kw_only=True)
class Goodbye(Event):
    """Orderly end of the session from the sender's side."""

    reason: str = ""

    def __post_init__(self) -> None:
        set_field(self, "reason", check_reason(self.reason))


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionClosed(Event):
    """Not a frame: ``next_event`` returns it once the peer's byte stream ended at a frame boundary.

    ``clean`` is True when the peer said Goodbye or Failover first; False means the stream just
    stopped, which a standby usually treats as "primary lost".
    """

    clean: bool
