"""Pages built from only its sparse 64-bit words (``Pages.decoded(data=None, words=...)``):
the bytes are built once on first read, the codec sends and receives such Pages straight from
the words, and a Connection carries them without materializing the page data."""
from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from dirtyring.errors import LocalProtocolError
from dirtyring.machine.checkpoint import apply_runs
from dirtyring.wire import (
    NEED_DATA, Connection, EpochBegin, EpochEnd, MachineBlob, Pages,
)
from dirtyring.wire.pagecodec import decode_pages, encode_pages_parts

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # wire_helpers sits beside the tests; works in any import mode
    sys.path.insert(0, _HERE)
from wire_helpers import ConnectionPair  # noqa: E402

PAGE = 4096
WPP = PAGE // 8  # 64-bit words per page


def sparse_words(n_pages: int, per_page: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Increasing word offsets (a few per page, some pages without any) and non-zero values."""
    rng = np.random.default_rng(seed)
    where: list[int] = []
    for p in range(n_pages):
        if p % 3 == 1:
            continue  # leave some pages all zero
        where += (p * WPP + rng.choice(WPP, per_page, replace=False)).tolist()
    where_arr = np.array(sorted(where), np.int64)
    vals = rng.integers(1, 2**64 - 1, len(where_arr), dtype=np.uint64, endpoint=True)
    vals[0] = 2**64 - 1  # the top bit must survive every conversion
    return where_arr, vals


def bytes_of(n_pages: int, where: np.ndarray, vals: np.ndarray) -> bytes:
    """The expected page bytes, built without numpy's scatter (what ``data`` must equal)."""
    out = bytearray(n_pages * PAGE)
    for w, v in zip(where.tolist(), vals.tolist()):
        out[w * 8:w * 8 + 8] = int(v).to_bytes(8, sys.byteorder)
    return bytes(out)


def lazy_pages(idx: np.ndarray, where: np.ndarray, vals: np.ndarray, *, delta: bool = True,
               epoch: int = 3, slot: int = 1) -> Pages:
    return Pages.decoded(epoch=epoch, slot=slot, page_size=PAGE,
                         pages=np.array(idx, np.int64), data=None, delta=delta,
                         words=(where.copy(), vals.copy()))


IDX = np.array([2, 3, 4, 9, 10, 40, 41, 42, 43, 100], np.int64)


def body_of(p: Pages) -> bytes:
    return b"".join(bytes(b) for b in encode_pages_parts(p))


# ------------------------------------------------------------------ the event itself


def test_lazy_pages_build_their_bytes_once_on_first_read() -> None:
    where, vals = sparse_words(len(IDX), 5, seed=1)
    p = lazy_pages(IDX, where, vals)
    assert p.lazy
    assert p.nbytes == len(IDX) * PAGE and p.n_pages == len(IDX)
    assert p.lazy, "nbytes must not build the data"
    assert repr(p) and p.lazy, "repr must not build the data"
    data = p.data
    assert not p.lazy
    assert isinstance(data, bytes) and data == bytes_of(len(IDX), where, vals)
    assert p.data is data, "the bytes are built once, then kept"
    assert p.nbytes == len(data)
    # the words are still there for whoever applies from them
    assert p.words is not None and np.array_equal(p.words[0], where)
    assert np.array_equal(p.words[1], vals)


def test_lazy_pages_with_no_words_are_all_zero() -> None:
    p = lazy_pages(IDX[:3], np.zeros(0, np.int64), np.zeros(0, np.uint64))
    assert p.lazy and p.nbytes == 3 * PAGE
    assert p.data == bytes(3 * PAGE)


def test_eager_pages_are_not_lazy() -> None:
    p = Pages(epoch=1, slot=0, page_size=PAGE, pages=(1, 2), data=bytes(2 * PAGE))
    assert not p.lazy and p.nbytes == 2 * PAGE


@pytest.mark.parametrize("delta", [True, False])
def test_lazy_pages_equal_and_hash_like_the_eager_equivalent(delta: bool) -> None:
    where, vals = sparse_words(len(IDX), 4, seed=2)
    expected = bytes_of(len(IDX), where, vals)
    eager = Pages(epoch=3, slot=1, page_size=PAGE, pages=IDX, data=expected, delta=delta)
    assert lazy_pages(IDX, where, vals, delta=delta) == eager
    assert eager == lazy_pages(IDX, where, vals, delta=delta)
    assert hash(lazy_pages(IDX, where, vals, delta=delta)) == hash(eager)
    assert lazy_pages(IDX, where, vals, delta=delta) in {eager}
    # and they differ when the content does
    other = vals.copy()
    other[len(other) // 2] ^= np.uint64(1 << 40)
    assert lazy_pages(IDX, where, other, delta=delta) != eager
    moved = where.copy()
    moved[0] = next(w for w in range(len(IDX) * WPP) if w not in set(where.tolist()))
    order = np.argsort(moved)
    assert lazy_pages(IDX, moved[order], vals[order], delta=delta) != eager
    assert lazy_pages(IDX, where, vals, delta=not delta) != eager
    assert lazy_pages(IDX + 1, where, vals, delta=delta) != eager


# ------------------------------------------------------------------ codec


@pytest.mark.parametrize("delta", [True, False])
def test_lazy_pages_encode_to_the_same_bytes_as_the_eager_equivalent(delta: bool) -> None:
    where, vals = sparse_words(len(IDX), 6, seed=3)
    lazy = lazy_pages(IDX, where, vals, delta=delta)
    eager = Pages(epoch=3, slot=1, page_size=PAGE, pages=IDX,
                  data=bytes_of(len(IDX), where, vals), delta=delta)
    body = body_of(lazy)
    assert lazy.lazy, "encoding a lazy Pages must not build its data"
    assert body == body_of(eager)
    assert len(body) < 25 + 12 * 5 + 4 + 12 * len(where) + 1  # runs + words, no page bytes


@pytest.mark.parametrize("delta", [True, False])
def test_decoded_sparse_pages_are_lazy_with_the_right_words(delta: bool) -> None:
    where, vals = sparse_words(len(IDX), 3, seed=4)
    expected = bytes_of(len(IDX), where, vals)
    eager = Pages(epoch=7, slot=2, page_size=PAGE, pages=IDX, data=expected, delta=delta)
    for source in (eager, lazy_pages(IDX, where, vals, delta=delta, epoch=7, slot=2)):
        got = decode_pages(memoryview(body_of(source)), 1 << 30)
        assert got.lazy and got.words is not None
        assert got.delta is delta and (got.epoch, got.slot, got.page_size) == (7, 2, PAGE)
        assert got.indices.tolist() == IDX.tolist()
        assert got.words[0].tolist() == where.tolist()
        assert got.words[1].tolist() == vals.tolist()
        assert got.words[1].dtype == np.uint64
        assert got.nbytes == len(expected) and got.lazy
        assert got.data == expected and not got.lazy
        assert got == eager


def test_dense_lazy_pages_still_round_trip() -> None:
    """A lazy Pages is always sent as its words, even when they are not few."""
    rng = np.random.default_rng(5)
    n = 4
    where = np.sort(rng.choice(n * WPP, n * WPP // 2, replace=False)).astype(np.int64)
    vals = rng.integers(1, 2**64 - 1, len(where), dtype=np.uint64)
    idx = np.array([0, 1, 7, 8], np.int64)
    got = decode_pages(memoryview(body_of(lazy_pages(idx, where, vals))), 1 << 30)
    assert got.data == bytes_of(n, where, vals)


def fake_memory(n_pages: int, seed: int) -> SimpleNamespace:
    rng = np.random.default_rng(seed)
    view = rng.integers(0, 256, n_pages * PAGE, dtype=np.uint8)
    return SimpleNamespace(slots=[SimpleNamespace(view=view, rows=view.reshape(-1, PAGE))])


@pytest.mark.parametrize("delta", [True, False])
def test_decoded_sparse_frame_applied_by_words_equals_applied_by_data(delta: bool) -> None:
    where, vals = sparse_words(len(IDX), 7, seed=6)
    eager = Pages(epoch=1, slot=0, page_size=PAGE, pages=IDX,
                  data=bytes_of(len(IDX), where, vals), delta=delta)
    got = decode_pages(memoryview(body_of(eager)), 1 << 30)
    by_words, by_data, before = fake_memory(128, 9), fake_memory(128, 9), fake_memory(128, 9)
    apply_runs(by_words, [(0, got.indices, None, got.delta, got.words)])
    assert got.lazy, "applying from the words must not build the data"
    apply_runs(by_data, [(0, eager.indices, eager.data, eager.delta)])
    assert np.array_equal(by_words.slots[0].view, by_data.slots[0].view)
    # and it really changed memory where (and only where) expected
    new, old = by_words.slots[0].view.reshape(-1, PAGE), before.slots[0].view.reshape(-1, PAGE)
    untouched = np.setdiff1d(np.arange(128), IDX)
    assert np.array_equal(new[untouched], old[untouched])
    if delta:
        assert np.array_equal(new[IDX] ^ old[IDX],
                              np.frombuffer(eager.data, np.uint8).reshape(-1, PAGE))
    else:
        assert new[IDX].tobytes() == eager.data


# ------------------------------------------------------------------ Connection


def receive_all(conn: Connection, data: bytes) -> list[object]:
    conn.receive_data(data)
    out: list[object] = []
    while (e := conn.next_event()) is not NEED_DATA:
        out.append(e)
    return out


def test_connection_carries_a_lazy_pages_without_building_it() -> None:
    where, vals = sparse_words(len(IDX), 4, seed=7)
    expected = bytes_of(len(IDX), where, vals)
    lazy = lazy_pages(IDX, where, vals, epoch=1)
    eager = Pages(epoch=1, slot=1, page_size=PAGE, pages=IDX, data=expected, delta=True)

    frames: list[bytes] = []
    for pages in (lazy, eager):
        pair = ConnectionPair()
        pair.handshake()
        assert receive_all(pair.standby, pair.primary.send(EpochBegin(epoch=1, kind="delta")))
        frames.append(frame := pair.primary.send(pages))
        got = receive_all(pair.standby, frame)
        assert len(got) == 1 and isinstance(got[0], Pages)
        rx = got[0]
        stats_out, stats_in = pair.primary.statistics(), pair.standby.statistics()
        assert stats_out.page_bytes_raw_out == len(expected)
        assert stats_in.page_bytes_raw_in == len(expected)
        if pages is lazy:
            assert lazy.lazy, "sending must not build the sender's data"
        assert rx.lazy, "receiving must not build the data"
        assert rx.words is not None
        assert rx.words[0].tolist() == where.tolist() and rx.words[1].tolist() == vals.tolist()
        assert rx.delta and rx.indices.tolist() == IDX.tolist()
        assert rx.data == expected and rx == eager
        end = EpochEnd(epoch=1, n_pages=len(IDX), output_seq=1)
        assert receive_all(pair.standby, pair.primary.send(end)) == [end]
    assert frames[0] == frames[1], "a lazy Pages goes on the wire exactly as its eager twin"


def test_connection_batch_carries_a_lazy_pages() -> None:
    where, vals = sparse_words(len(IDX), 2, seed=8)
    lazy = lazy_pages(IDX, where, vals, epoch=1)
    pair = ConnectionPair()
    pair.handshake()
    events = [EpochBegin(epoch=1, kind="delta"), lazy, MachineBlob(epoch=1, blob=b"cpu"),
              EpochEnd(epoch=1, n_pages=len(IDX), output_seq=1)]
    wire = b"".join(bytes(b) for b in pair.primary.send_batch(events))
    assert lazy.lazy
    got = receive_all(pair.standby, wire)
    assert len(got) == 4 and isinstance(got[1], Pages)
    assert got[1].lazy and got[1].words is not None
    assert got[1].words[0].tolist() == where.tolist()
    assert got[1].data == bytes_of(len(IDX), where, vals)
    assert got == events


def test_oversized_lazy_pages_refused_by_size_without_building() -> None:
    where, vals = sparse_words(len(IDX), 1, seed=10)
    lazy = lazy_pages(IDX, where, vals, epoch=1)
    pair = ConnectionPair(max_frame_size=len(IDX) * PAGE - 1)
    pair.handshake()
    pair.primary.send(EpochBegin(epoch=1, kind="delta"))
    with pytest.raises(LocalProtocolError, match="split it"):
        pair.primary.send(lazy)
    assert lazy.lazy
