"""The page copy rollback uses (slices for few runs, one gather/scatter for many) equals plain
fancy indexing for any sorted set of pages."""
from __future__ import annotations

import numpy as np
import pytest

from dirtyring.snapshots.rollback import _copy_pages

PAGE = 4096


@pytest.mark.parametrize("pages", [
    [], [0], [5], [0, 1, 2, 3], [3, 9], [0, 63], list(range(10, 74)),
    list(range(0, 64, 2)), list(range(0, 200, 3)) + [250, 251, 255]])
def test_copy_pages_equals_fancy_indexing(pages: list[int]) -> None:
    rng = np.random.default_rng(len(pages))
    src = rng.integers(0, 256, (256, PAGE), dtype=np.uint8)
    dst = rng.integers(0, 256, (256, PAGE), dtype=np.uint8)
    want = dst.copy()
    p = np.array(pages, np.int64)
    want[p] = src[p]
    _copy_pages(dst, src, p)
    assert np.array_equal(dst, want)


def test_copy_pages_random_sets() -> None:
    rng = np.random.default_rng(3)
    src = rng.integers(0, 256, (512, PAGE), dtype=np.uint8)
    for k in (1, 7, 15, 16, 17, 100, 512):
        dst = np.zeros_like(src)
        p = np.unique(rng.integers(0, 512, k)).astype(np.int64)
        _copy_pages(dst, src, p, max_slice_runs=8)
        mask = np.zeros(512, bool)
        mask[p] = True
        assert np.array_equal(dst[mask], src[mask]) and not dst[~mask].any()
