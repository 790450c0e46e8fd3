"""Hypothesis strategies for every wire event (not collected: no ``test_`` prefix).

Values span each field's whole range (u64 epochs, u32 slots, any UTF-8 reason up to the
limit) and pages of every kind the page codec distinguishes: zero, random, sparse (a few
non-zero words, as an XOR delta), compressible; contiguous or with gaps, near index 0 or
near the top of the int64 range.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from hypothesis import strategies as st

from dirtyring.wire import (
    Ack, Checkpoint, EpochBegin, EpochEnd, Event, Failover, Goodbye, Heartbeat, Hello, HelloAck,
    MachineBlob, Pages, Resync,
)
from dirtyring.wire.values import MAX_DIGEST_LEN, NONCE_LEN, SESSION_ID_LEN

U64 = (1 << 64) - 1
U32 = (1 << 32) - 1
I64 = (1 << 63) - 1

u64 = st.one_of(st.integers(0, 16), st.integers(0, U64), st.sampled_from([U64, U64 - 1, I64]))
u32 = st.one_of(st.integers(0, 16), st.integers(0, U32))
#: At most 1024 code points: never more than MAX_REASON_LEN (4096) bytes of UTF-8.
reasons = st.one_of(st.text(max_size=24), st.text(max_size=1024))
short_bytes = st.binary(max_size=64)
digests = st.binary(max_size=MAX_DIGEST_LEN)
session_ids = st.binary(min_size=SESSION_ID_LEN, max_size=SESSION_ID_LEN)


@st.composite
def page_data(draw: Any, page_size: int) -> bytes:
    """One page: zero, random, sparse or compressible."""
    kind = draw(st.sampled_from(["zero", "random", "sparse", "fill"]))
    if kind == "zero":
        return bytes(page_size)
    if kind == "random":
        return np.random.default_rng(draw(st.integers(0, U32))).bytes(page_size)
    if kind == "fill":
        return bytes([draw(st.integers(1, 255))]) * page_size
    words = np.zeros(page_size // 8, np.uint64)
    where = draw(st.lists(st.integers(0, len(words) - 1), min_size=1, max_size=6, unique=True))
    words[where] = draw(st.integers(1, U64))
    return words.tobytes()


@st.composite
def pages(draw: Any, epoch: int | None = None, max_pages: int = 6) -> Pages:
    ps = draw(st.sampled_from([512, 1024, 4096]))
    n = draw(st.integers(1, max_pages))
    gaps = draw(st.lists(st.one_of(st.just(1), st.integers(1, 3), st.integers(1, 1 << 40)),
                         min_size=n - 1, max_size=n - 1))
    span = sum(gaps)
    first = draw(st.one_of(st.integers(0, 64), st.integers(0, I64 - span),
                           st.just(I64 - span)))
    idx = np.cumsum([first, *gaps], dtype=np.int64)
    data = b"".join(draw(page_data(ps)) for _ in range(n))
    return Pages(epoch=draw(u64) if epoch is None else epoch, slot=draw(u32), page_size=ps,
                 pages=idx, data=data, delta=draw(st.booleans()))


@st.composite
def checkpoints(draw: Any) -> Checkpoint:
    epoch = draw(u64)
    return Checkpoint(epoch=epoch, kind=draw(st.sampled_from(["full", "delta"])),
                      pages=tuple(draw(st.lists(pages(epoch, max_pages=3), max_size=3))),
                      blob=draw(short_bytes), digest=draw(digests), output_seq=draw(u64))


def _token(cls: type) -> dict[str, Any]:
    """A ``token`` (fencing token) for the event types that carry one."""
    return {"token": u64} if "token" in {f.name for f in dataclasses.fields(cls)} else {}


#: One strategy per wire event type.
EVENTS: dict[str, st.SearchStrategy[Any]] = {
    "Hello": st.builds(Hello, role=st.sampled_from(["primary", "standby"]),
                       version=st.integers(0, U32), session_id=session_ids,
                       config=st.binary(max_size=300), **_token(Hello)),
    "HelloAck": st.builds(HelloAck, session_id=session_ids, accepted=st.booleans(),
                          reason=reasons, **_token(HelloAck),
                          nonce=st.one_of(st.just(b""),
                                          st.binary(min_size=NONCE_LEN, max_size=NONCE_LEN))),
    "EpochBegin": st.builds(EpochBegin, epoch=u64, kind=st.sampled_from(["full", "delta"])),
    "Pages": pages(),
    "MachineBlob": st.builds(MachineBlob, epoch=u64, blob=st.binary(max_size=300)),
    "EpochEnd": st.builds(EpochEnd, epoch=u64, n_pages=u64, digest=digests, output_seq=u64),
    "Ack": st.builds(Ack, epoch=u64, **_token(Ack)),
    "Resync": st.builds(Resync, epoch=u64, reason=reasons),
    "Heartbeat": st.builds(Heartbeat, seq=u64, sent_ns=u64),
    "Failover": st.builds(Failover, reason=reasons),
    "Goodbye": st.builds(Goodbye, reason=reasons),
    "Checkpoint": checkpoints(),
}

any_event: st.SearchStrategy[Event] = st.one_of(*EVENTS.values())
