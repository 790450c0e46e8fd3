"""Rewritten syscall sites: the library OS turns a `mov $nr,%eax; syscall` site that trapped
into a jump to a trampoline, so the next calls from it take no trap; sites that only look like
one (a mov to r8d, a b8 that is a displacement) are left alone, a jump straight to a rewritten
site's syscall instruction still works, and the program's output is native's either way.
Deterministic: counts and bytes, no timing."""
from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from dirtyring.linux.program import LinuxProgram
from dirtyring.linux.runner import ProgramResult, run_program

HERE = Path(__file__).resolve().parent / "programs"
Build = Callable[..., Path]
N = 2000
BYTES_NATIVE = b"first bytes: site_getpid b8 (syscall 0f05) r8d_site 41b8 disp8_site b8\n"
BYTES_REWRITTEN = b"first bytes: site_getpid e9 (syscall 0f05) r8d_site 41b8 disp8_site b8\n"


@pytest.fixture(scope="module")
def prog(tmp_path_factory: pytest.TempPathFactory, static_build: Build) -> Path:
    return static_build(HERE / "rewrite.c", tmp_path_factory.mktemp("rewrite") / "rewrite")


@pytest.fixture(scope="module")
def pie_prog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same program as static-PIE: its image (and so its trampolines) sit at PIE_BASE."""
    gcc = shutil.which("gcc")
    if not gcc:
        pytest.fail("gcc is missing: ./tools/install-test-deps installs it")
    out = tmp_path_factory.mktemp("rewrite-pie") / "rewrite"
    r = subprocess.run([gcc, "-static-pie", "-O1", "-o", str(out), str(HERE / "rewrite.c")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return out


def _run(prog: Path, **kw: bool) -> tuple[ProgramResult, bytes]:
    out = bytearray()
    res = run_program(LinuxProgram(prog, [str(prog), str(N)], **kw),
                      write=lambda k, b: out.extend(b if k == "stdout" else b""))
    assert res.status == 0 and res.crash is None, res.crash
    return res, bytes(out)


@pytest.mark.parametrize("kind", ["static", "static-pie"])
def test_sites_are_rewritten_and_only_true_ones(kind: str, request: pytest.FixtureRequest
                                                ) -> None:
    prog: Path = request.getfixturevalue("prog" if kind == "static" else "pie_prog")
    native = subprocess.run([str(prog), str(N)], capture_output=True, timeout=60)
    assert native.returncode == 0 and native.stdout.endswith(BYTES_NATIVE), native.stdout
    res, out = _run(prog)
    # Same answers as native; only site_getpid's first byte changed (e9: a jump), the r8d and
    # displacement look-alikes kept theirs, and the syscall instruction stayed.
    assert out == native.stdout[:-len(BYTES_NATIVE)] + BYTES_REWRITTEN
    assert res.rewritten_sites > 0
    # site_getpid ran N times: one trap (which rewrote it), then N - 1 through its trampoline.
    assert res.fast_calls >= N - 1
    # r8d_site (2N calls) and disp8_site (N) trapped every time; little else did.
    assert 3 * N <= res.trapped_calls <= 3 * N + 100, res.trapped_calls


def test_rewriting_off_leaves_the_code_alone(prog: Path) -> None:
    res, out = _run(prog, rewrite_syscalls=False)
    assert out.endswith(BYTES_NATIVE)
    assert (res.rewritten_sites, res.fast_calls) == (0, 0)
    assert res.trapped_calls >= 4 * N


def test_getpid_loop_takes_the_fast_path(tmp_path: Path, static_build: Build) -> None:
    """glibc's own getpid (`mov $39,%eax; syscall` in libc.a): every call after the first comes
    through the trampoline."""
    src = tmp_path / "g.c"
    src.write_text("#include <stdio.h>\n#include <unistd.h>\n"
                   "int main(void) { long s = 0; for (int i = 0; i < 5000; i++) s += getpid();"
                   " printf(\"%ld\\n\", s); return 0; }\n")
    exe = static_build(src, tmp_path / "g")
    out = bytearray()
    res = run_program(LinuxProgram(exe, [str(exe)]), write=lambda k, b: out.extend(b))
    assert res.status == 0 and bytes(out) == b"5000\n"
    assert res.rewritten_sites > 0
    assert 4999 <= res.fast_calls <= 5000 + 20, res.fast_calls
    assert res.trapped_calls < 50, res.trapped_calls


@pytest.mark.parametrize("flag, last", [([], BYTES_REWRITTEN), (["--no-rewrite"], BYTES_NATIVE)])
def test_the_cli_can_turn_it_off(prog: Path, flag: list[str], last: bytes) -> None:
    p = subprocess.run([sys.executable, "-m", "dirtyring.cli.main", "run", "--exec", str(prog),
                        *flag, "--", "10"], capture_output=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.endswith(last), p.stdout
