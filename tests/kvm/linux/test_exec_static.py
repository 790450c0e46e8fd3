"""Unmodified static glibc programs run under the library OS on real KVM: output, exit status
and files match a native run, big outputs pass through the stdio queue, a crash or an
unsupported syscall is reported clearly, and dirty tracking misses none of the program's
writes."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dirtyring.errors import ConfigError
from dirtyring.linux.program import LinuxProgram
from dirtyring.linux.runner import CRASH_STATUS, ProgramResult, run_program

RUN_TIMEOUT = 120  # generous: each program ends in well under a second

PROGRAMS = {
    "hello": r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
int main(int argc, char **argv, char **envp) {
    for (int i = 0; i < argc; i++) printf("argv[%d]=%s\n", i, argv[i]);
    for (char **e = envp; *e; e++) printf("env %s\n", *e);
    char *q = malloc(100);
    strcpy(q, "heap ok");
    puts(q);
    fprintf(stderr, "to stderr\n");
    return 3;
}
""",
    "bigout": r"""
#include <stdio.h>
int main(void) {
    for (int i = 0; i < 20000; i++) printf("line %6d of the big output, to fill the queue\n", i);
    for (int i = 0; i < 3000; i++) fprintf(stderr, "err %d\n", i);
    return 0;
}
""",
    "memory": r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>
