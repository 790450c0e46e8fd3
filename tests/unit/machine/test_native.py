"""The C helpers: the staging copy (non-temporal; numpy without a compiler) copies exactly, and the
steady-pause program runs its ioctls, checks and gathers as it says."""
from __future__ import annotations

import ctypes
import errno
import os
import shutil
from typing import Any
from pathlib import Path

import numpy as np
import pytest

from dirtyring.machine import native
from dirtyring.machine.native import gather_pages


def test_the_helper_is_built_where_gcc_is_present() -> None:
    # Without this the fast path could silently be lost and every other test still pass.
    assert native.BACKEND == ("c-nt" if shutil.which("gcc") else "numpy")


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
    if native.BACKEND != "c-nt":
        pytest.skip("only the C helper checks bounds (the tracker never reports such pages)")
    mem = np.zeros((4, 4096), np.uint8)
    with pytest.raises(IndexError):
        gather_pages(np.zeros((native.SMALL, 4096), np.uint8), mem,
                     np.array([0] * (native.SMALL - 1) + [4], np.int64))


def test_an_unwritable_cache_falls_back_to_a_private_temporary_one(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    if not shutil.which("gcc"):
        pytest.skip("no compiler: the numpy copy is used")
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))
    monkeypatch.setattr(native.tempfile, "tempdir", str(tmp_path))
    assert native._build() is not None
    assert list(tmp_path.glob("dirtyring-*/native-*.so"))


# --- the steady-pause program --------------------------------------------------------------

FIONREAD = 0x541B  # an ioctl any pipe answers: bytes waiting to be read


def _program_with_pipe() -> tuple[native.PauseProgram, int, int, ctypes.c_int]:
    r, w = os.pipe()
    os.write(w, b"abc")
    waiting = ctypes.c_int(-1)
    prog = native.PauseProgram()
    prog.ioctl(r, FIONREAD, ctypes.addressof(waiting))
    return prog, r, w, waiting


def _addr(a: np.ndarray) -> int:
    return int(a.ctypes.data)


@pytest.fixture
def program() -> Any:
    if native.BACKEND != "c-nt":
        pytest.skip("no compiler: the pause runs in Python")
    prog, r, w, waiting = _program_with_pipe()
    yield prog, waiting
    os.close(r)
    os.close(w)


def test_the_program_gathers_when_every_check_holds(program: Any) -> None:
    prog, waiting = program
    rows = np.arange(8 * 4096, dtype=np.uint32).astype(np.uint8).reshape(8, 4096)
    a, b = np.arange(16, dtype=np.uint64), np.arange(16, dtype=np.uint64)
    pages = np.array([6, 1, 3], np.int64)
    dst, idx = np.zeros((3, 4096), np.uint8), np.full(3, -1, np.int64)
    prog.same(_addr(a), _addr(b), a.nbytes)
    prog.gather(_addr(dst), _addr(idx), _addr(rows), _addr(pages), 3, 8)
    assert prog.run() is True
    assert waiting.value == 3  # the ioctl ran first
    assert np.array_equal(dst, rows[pages]) and idx.tolist() == [6, 1, 3]


def test_a_failed_check_gathers_nothing(program: Any) -> None:
    prog, waiting = program
    rows = np.ones((8, 4096), np.uint8)
    a, b = np.zeros(16, np.uint64), np.zeros(16, np.uint64)
    b[15] = 1
    pages = np.array([2], np.int64)
    dst, idx = np.zeros((1, 4096), np.uint8), np.full(1, -1, np.int64)
    prog.same(_addr(a), _addr(b), a.nbytes)
    prog.gather(_addr(dst), _addr(idx), _addr(rows), _addr(pages), 1, 8)
    assert prog.run() is False
    assert waiting.value == 3 and not dst.any() and idx.tolist() == [-1]


def test_a_failing_ioctl_or_a_page_outside_the_slot_is_an_error(program: Any) -> None:
    prog = native.PauseProgram()
    prog.ioctl(-1, FIONREAD, 0)
    with pytest.raises(OSError) as e:
        prog.run()
    assert e.value.errno == errno.EBADF
    prog = native.PauseProgram()
    rows, dst, idx = np.ones((4, 4096), np.uint8), np.zeros((1, 4096), np.uint8), np.zeros(1, np.int64)
    pages = np.array([4], np.int64)
    prog.gather(_addr(dst), _addr(idx), _addr(rows), _addr(pages), 1, 4)
    with pytest.raises(IndexError):
        prog.run()
    assert not dst.any()


# --- the delta gather ---------------------------------------------------------------------

def _delta_gather(rows: np.ndarray, shadow: np.ndarray, pages: np.ndarray
                  ) -> tuple[bool, np.ndarray, np.ndarray, int]:
    """One program of one delta gather: (ran, staged bytes, staged indices, words)."""
    n = len(pages)
    dst, idx = np.zeros((n, 4096), np.uint8), np.full(n, -1, np.int64)
    count = np.full(1, -7, np.int64)
    prog = native.PauseProgram()
    prog.gather(_addr(dst), _addr(idx), _addr(rows), _addr(pages), n, rows.shape[0],
                _addr(shadow), _addr(count))
    return prog.run(), dst, idx, int(count[0])


