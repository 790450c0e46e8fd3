"""The library OS's file system against Linux: a program that creates, writes, reads, seeks,
truncates, renames, unlinks, lists, locks, dups, pipes and maps files prints the same
transcript and leaves byte-identical files in the guest as it does natively; the files the
user names go in, and every file comes back out (``--save-files``)."""
from __future__ import annotations

from collections.abc import Callable
import subprocess
import sys
from pathlib import Path

import pytest

from dirtyring.linux.program import LinuxProgram
from dirtyring.linux.runner import run_program

HERE = Path(__file__).resolve().parent / "programs"
RUN_TIMEOUT = 120  # generous: the program ends in well under a second


@pytest.fixture(scope="module")
def files_prog(tmp_path_factory: pytest.TempPathFactory, static_build: Callable[..., Path]) -> Path:
    return static_build(HERE / "files.c", tmp_path_factory.mktemp("prog") / "files")


INPUT = "".join(f"line {i}\n" for i in range(57)).encode()


def _tree(root: Path) -> dict[str, bytes]:
    return {"/" + str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def native(files_prog: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> tuple[bytes, dict[str, bytes]]:
    d = tmp_path_factory.mktemp("native")
    (d / "input.txt").write_bytes(INPUT)
    p = subprocess.run([str(files_prog)], cwd=d, capture_output=True, timeout=RUN_TIMEOUT,
                       env={})
    assert p.returncode == 0, p.stderr
    return p.stdout, _tree(d)


def test_transcript_and_files_match_a_native_run(files_prog: Path, tmp_path: Path,
                                                 native: tuple[bytes, dict[str, bytes]]) -> None:
    (tmp_path / "input.txt").write_bytes(INPUT)
    out = bytearray()
    prog = LinuxProgram(files_prog, [str(files_prog)], {},
                        files=[(str(tmp_path / "input.txt"), "input.txt")], export_files=True)
    res = run_program(prog, write=lambda k, b: out.extend(b if k == "stdout" else b""),
                      verify_every=5)
    assert res.status == 0 and res.crash is None and not res.unsupported, res
    assert res.missed_pages == 0
    assert bytes(out) == native[0]
    guest = {p: d for p, d in res.files.items() if d is not None}
    assert guest == native[1]
    assert res.files["/out"] is None  # directories come back as directories


def test_the_cli_copies_files_in_and_saves_them(files_prog: Path, tmp_path: Path,
                                                native: tuple[bytes, dict[str, bytes]]) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "input.txt").write_bytes(INPUT)
    p = subprocess.run([sys.executable, "-m", "dirtyring.cli.main", "run", "--exec",
                        str(files_prog), "--file", "input.txt", "--save-files",
                        str(tmp_path / "saved")],
                       cwd=work, capture_output=True, timeout=RUN_TIMEOUT)
    assert p.returncode == 0, p.stderr
    assert p.stdout == native[0]
    assert _tree(tmp_path / "saved") == native[1]


def test_a_missing_input_file_is_a_clear_error(files_prog: Path, tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "dirtyring.cli.main", "run", "--exec",
                        str(files_prog), "--file", str(tmp_path / "nope.txt")],
                       capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert p.returncode != 0 and "nope.txt" in p.stderr and "Traceback" not in p.stderr