int main(void) {
    size_t n = 48u << 20;                       /* big: from mmap */
    unsigned char *big = malloc(n);
    for (size_t i = 0; i < n; i += 4096) big[i] = (unsigned char)(i >> 12);
    unsigned long sum = 0;
    for (size_t i = 0; i < n; i += 4096) sum += big[i];
    printf("big sum %lu\n", sum);
    char *small[1000];                          /* small: from brk */
    for (int i = 0; i < 1000; i++) { small[i] = malloc(100 + i); memset(small[i], i, 100 + i); }
    long ok = 1;
    for (int i = 0; i < 1000; i++) ok &= small[i][99 + i] == (char)i;
    printf("small ok %ld\n", ok);
    unsigned char *m = mmap(0, 1 << 20, PROT_READ | PROT_WRITE,
                            MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    long zero = 1;
    for (int i = 0; i < 1 << 20; i++) zero &= m[i] == 0;
    printf("mmap zeroed %ld\n", zero);
    unsigned char r[32] = {0};
    printf("getrandom %ld\n", (long)getrandom(r, sizeof r, 0));
    struct utsname u;
    uname(&u);
    printf("uname %s %s\n", u.sysname, u.machine);
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("monotonic %d\n", (b.tv_sec > a.tv_sec) || (b.tv_sec == a.tv_sec && b.tv_nsec >= a.tv_nsec));
    printf("pid positive %d\n", getpid() > 0);
    return 0;
}
""",
    "crash": r"""
#include <stdio.h>
int main(void) {
    printf("before the crash\n");
    fflush(stdout);
    *(volatile int *)8 = 1;
    printf("never\n");
    return 0;
}
""",
    "unsupported": r"""
#include <errno.h>
#include <stdio.h>
#include <unistd.h>
#include <sys/syscall.h>
int main(void) {
    for (int i = 0; i < 3; i++) {
        long a = syscall(999), b = syscall(SYS_fork);
        printf("%ld %ld %d\n", a, b, errno);
    }
    return 0;
}
""",
}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    gcc = shutil.which("gcc")
    if not gcc:
        pytest.fail("gcc is missing: ./tools/install-test-deps installs it")
    d = tmp_path_factory.mktemp("progs")
    out = {}
    for name, src in PROGRAMS.items():
        (d / f"{name}.c").write_text(src)
        r = subprocess.run([gcc, "-static", "-O1", "-o", str(d / name), str(d / f"{name}.c")],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        out[name] = d / name
    return out


WARNINGS: list[str] = []


def _guest(path: Path, args: list[str], env: dict[str, str] | None = None,
           **kw: Any) -> tuple[int, bytes, bytes, ProgramResult]:
    streams = {"stdout": bytearray(), "stderr": bytearray()}
    WARNINGS.clear()
    res = run_program(LinuxProgram(path, [str(path), *args], env or {}),
                      write=lambda k, b: streams[k].extend(b), warn=WARNINGS.append, **kw)
    return res.status, bytes(streams["stdout"]), bytes(streams["stderr"]), res


def _native(path: Path, args: list[str], env: dict[str, str] | None = None
            ) -> tuple[int, bytes, bytes]:
    p = subprocess.run([str(path), *args], env=env or {}, capture_output=True,
                       timeout=RUN_TIMEOUT)
    return p.returncode, p.stdout, p.stderr


@pytest.mark.parametrize("name, args, env", [
    ("hello", ["one", "two words", ""], {"A": "1", "LANG": "C"}),
    ("hello", [], {}),
    ("bigout", [], {}),
])
def test_output_and_status_match_a_native_run(built: dict[str, Path], name: str,
                                              args: list[str], env: dict[str, str]) -> None:
    status, out, err, res = _guest(built[name], args, env)
    assert (status, out, err) == _native(built[name], args, env)
    assert res.crash is None and not res.unsupported


@pytest.mark.parametrize("tracker", ["ring", "bitmap"])
def test_tracking_misses_none_of_the_programs_writes(built: dict[str, Path],
                                                     tracker: str) -> None:
    status, out, _, res = _guest(built["memory"], [], tracker=tracker, verify_every=1)
    assert status == 0, out
    assert res.missed_pages == 0
    assert res.dirty_pages >= (48 << 20) // 4096
    lines = out.decode().splitlines()
    assert lines == ["big sum " + str(sum((i & 0xFF) for i in range((48 << 20) // 4096))),
                     "small ok 1", "mmap zeroed 1", "getrandom 32", "uname Linux x86_64",
                     "monotonic 1", "pid positive 1"]


def test_a_crash_is_reported_with_the_output_before_it(built: dict[str, Path]) -> None:
    status, out, _, res = _guest(built["crash"], [])
    assert status == CRASH_STATUS
    assert out == b"before the crash\n"
    assert res.crash


def test_an_unsupported_syscall_is_named_once_and_gets_enosys(built: dict[str, Path]) -> None:
    status, out, _, res = _guest(built["unsupported"], [])
    assert status == 0
    assert out == b"-1 -1 38\n" * 3
    assert sorted(res.unsupported) == ["fork (57)", "syscall 999 (999)"]
    assert len(WARNINGS) == 2 and all("not supported" in w for w in WARNINGS)


def test_the_cli_behaves_like_the_program(built: dict[str, Path]) -> None:
    path = built["hello"]
    p = subprocess.run([sys.executable, "-m", "dirtyring.cli.main", "run", "--exec", str(path),
                        "--env", "A=1", "--", "x", "-y"], capture_output=True,
                       timeout=RUN_TIMEOUT, env={**os.environ})
    want = _native(path, ["x", "-y"], {"A": "1"})
    assert (p.returncode, p.stdout, p.stderr) == want


@pytest.mark.parametrize("argv, message", [
    (["--exec", "/nonexistent/prog"], "cannot read the program"),
    (["--exec", "/bin/sh"], "dynamically linked"),
    (["--", "x"], "need --exec"),
])
def test_the_cli_refuses_what_it_cannot_run(argv: list[str], message: str) -> None:
    p = subprocess.run([sys.executable, "-m", "dirtyring.cli.main", "run", *argv],
                       capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert p.returncode != 0 and message in p.stderr and "Traceback" not in p.stderr


def test_untracked_runs_give_the_same_output_and_status(txn_prog: Path, tmp_path: Path) -> None:
    """``tracker="none"`` (the library OS alone, as bench exec measures it) runs the program to
    the same end: output drained on the way, the native status; a shadow check is refused."""
    args = ["300", "wal", "6"]
    native = subprocess.run([str(txn_prog), *args], cwd=tmp_path, capture_output=True,
                            timeout=120)
    out: list[bytes] = []
    res = run_program(LinuxProgram(txn_prog, [str(txn_prog), *args]),
                      write=lambda s, d: out.append(d), tracker="none", interval=0.01)
    assert (b"".join(out), res.status, res.crash) == (native.stdout, 6, None)
    with pytest.raises(ConfigError, match="needs a tracker"):
        run_program(LinuxProgram(txn_prog), write=lambda s, d: None, tracker="none",
                    verify_every=5)


def test_a_program_that_allocates_hundreds_of_mib_runs_with_the_defaults(
        static_build, tmp_path: Path) -> None:
    """``run --exec``'s default address space (1 GiB, sparse) holds a 256 MiB malloc, as a
    native run does; ``--memory 64M`` cannot, and the program, which checks, says so."""
    prog = static_build(Path(__file__).resolve().parent / "programs" / "bigalloc.c",
                        tmp_path / "bigalloc")
    native = subprocess.run([str(prog)], capture_output=True, timeout=RUN_TIMEOUT)
    cli = [sys.executable, "-m", "dirtyring.cli.main", "run", "--exec", str(prog)]
    p = subprocess.run(cli, capture_output=True, timeout=RUN_TIMEOUT)
    assert (p.returncode, p.stdout) == (native.returncode, native.stdout) == (0, b"sum 32640\n")
    small = subprocess.run([*cli, "--memory", "64M"], capture_output=True, timeout=RUN_TIMEOUT)
    assert (small.returncode, small.stdout) == (1, b"malloc failed\n"), small.stderr
