"""--strace: every system call of the program, decoded, from a ring the library OS writes,
with no exit per call; and the CLI prints them on stderr while stdout stays the program's.
Also what it shows about time: clock_gettime, gettimeofday and time come from the vDSO and
make no system call at all."""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dirtyring.linux.program import LinuxProgram
from dirtyring.linux.runner import run_program

SOURCE = r"""
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>
int main(void) {
    long s = 0;
    for (int i = 0; i < 3000; i++) s += getpid();
    int fd = open("/tmp/traced", O_CREAT | O_WRONLY, 0600);
    close(fd);
    printf("sum %ld\n", s);
    return 5;
}
"""


TIME_SOURCE = r"""
#include <stdio.h>
#include <sys/time.h>
#include <time.h>
int main(void) {
    struct timespec a, b, r;
    struct timeval tv;
    clock_gettime(CLOCK_MONOTONIC, &a);
    clock_gettime(CLOCK_REALTIME, &r);
    gettimeofday(&tv, 0);
    long t = time(0);
    clock_gettime(CLOCK_MONOTONIC, &b);
    long back = (b.tv_sec - a.tv_sec) * 1000000000L + (b.tv_nsec - a.tv_nsec);
    printf("%ld %ld %ld %d\n", (long)r.tv_sec, (long)tv.tv_sec, t, back >= 0);
    return 0;
}
"""


def test_time_comes_from_the_vdso_without_a_syscall(tmp_path: Path) -> None:
    gcc = shutil.which("gcc")
    if not gcc:
        pytest.fail("gcc is missing: ./tools/install-test-deps installs it")
    (tmp_path / "t.c").write_text(TIME_SOURCE)
    subprocess.run([gcc, "-static", "-O1", "-o", str(tmp_path / "t"), str(tmp_path / "t.c")],
                   check=True)
    lines: list[str] = []
    out = bytearray()
    before = time.time()
    res = run_program(LinuxProgram(tmp_path / "t", ["t"], strace=True),
                      write=lambda k, b: out.extend(b if k == "stdout" else b""),
                      trace=lines.append)
    after = time.time()
    assert res.status == 0, res.crash
    realtime, tod, t, monotonic = (int(x) for x in out.split())
    assert monotonic == 1
    for v in (realtime, tod, t):
        assert before - 2 <= v <= after + 2, (v, before, after)
    called = {line.split("(")[0] for line in lines}
    assert not called & {"clock_gettime", "gettimeofday", "time"}, called


@pytest.fixture(scope="module")
def prog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    gcc = shutil.which("gcc")
    if not gcc:
        pytest.fail("gcc is missing: ./tools/install-test-deps installs it")
    d = tmp_path_factory.mktemp("strace")
    (d / "p.c").write_text(SOURCE)
    subprocess.run([gcc, "-static", "-O1", "-o", str(d / "p"), str(d / "p.c")], check=True)
    return d / "p"


def test_every_call_is_traced_without_an_exit_per_call(prog: Path) -> None:
    lines: list[str] = []
    out = bytearray()
    res = run_program(LinuxProgram(prog, [str(prog)], strace=True),
                      write=lambda k, b: out.extend(b if k == "stdout" else b""),
                      trace=lines.append)
    assert res.status == 5 and bytes(out) == b"sum 3000\n"
    assert lines.count("getpid() = 1") == 3000
    # glibc's getpid site was rewritten: its calls came through a trampoline, and traced.
    assert res.rewritten_sites > 0 and res.fast_calls >= 2999, res
    assert 'openat(AT_FDCWD, "/tmp/traced", 0x41, 0600) = 3' in lines
    assert "close(3) = 0" in lines and lines[-1] == "exit_group(5) = 0"
    # One exit per ring of 448 records at most, not one per call.
    assert res.io_exits < 3000 // 448 + 20, res.io_exits


def test_the_cli_traces_on_stderr(prog: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "dirtyring.cli.main", "run", "--exec", str(prog),
                        "--strace"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 5 and p.stdout == "sum 3000\n"
    assert "getpid() = 1" in p.stderr and "exit_group(5) = 0" in p.stderr
    # Every call, the ones through rewritten sites too.
    assert p.stderr.splitlines().count("getpid() = 1") == 3000
