from __future__ import annotations

import numpy as np

from dirtyring.tracking import DirtySet, decode_bitmap, encode_bitmap


def test_from_pairs_dedups_and_sorts() -> None:
    ds = DirtySet.from_pairs(np.array([1, 1, 2, 1]), np.array([5, 3, 7, 5]))
    assert list(ds.slot(1)) == [3, 5]
    assert list(ds.slot(2)) == [7]
    assert len(ds) == 3
    assert (1, 5) in ds and (1, 4) not in ds and (9, 0) not in ds


def test_union_and_ranges() -> None:
    a = DirtySet.from_arrays([(1, np.array([0, 1, 2, 10]))])
    b = DirtySet.from_arrays([(1, np.array([2, 3, 11])), (0, np.array([4]))])
    u = a | b
    assert u.ranges(1) == [(0, 4), (10, 2)]
    assert u.ranges(0) == [(4, 1)]
    assert not DirtySet() and len(DirtySet()) == 0


def test_bitmap_roundtrip_including_ragged_end() -> None:
    rng = np.random.default_rng(1)
    for nbits in (1, 63, 64, 65, 1000, 4096 + 17):
        pages = np.unique(rng.integers(0, nbits, size=min(nbits, 50)))
        words = encode_bitmap(pages, nbits)
        assert len(words) == (nbits + 63) // 64
        assert np.array_equal(decode_bitmap(words), pages)


def test_decode_high_bit() -> None:
    w = np.array([0, 1 << 63, 0], dtype=np.uint64)
    assert list(decode_bitmap(w)) == [127]
