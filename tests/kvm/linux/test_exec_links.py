"""Symbolic links, hard links, modes and times in the library OS's file system against Linux:
``programs/links.c`` prints the same transcript natively and in the guest (links followed on
the way and not at the end where Linux does not, loops, dangling links, O_NOFOLLOW, nlink,
chmod, utimensat, d_type), and ``--save-files`` leaves the same tree: the same files, the same
links with the same targets. busybox ``ln`` and ``ln -s`` are in test_differential.py."""
from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent / "programs"
RUN_TIMEOUT = 120  # generous: the program ends in well under a second


@pytest.fixture(scope="module")
def links_prog(tmp_path_factory: pytest.TempPathFactory,
               static_build: Callable[..., Path]) -> Path:
    return static_build(HERE / "links.c", tmp_path_factory.mktemp("prog") / "links")


def _tree(root: Path) -> tuple[dict[str, bytes], dict[str, str]]:
    """Files (read through links, as a user would) and each link's target."""
    files = {str(p.relative_to(root)): p.read_bytes()
             for p in sorted(root.rglob("*")) if p.is_file()}
    links = {str(p.relative_to(root)): os.readlink(p)
             for p in sorted(root.rglob("*")) if p.is_symlink()}
    return files, links


@pytest.mark.parametrize("options", [(), ("--tracker", "ring", "--verify-every", "5")],
                         ids=["untracked", "tracked"])
def test_links_modes_and_times_match_a_native_run(links_prog: Path, tmp_path: Path,
                                                  options: tuple[str, ...]) -> None:
    nat, saved = tmp_path / "native", tmp_path / "saved"
    nat.mkdir()
    n = subprocess.run([str(links_prog)], cwd=nat, capture_output=True, env={},
                       timeout=RUN_TIMEOUT)
    assert n.returncode == 0, n.stderr
    g = subprocess.run([sys.executable, "-m", "dirtyring.cli.main", "run", "--exec",
                        str(links_prog), "--save-files", str(saved), *options],
                       capture_output=True, timeout=RUN_TIMEOUT)
    assert g.returncode == 0, g.stderr
    assert g.stdout == n.stdout
    assert b"not supported" not in g.stderr and b"not saved" not in g.stderr, g.stderr
    files, links = _tree(nat)
    got_files, got_links = _tree(saved)
    assert got_links == links and "w/sub/up" in links
    assert got_files == files


def test_links_in_a_named_directory_come_in_and_go_out_as_links(tmp_path: Path) -> None:
    """``--file DIR``: its symbolic links come in as links (to a file, to a directory,
    dangling), the program sees them as such, and the export hands them back unchanged."""
    from dirtyring.linux.program import LinuxProgram
    from dirtyring.linux.runner import run_program
    busybox = Path("/bin/busybox")
    if not busybox.exists():
        pytest.fail("/bin/busybox is missing: ./tools/install-test-deps installs busybox-static")
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "a.txt").write_bytes(b"hello\n")
    (tree / "sub" / "s.txt").write_bytes(b"s\n")
    for name, to in (("l", "a.txt"), ("ldir", "sub"), ("dang", "nowhere")):
        os.symlink(to, tree / name)
    out = bytearray()
    prog = LinuxProgram(busybox, ["busybox", "cat", "tree/l", "tree/ldir/s.txt"],
                        files=[(str(tree), "tree")], export_files=True)
    res = run_program(prog, write=lambda k, b: out.extend(b), tracker="none")
    assert res.status == 0 and res.crash is None, (res, bytes(out))
    assert bytes(out) == b"hello\ns\n"  # through a link to a file, and one to a directory
    assert res.links == {"/tree/l": b"a.txt", "/tree/ldir": b"sub", "/tree/dang": b"nowhere"}
    assert res.files["/tree/a.txt"] == b"hello\n" and res.files["/tree/sub/s.txt"] == b"s\n"
