"""What the Linux-program tests share: building a static test program with gcc and glibc's
libc.a (a missing compiler or library is a failure naming the package to install, never a
skip), and the programs several files use."""
from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from dirtyring.bench import exec as bench_exec

PROGRAMS = Path(__file__).resolve().parent / "programs"
SQLITE_SRC = Path(bench_exec.__file__).resolve().parent / "programs" / "sqlite_workload.c"
LIBSQLITE = Path("/usr/lib/x86_64-linux-gnu/libsqlite3.a")

Build = Callable[..., Path]


def build_static(src: Path, out: Path, *libs: str) -> Path:
    """``gcc -static -O1 -o out src libs...``; the test fails with gcc's message if it cannot."""
    gcc = shutil.which("gcc")
    if not gcc:
        pytest.fail("gcc is missing: ./tools/install-test-deps installs it")
    r = subprocess.run([gcc, "-static", "-O1", "-o", str(out), str(src), *libs],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="session")
def static_build() -> Build:
    """``build_static`` for test files (a fixture: conftest modules are not imported by name)."""
    return build_static


@pytest.fixture(scope="session")
def count_prog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``programs/count.c``: prints a line per step of a hash chain, for as many steps as asked."""
    return build_static(PROGRAMS / "count.c", tmp_path_factory.mktemp("count") / "count")


@pytest.fixture(scope="session")
def sqlite_prog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The SQLite workload ``bench exec`` runs, linked with Debian's libsqlite3.a."""
    if not LIBSQLITE.exists():
        pytest.fail("libsqlite3.a is missing: ./tools/install-test-deps installs libsqlite3-dev")
    return build_static(SQLITE_SRC, tmp_path_factory.mktemp("sqlite") / "sqlite_workload",
                        "-lsqlite3", "-lm")


@pytest.fixture(scope="session")
def txn_prog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``programs/sqlite_txn.c``: numbered SQLite transactions, each number printed after its
    commit, then what the database holds; ``sqlite_txn N MODE STATUS``."""
    if not LIBSQLITE.exists():
        pytest.fail("libsqlite3.a is missing: ./tools/install-test-deps installs libsqlite3-dev")
    return build_static(PROGRAMS / "sqlite_txn.c", tmp_path_factory.mktemp("txn") / "sqlite_txn",
                        "-lsqlite3", "-lm")
