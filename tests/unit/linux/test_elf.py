"""Reading static x86-64 programs: real ones built with gcc and glibc's libc.a, checked
against binutils' readelf; and everything else a user might pass, which must end in one
ProgramError naming the program (never another exception)."""
from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dirtyring.errors import ProgramError
from dirtyring.linux.elf import PAGE, ElfImage

SOURCE = r"""
#include <stdio.h>
__thread int tls_counter = 7;
int data_word = 42;
static char bss_block[1 << 16];
int main(int argc, char **argv) {
    bss_block[argc] = 1;
    printf("%d %d %s\n", tls_counter, data_word, argv[0]);
    return bss_block[1] - 1;
}
"""


def _gcc() -> str:
    gcc = shutil.which("gcc")
    if not gcc:
        pytest.fail("gcc is missing: the README's test command installs it "
                    "(./tools/install-test-deps)")
    return gcc


@pytest.fixture(scope="module")
def programs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("elf")
    (d / "p.c").write_text(SOURCE)
    out = {}
    for kind, flags in (("static", ["-static"]), ("static-pie", ["-static-pie", "-fPIE"]),
                        ("dynamic", []), ("object", ["-c"])):
        path = d / kind
        r = subprocess.run([_gcc(), "-O1", *flags, "-o", str(path), str(d / "p.c")],
                           capture_output=True, text=True)
        assert r.returncode == 0, f"gcc {flags}: {r.stderr} (is libc6-dev installed?)"
        out[kind] = path
    return out


def _readelf_loads(path: Path) -> list[tuple[int, int, int, int, str]]:
    """(offset, vaddr, filesz, memsz, flags) of each LOAD, as binutils reads them."""
    text = subprocess.run(["readelf", "-lW", str(path)], capture_output=True, text=True,
                          check=True).stdout
    rows = []
    for m in re.finditer(r"^\s*LOAD\s+(0x\w+)\s+(0x\w+)\s+0x\w+\s+(0x\w+)\s+(0x\w+)\s+([RWE ]+?)"
                         r"\s+0x\w+$", text, re.M):
        rows.append((int(m[1], 16), int(m[2], 16), int(m[3], 16), int(m[4], 16),
                     m[5].replace(" ", "")))
    return rows


def _readelf_entry(path: Path) -> int:
    text = subprocess.run(["readelf", "-hW", str(path)], capture_output=True, text=True,
                          check=True).stdout
    return int(re.search(r"Entry point address:\s+(0x\w+)", text)[1], 16)


@pytest.mark.parametrize("kind", ["static", "static-pie"])
def test_a_static_program_reads_as_readelf_reads_it(programs: dict[str, Path],
                                                     kind: str) -> None:
    if not shutil.which("readelf"):
        pytest.fail("readelf (binutils) is missing; it comes with gcc")
    path = programs[kind]
    img = ElfImage.parse(path.read_bytes(), path.name)
    assert img.pie == (kind == "static-pie")
    assert img.entry == _readelf_entry(path)
    want = _readelf_loads(path)
    got = [(s.offset, s.vaddr, s.filesz, s.memsz,
            ("R" if s.flags & 4 else "") + ("W" if s.flags & 2 else "")
            + ("E" if s.flags & 1 else "")) for s in img.segments]
    assert got == want
    assert img.tls is not None and img.tls.memsz >= 4  # tls_counter
    assert any(s.writable and s.memsz - s.filesz >= 1 << 16 for s in img.segments)  # .bss
    assert img.low % PAGE == 0 and img.high % PAGE == 0 and img.low < img.high
    assert not img.executable_stack
    # The program headers are where AT_PHDR will say: inside a loaded segment's file bytes.
    data = path.read_bytes()
    phoff = struct.unpack_from("<Q", data, 32)[0]
    seg = next(s for s in img.segments if s.vaddr <= img.phdr_vaddr < s.vaddr + s.filesz)
    assert img.phdr_vaddr - seg.vaddr + seg.offset == phoff


def test_load_copies_file_bytes_to_their_addresses(programs: dict[str, Path]) -> None:
    data = programs["static-pie"].read_bytes()
    img = ElfImage.parse(data, "p")
    bias = 0x5555_0000_0000
    mem: dict[int, bytes] = {}
    img.load(data, lambda a, b: mem.__setitem__(a, bytes(b)), bias=bias)
    assert sorted(mem) == [s.vaddr + bias for s in img.segments if s.filesz]
    for s in img.segments:
        if s.filesz:
            assert mem[s.vaddr + bias] == data[s.offset:s.offset + s.filesz]
    with pytest.raises(ProgramError, match="non-PIE"):
        ElfImage.parse(programs["static"].read_bytes(), "p").load(data, lambda a, b: None, 4096)


@pytest.mark.parametrize("kind, message", [
    ("dynamic", r"p: a dynamically linked program \(it needs /lib64/ld-linux-x86-64.so.2"),
    ("object", r"p: a relocatable object"),
])
def test_what_cannot_run_yet_says_why(programs: dict[str, Path], kind: str,
                                      message: str) -> None:
    with pytest.raises(ProgramError, match=message):
        ElfImage.parse(programs[kind].read_bytes(), "p")


@pytest.mark.parametrize("data, message", [
    (b"", "not an ELF executable"),
    (b"#!/bin/sh\necho hi\n" * 8, "not an ELF executable"),
])
def test_not_an_elf_file(data: bytes, message: str) -> None:
    with pytest.raises(ProgramError, match=message):
        ElfImage.parse(data, "p")


def _patched(data: bytes, off: int, fmt: str, value: int) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, off, value)
    return bytes(b)


def test_wrong_class_machine_and_truncation(programs: dict[str, Path]) -> None:
    data = programs["static"].read_bytes()
    for patched, message in ((_patched(data, 4, "<B", 1), "32-bit"),
                             (_patched(data, 18, "<H", 183), "machine 183, not x86-64"),
                             (_patched(data, 16, "<H", 4), "core dump"),
                             (data[:200], "truncated"),
                             (data[:len(data) // 2], "truncated")):
        with pytest.raises(ProgramError, match=message):
            ElfImage.parse(patched, "p")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_damage_gives_a_program_error_or_a_consistent_image(data: st.DataObject) -> None:
    """Bytes flipped anywhere in the headers: the reader either refuses with ProgramError or
    returns segments that stay inside the file and a user address space."""
    assert _STATIC is not None
    base = _STATIC
    flips = data.draw(st.lists(st.tuples(st.integers(0, 64 + 56 * 12), st.integers(0, 255)),
                               min_size=1, max_size=8))
    b = bytearray(base)
    for off, val in flips:
        b[off] = val
    try:
        img = ElfImage.parse(bytes(b), "p")
    except ProgramError:
        return
    for s in img.segments:
        assert s.offset + s.filesz <= len(b) and s.filesz <= s.memsz
        assert s.vaddr + s.memsz <= 1 << 47


_STATIC: bytes | None = None


@pytest.fixture(autouse=True, scope="module")
def _sample(programs: dict[str, Path]) -> None:
    global _STATIC
    _STATIC = programs["static"].read_bytes()
