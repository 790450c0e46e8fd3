"""Event constructors validate and normalize; Pages compares by value and stays immutable."""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any

import numpy as np
import pytest

from dirtyring.errors import LocalProtocolError
from dirtyring.wire import (
    Ack, EpochBegin, EpochEnd, Failover, Goodbye, Heartbeat, Hello, HelloAck, MachineBlob, Pages,
    Resync,
)

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # wire_helpers sits beside the tests; works in any import mode
    sys.path.insert(0, _HERE)
from wire_helpers import NONCE, PAGE, SESSION, hello, mixed_pages  # noqa: E402


def pages(**kw: Any) -> Pages:
    args: dict[str, Any] = dict(epoch=1, slot=0, page_size=PAGE, pages=(3, 4),
                                data=bytes(2 * PAGE))
    args.update(kw)
    return Pages(**args)


BAD: list[tuple[str, Any]] = [
    ("role", lambda: Hello(role="witness", version=1, session_id=SESSION, config=b"")),
    ("session_id", lambda: Hello(role="primary", version=1, session_id=b"x" * 15, config=b"")),
    ("config",
     lambda: Hello(role="primary", version=1, session_id=SESSION,
                   config="{}")),  # type: ignore[arg-type]
    ("version", lambda: Hello(role="primary", version=1 << 32, session_id=SESSION, config=b"")),
    ("accepted", lambda: HelloAck(session_id=SESSION, accepted=1)),  # type: ignore[arg-type]
    ("nonce must be empty or exactly 16",
     lambda: HelloAck(session_id=SESSION, accepted=True, nonce=b"n" * 15)),
    ("nonce must be empty or exactly 16",
     lambda: HelloAck(session_id=SESSION, accepted=True, nonce=b"n" * 17)),
    ("nonce must be bytes",
     lambda: HelloAck(session_id=SESSION, accepted=True,
                      nonce=NONCE.hex())),  # type: ignore[arg-type]
    ("epoch", lambda: Resync(epoch=-1, reason="x")),
    ("epoch", lambda: Resync(epoch=True, reason="x")),
    ("reason", lambda: Resync(epoch=1, reason="x" * 4097)),
    ("reason must be str", lambda: Resync(epoch=1, reason=b"x")),  # type: ignore[arg-type]
    ("kind", lambda: EpochBegin(epoch=1, kind="partial")),
    ("epoch", lambda: EpochBegin(epoch=-1, kind="full")),
    ("epoch", lambda: Ack(epoch=1 << 64)),
    ("epoch", lambda: Ack(epoch=True)),
    ("epoch", lambda: Ack(epoch=1.0)),  # type: ignore[arg-type]
    ("page_size", lambda: pages(page_size=4095)),
    ("page_size", lambda: pages(page_size=256, data=bytes(512))),
    ("slot", lambda: pages(slot=1 << 32)),
    ("non-empty", lambda: pages(pages=(), data=b"")),
    ("strictly increasing", lambda: pages(pages=(4, 3))),
    ("strictly increasing", lambda: pages(pages=(3, 3))),
    ("non-negative", lambda: pages(pages=(-1, 0))),
    ("integer", lambda: pages(pages=(1.0, 2.0))),
    ("integer", lambda: pages(pages=np.array([True, False]))),
    ("1-D", lambda: pages(pages=np.array([[1, 2]]))),
    ("int64", lambda: pages(pages=np.array([1 << 63, (1 << 63) + 1], dtype=np.uint64))),
    ("expected 2 pages", lambda: pages(data=bytes(PAGE))),
    ("digest", lambda: EpochEnd(epoch=1, n_pages=0, digest=b"d" * 65, output_seq=0)),
    ("sent_ns", lambda: Heartbeat(seq=0, sent_ns=-5)),
    ("reason", lambda: Goodbye(reason="x" * 4097)),
    ("UTF-8", lambda: Failover(reason="\ud800")),
    ("blob", lambda: MachineBlob(epoch=0, blob=None)),  # type: ignore[arg-type]
]


@pytest.mark.parametrize("needle,make", BAD, ids=[f"{i}-{n}" for i, (n, _) in enumerate(BAD)])
def test_invalid_events_raise_local_protocol_error(needle: str, make: Any) -> None:
    with pytest.raises(LocalProtocolError, match=needle):
        make()


def test_values_are_normalized() -> None:
    e = EpochEnd(epoch=np.int64(3), n_pages=np.uint32(2),  # type: ignore[arg-type]
                 digest=bytearray(b"ab"), output_seq=1)  # type: ignore[arg-type]
    assert type(e.epoch) is int and type(e.n_pages) is int and type(e.digest) is bytes
    p = pages(data=memoryview(bytes(2 * PAGE)))
    assert type(p.data) is bytes
    a = HelloAck(session_id=SESSION, accepted=True,
                 nonce=bytearray(NONCE))  # type: ignore[arg-type]
    assert type(a.nonce) is bytes and a.nonce == NONCE
    r = Resync(epoch=np.uint64(4), reason="x")  # type: ignore[arg-type]
    assert type(r.epoch) is int and r == Resync(epoch=4, reason="x")


def test_events_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        hello().version = 2  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        mixed_pages().epoch = 3  # type: ignore[misc]


def test_pages_owns_a_read_only_copy_of_the_indices() -> None:
    idx = np.array([5, 6, 9], dtype=np.int64)
    p = pages(pages=idx, data=bytes(3 * PAGE))
    idx[0] = 0
    assert p.indices.tolist() == [5, 6, 9]
    assert p.indices.dtype == np.int64 and not p.indices.flags.writeable
    with pytest.raises(ValueError):
        p.indices[0] = 1


def test_pages_equality_and_hash_by_value() -> None:
    a = pages(pages=(3, 4))
    b = pages(pages=np.array([3, 4], dtype=np.uint32))
    assert a == b and hash(a) == hash(b)
    assert a != pages(pages=(3, 5))
    assert a != pages(data=b"\x01" + bytes(2 * PAGE - 1))
    assert a != Ack(epoch=1)
    assert {a, b} == {a}


def test_big_payloads_stay_out_of_repr() -> None:
    p = mixed_pages(n=300)
    assert len(repr(p)) < 120 and "n_pages=300" in repr(p)
    assert "config" not in repr(hello())
    assert "blob" not in repr(MachineBlob(epoch=1, blob=b"x" * 10_000))


def test_defaults() -> None:
    assert HelloAck(session_id=SESSION, accepted=True).reason == ""
    assert HelloAck(session_id=SESSION, accepted=True).nonce == b""
    assert Goodbye().reason == ""
    assert EpochEnd(epoch=1, n_pages=0, output_seq=0).digest == b""