def test_a_delta_gather_stages_the_changed_words_and_updates_the_shadow(program: Any) -> None:
    rng = np.random.default_rng(3)
    rows = rng.integers(0, 256, (16, 4096), dtype=np.uint8)
    shadow = rows.copy()
    pages = np.array([9, 2, 3], np.int64)
    words = rows.view(np.uint64)
    changed = [(9, 0), (9, 511), (2, 100), (3, 7)]  # (page, word); page order as staged
    for p, w in changed:
        words[p, w] ^= np.uint64(0xF0F0 + w)
    before = shadow.copy()
    ran, dst, idx, k = _delta_gather(rows, shadow, pages)
    assert ran and k == len(changed) and idx.tolist() == [9, 2, 3]
    flat = dst.reshape(-1)
    where = flat[:k * 8].view(np.int64)
    diff = flat[3 * native.DELTA_WORDS * 8:][:k * 8].view(np.uint64)
    pos = {int(p): i for i, p in enumerate(pages)}
    assert where.tolist() == sorted(pos[p] * 512 + w for p, w in changed)
    for at, x in zip(where.tolist(), diff.tolist()):
        p = int(pages[at // 512])
        assert x == int(rows.view(np.uint64)[p, at % 512] ^ before.view(np.uint64)[p, at % 512])
    assert np.array_equal(shadow, rows)  # up to date, and nothing else touched
    ran, dst, idx, k = _delta_gather(rows, shadow, pages)
    assert ran and k == 0  # nothing changed since


def test_a_delta_gather_past_an_eighth_of_the_words_stages_the_pages(program: Any) -> None:
    rows = np.zeros((8, 4096), np.uint8)
    shadow = rows.copy()
    pages = np.array([5, 6], np.int64)
    rows[5].view(np.uint64)[:2 * native.DELTA_WORDS + 1] = 1  # one word more than fits
    ran, dst, idx, k = _delta_gather(rows, shadow, pages)
    assert ran and k == -1 and idx.tolist() == [5, 6]
    assert np.array_equal(dst, rows[pages]) and np.array_equal(shadow, rows)
    rows[6].view(np.uint64)[:2 * native.DELTA_WORDS] = 3  # exactly as many as fit: words
    ran, dst, idx, k = _delta_gather(rows, shadow, pages)
    assert ran and k == 2 * native.DELTA_WORDS and np.array_equal(shadow, rows)


def test_a_failed_check_leaves_the_shadow_alone(program: Any) -> None:
    prog, _ = program
    rows, shadow = np.ones((4, 4096), np.uint8), np.zeros((4, 4096), np.uint8)
    a, b = np.zeros(4, np.uint64), np.ones(4, np.uint64)
    pages, count = np.array([1], np.int64), np.full(1, -7, np.int64)
    dst, idx = np.zeros((1, 4096), np.uint8), np.full(1, -1, np.int64)
    prog.same(_addr(a), _addr(b), a.nbytes)
    prog.gather(_addr(dst), _addr(idx), _addr(rows), _addr(pages), 1, 4, _addr(shadow),
                _addr(count))
    assert prog.run() is False
    assert not shadow.any() and count[0] == -7 and not dst.any()


def test_the_uplink_takes_staged_words_and_applies_them_to_its_shadow(program: Any) -> None:
    rng = np.random.default_rng(4)
    rows = rng.integers(0, 256, (16, 4096), dtype=np.uint8)
    mine, theirs = rows.copy(), rows.copy()  # the pause's shadow and the uplink's
    pages = np.array([4, 11], np.int64)
    rows.view(np.uint64)[4, 3] ^= np.uint64(5)
    rows.view(np.uint64)[11, 500] ^= np.uint64(1 << 63)
    ran, dst, idx, k = _delta_gather(rows, mine, pages)
    assert ran and k == 2

    def take(shadow: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        return native.take_words(_addr(dst), 2, k, _addr(idx),
                                 0 if shadow is None else _addr(shadow))
    where, diff = take(theirs)
    assert where.tolist() == [3, 512 + 500] and diff.tolist() == [5, 1 << 63]
    assert np.array_equal(theirs, rows)
    where2, _ = take(None)  # no shadow kept: only the words
    assert where2.tolist() == where.tolist() and np.array_equal(theirs, rows)
    with pytest.raises(ValueError, match="too many"):  # more words than the part holds
        native.take_words(_addr(dst), 2, 2 * native.DELTA_WORDS + 1, _addr(idx), 0)
    dst.reshape(-1)[:8].view(np.int64)[0] = 2 * 512  # an offset past its two pages
    with pytest.raises(ValueError, match="outside their pages"):
        take(theirs)
    assert np.array_equal(theirs, rows)  # nothing applied


def test_a_retargeted_program_compares_and_gathers_anew(program: Any) -> None:
    prog, _ = program
    rows = np.arange(8 * 4096, dtype=np.uint32).astype(np.uint8).reshape(8, 4096)
    a = np.arange(16, dtype=np.uint64)
    b_old, b_new = a.copy(), a.copy()
    b_old[3] = 99  # the old log differs: the program as built gathers nothing
    old_pages, new_pages = np.array([1], np.int64), np.array([6, 2], np.int64)
    dst, idx = np.zeros((3, 4096), np.uint8), np.full(3, -1, np.int64)
    prog.same(_addr(a), _addr(b_old), a.nbytes)
    prog.gather(_addr(dst), _addr(idx), _addr(rows), _addr(old_pages), 1, 8)
    assert prog.run() is False and not dst.any()
    prog.retarget([(_addr(b_new), a.nbytes)], [(_addr(dst[1:]), _addr(idx[1:]),
                                                 _addr(new_pages), 2)])
    assert prog.run() is True
    assert not dst[0].any() and np.array_equal(dst[1:], rows[new_pages])
    assert idx.tolist() == [-1, 6, 2]
    with pytest.raises(ValueError, match="keeps its compares and gathers"):
        prog.retarget([], [])
