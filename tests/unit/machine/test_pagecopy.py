"""The staging copy (non-temporal C helper, numpy without a compiler) copies exactly."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from dirtyring.machine import pagecopy
from dirtyring.machine.pagecopy import gather_pages


def test_the_helper_is_built_where_gcc_is_present() -> None:
    # Without this the fast path could silently be lost and every other test still pass.
    assert pagecopy.BACKEND == ("c-nt" if shutil.which("gcc") else "numpy")


@pytest.mark.parametrize("pages", [[0], [5, 6, 7, 8], [63, 2, 40, 2], list(range(64)), []])
def test_gather_equals_take(pages: list[int]) -> None:
    rng = np.random.default_rng(len(pages))
    mem = rng.integers(0, 256, (64, 4096), dtype=np.uint8)
    idx = np.array(pages, np.int64)
    dst = np.zeros((len(idx) + 2, 4096), np.uint8)  # rows past the copy stay untouched
    gather_pages(dst[:len(idx)], mem, idx)
    assert np.array_equal(dst[:len(idx)], mem[idx])
    assert not dst[len(idx):].any()


def test_other_index_types_and_unaligned_destinations() -> None:
    mem = np.arange(16 * 4096, dtype=np.uint64).astype(np.uint8).reshape(16, 4096)
    idx = np.array([3, 1, 15, 0, 2, 4, 5, 6, 7, 8], np.int32)
    dst = np.zeros((10, 4096), np.uint8)
    gather_pages(dst, mem, idx)
    assert np.array_equal(dst, mem[idx])
    raw = np.zeros(10 * 4096 + 8, np.uint8)
    odd = raw[8:].reshape(10, 4096)  # not 16-byte aligned: the plain copy is used
    gather_pages(odd, mem, idx)
    assert np.array_equal(odd, mem[idx])


def test_an_index_outside_the_slot_is_refused() -> None:
    if pagecopy.BACKEND != "c-nt":
        pytest.skip("only the C helper checks bounds (the tracker never reports such pages)")
    mem = np.zeros((4, 4096), np.uint8)
    with pytest.raises(IndexError):
        gather_pages(np.zeros((pagecopy.SMALL, 4096), np.uint8), mem,
                     np.array([0] * (pagecopy.SMALL - 1) + [4], np.int64))


def test_an_unwritable_cache_falls_back_to_a_private_temporary_one(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    if not shutil.which("gcc"):
        pytest.skip("no compiler: the numpy copy is used")
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))
    monkeypatch.setattr(pagecopy.tempfile, "tempdir", str(tmp_path))
    assert pagecopy._build() is not None
    assert list(tmp_path.glob("dirtyring-*/pagecopy-*.so"))
