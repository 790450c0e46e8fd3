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
