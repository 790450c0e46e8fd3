"""The epoch loop's side of the staging area, without an uplink process: where pages go, when a
cell is free again, what is told to the uplink and when."""
from __future__ import annotations

import numpy as np
import pytest

from dirtyring._bindings.mapping import memfd
from dirtyring.replication.staging_writer import Stager
from dirtyring.replication.staging_area import PAGE, STATE_AREA_BYTES, Staging
from dirtyring.replication.uplink_messages import CONSUMED, Part, SteadyEpochs, epoch_parts


class Told:
    """What the stager told its owner (the uplink): flushes and early parts."""

    def __init__(self) -> None:
        self.flushes = 0
        self.parts: list[tuple[int, str, list[Part]]] = []
        self.gone = False


def make(cells: int = 4, cell_pages: int = 8, max_ahead: int = 3) -> tuple[Stager, Told]:
    told = Told()

    def flush() -> None:
        told.flushes += 1

    st = Stager(Staging(memfd("test-stager", Staging.size_for(cells, cell_pages)), cells,
                        cell_pages), max_ahead=max_ahead, tell=flush,
                send_parts=lambda e, k, p: told.parts.append((e, k, p)),
                gone=lambda: told.gone)
    return st, told


def guest(pages: int = 64) -> np.ndarray:
    """Guest memory as (pages, 4096) rows, each page filled with its number."""
    return np.repeat(np.arange(pages, dtype=np.uint8), PAGE).reshape(pages, PAGE)


def never() -> bool:
    return False


def test_an_epoch_packs_its_memory_slots_into_one_fresh_staging_cell() -> None:
    st, _ = make()
    mem = guest()
    assert st.stage(1, "delta", 0, mem, np.array([3, 5], np.int64), never) == 2
    assert st.stage(1, "delta", 1, mem, np.array([7], np.int64), never) == 1
    parts = st.take_parts()
    assert parts == [(0, 0, 0, 2, -1), (0, 2, 1, 1, -1)]
    assert list(st.staging.indices(0)[:3]) == [3, 5, 7]
    assert [int(p[0]) for p in st.staging.data(0)[:3]] == [3, 5, 7]
    assert st.staging_bytes == 3 * PAGE
    st.stage(2, "delta", 0, mem, np.array([9], np.int64), never)  # the next epoch: next cell
    assert st.take_parts() == [(1, 0, 0, 1, -1)]


def test_a_big_epoch_streams_full_cells_ahead_of_its_end() -> None:
    st, told = make(cell_pages=4)
    pages = np.arange(10, dtype=np.int64)
    assert st.stage(1, "full", 0, guest(), pages, never) == 10
    # Two full cells were told as they filled; the rest waits for the epoch's end.
    assert [(e, k, p) for e, k, p in told.parts] == [(1, "full", [(0, 0, 0, 4, -1)]),
                                                     (1, "full", [(1, 0, 0, 4, -1)])]
    assert st.take_parts() == [(2, 0, 0, 2, -1)]


def test_a_busy_cell_is_waited_for_until_told_to_give_up() -> None:
    st, told = make(cells=2, cell_pages=4)
    mem = guest()
    for epoch in (1, 2):
        st.stage(epoch, "delta", 0, mem, np.array([epoch], np.int64), never)
        st.take_parts()
    # Both cells still in the uplink's hands: the wait tells it everything, then gives up.
    calls = []

    def give_up() -> bool:
        calls.append(1)
        return len(calls) > 3

    assert st.stage(3, "delta", 0, mem, np.array([3], np.int64), give_up) == 0
    assert told.flushes >= 1 and len(calls) == 4
    st.staging.header[CONSUMED] = 1  # the uplink released the first
    assert st.stage(3, "delta", 0, mem, np.array([3], np.int64), never) == 1
    assert st.take_parts() == [(2, 0, 0, 1, -1)]


