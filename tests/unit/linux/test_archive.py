"""The file archive: what the VMM packs unpacks to the same entries, and anything a guest could
hand back is either a list of entries that stays inside the buffer or one ProgramError."""
from __future__ import annotations

import stat
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dirtyring.errors import ProgramError
from dirtyring.linux import archive as A

FILE, DIR, LINK = stat.S_IFREG | 0o644, stat.S_IFDIR | 0o755, stat.S_IFLNK | 0o777


def test_round_trip_normalises_paths() -> None:
    entries = [A.Entry("/d", DIR), A.Entry("d/x.txt", FILE, b"hello"),
               A.Entry("/d/../y", FILE, b""), A.Entry("/big", FILE, bytes(range(256)) * 40)]
    got = A.unpack(A.pack(entries))
    assert [(e.path, e.mode, e.data) for e in got] == [
        ("/d", DIR, b""), ("/d/x.txt", FILE, b"hello"), ("/y", FILE, b""),
        ("/big", FILE, bytes(range(256)) * 40)]


def test_symbolic_links_come_back_with_their_targets() -> None:
    got = A.unpack(A.pack([A.Entry("/l", LINK, b"../some/where")]))
    assert [(e.path, e.mode, e.data) for e in got] == [("/l", LINK, b"../some/where")]


@pytest.mark.parametrize("target", [b"", b"x" * A.PATH_MAX])
def test_a_link_with_an_impossible_target_is_refused(target: bytes) -> None:
    with pytest.raises(ProgramError, match="symbolic link '/l' has a target"):
        A.unpack(A.pack([A.Entry("/l", LINK, target)]))


def test_other_kinds_of_entry_are_refused() -> None:
    with pytest.raises(ProgramError, match="neither a file, a directory nor a symbolic link"):
        A.unpack(A.pack([A.Entry("/c", stat.S_IFCHR | 0o666)]))


@pytest.mark.parametrize("path", ["/", "", "a\0b", "/" + "x" * 5000])
def test_paths_that_cannot_name_a_file(path: str) -> None:
    with pytest.raises(ProgramError):
        A.guest_path(path)


@pytest.mark.parametrize("mutate, why", [
    (lambda b: b[:10], "shorter than its header"),
    (lambda b: b"X" + b[1:], "bad magic"),
    (lambda b: b[:8] + (10 ** 9).to_bytes(8, "little") + b[16:], "claims"),
    (lambda b: b[:-8], "runs past"),
])
def test_damaged_archives_say_what_is_wrong(mutate: Callable[[bytes], bytes], why: str) -> None:
    buf = A.pack([A.Entry("/a", FILE, b"12345678")])
    with pytest.raises(ProgramError, match=why):
        A.unpack(mutate(buf))


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300), st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)),
                                         max_size=6))
def test_anything_a_guest_hands_back(junk: bytes, flips: list[tuple[int, int]]) -> None:
    buf = bytearray(A.pack([A.Entry("/a/b", FILE, b"data" * 5), A.Entry("/a", DIR)]) + junk)
    for at, v in flips:
        if at < len(buf):
            buf[at] = v
    try:
        entries = A.unpack(bytes(buf))
    except ProgramError as e:
        assert "broke its contract" in str(e)
        return
    for e in entries:
        assert e.path.startswith("/") and len(e.data) <= len(buf)
