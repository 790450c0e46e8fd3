"""``save_tree`` (``run --exec --save-files DIR``): files and directories, then symbolic links,
all inside DIR; a link under another link, or where something already is, is left out and
named (an export from a broken guest could ask for that), never followed."""
from __future__ import annotations

import os
from pathlib import Path

from dirtyring.linux.runner import save_tree


def test_files_directories_and_links(tmp_path: Path) -> None:
    left = save_tree({"/d": None, "/d/f.txt": b"data", "/top": b"t"}, tmp_path,
                     {"/d/rel": b"f.txt", "/abs": b"/nowhere/at/all", "/d/e/deep": b"../f.txt"})
    assert left == []
    assert (tmp_path / "d" / "f.txt").read_bytes() == b"data"
    assert os.readlink(tmp_path / "d" / "rel") == "f.txt"
    assert (tmp_path / "d" / "rel").read_bytes() == b"data"
    assert os.readlink(tmp_path / "abs") == "/nowhere/at/all"  # a link, not followed
    assert os.readlink(tmp_path / "d" / "e" / "deep") == "../f.txt"


def test_nothing_goes_through_a_link(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    left = save_tree({"/x": b"file"}, root,
                     {"/a": str(outside).encode(), "/a/planted": b"gotcha", "/x": b"elsewhere"})
    assert sorted(left) == ["/a/planted", "/x"]
    assert list(outside.iterdir()) == []  # nothing was created through /a
    assert (root / "x").read_bytes() == b"file"