def test_room_free_cells_claims_and_abandon() -> None:
    st, told = make(cells=4, max_ahead=3)
    assert st.has_room() and st.free_ahead(8) == [0, 1, 2]
    assert st.claim_many(1, 1, 3) == 0
    assert st.take_parts() == []  # claimed parts go to the caller, not to the next end
    assert st.free_ahead(8) == [1, 2]
    assert st.claim_many(2, 1, 2) == 1
    with pytest.raises(RuntimeError, match="staging moved"):
        st.claim_many(3, 1, 9)  # more than a cell holds
    assert st.claim_many(3, 1, 2) == 2
    assert not st.has_room() and told.flushes == 1  # full: the uplink is told, to free some
    assert st.free_ahead(8) == []
    st.staging.header[CONSUMED] = 2
    assert st.has_room() and st.free_ahead(8) == [3, 0]
    # An epoch that is given up gives its staging space back.
    st.stage(4, "delta", 0, guest(), np.array([1, 2], np.int64), never)
    st.abandon()
    assert st.take_parts() == []
    assert st.stage(4, "delta", 0, guest(), np.array([4], np.int64), never) == 1
    assert st.take_parts() == [(3, 0, 0, 1, -1)]
    told.gone = True  # the uplink died: no room, nothing free
    assert not st.has_room() and st.free_ahead(8) == []


def test_claiming_a_batch_at_once_is_claiming_each_in_turn() -> None:
    one, _ = make(cells=8, max_ahead=6)
    many, _ = make(cells=8, max_ahead=6)
    for st in (one, many):
        st.stage(1, "delta", 0, guest(), np.array([5], np.int64), never)  # an ordinary epoch
        st.take_parts()
    assert [one.claim_many(e, 1, 5) for e in range(2, 6)] == [1, 2, 3, 4]
    assert many.claim_many(2, 4, 5) == 1
    assert (many.seq, many._fill, many._epoch) == (one.seq, one._fill, one._epoch)
    assert many.staging_bytes == one.staging_bytes == (1 + 4 * 5) * PAGE
    many.staging.header[CONSUMED] = 3  # the uplink released the ordinary epoch's and two more
    assert many.staging_bytes == 2 * 5 * PAGE
    many.staging.header[CONSUMED] = 0
    # The next claim, or the next staged epoch, goes on from the same place.
    assert many.claim_many(6, 1, 5) == one.claim_many(6, 1, 5) == 5
    assert many.stage(7, "delta", 0, guest(), np.array([5], np.int64), never) == 1
    assert many.take_parts() == [(6, 0, 0, 1, -1)]
    with pytest.raises(RuntimeError, match="staging moved"):
        many.claim_many(8, 8, 5)  # past the free cells
    with pytest.raises(RuntimeError, match="staging moved"):
        many.claim_many(8, 0, 5)


def test_a_steady_record_gives_each_epoch_its_parts_and_state() -> None:
    """What the uplink reads back of a steady batch: epoch i's parts in staging cell seq + i,
    laid out as the stager lays out an ordinary epoch, and its state from that cell's state
    area followed by the devices' part."""
    st, _ = make(cells=4)
    sizes = [(0, 2), (1, 3)]
    assert epoch_parts(7, sizes, None) == [(7, 0, 0, 2, -1), (7, 2, 1, 3, -1)]
    assert epoch_parts(7, sizes, [4, -1]) == [(7, 0, 0, 2, 4), (7, 2, 1, 3, -1)]
    for k in range(4):
        st.staging.state_area(k)[:3] = [k, k, k]
        st.staging.state_area(k)[STATE_AREA_BYTES - 1] = 9  # the area's last byte is its own
    e = SteadyEpochs(epoch=10, seq=6, count=2, sizes=sizes, words=[[1, 2], [3, -1]], state_size=3,
                     devices=b"dev", digests=None)
    assert [e.parts(i) for i in range(2)] == [epoch_parts(6, sizes, [1, 2]),
                                              epoch_parts(7, sizes, [3, -1])]
    assert [e.state(st.staging, i) for i in range(2)] == [b"\x02\x02\x02dev", b"\x03\x03\x03dev"]
    assert e.digest(1) == b""
    assert SteadyEpochs(10, 6, 1, sizes, None, 0, b"", [b"d"]).digest(0) == b"d"
