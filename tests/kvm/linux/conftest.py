"""What the Linux-program tests share: the programs several files use (built with
``static_build``, from tests/kvm/conftest.py; a missing library is a failure naming the package
to install, never a skip)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from dirtyring.bench import exec as bench_exec

PROGRAMS = Path(__file__).resolve().parent / "programs"
SQLITE_SRC = Path(bench_exec.__file__).resolve().parent / "programs" / "sqlite_workload.c"
LIBSQLITE = Path("/usr/lib/x86_64-linux-gnu/libsqlite3.a")

Build = Callable[..., Path]


@pytest.fixture(scope="session")
def count_prog(static_build: Build, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``programs/count.c``: prints a line per step of a hash chain, for as many steps as asked."""
    return static_build(PROGRAMS / "count.c", tmp_path_factory.mktemp("count") / "count")


@pytest.fixture(scope="session")
def sqlite_prog(static_build: Build, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The SQLite workload ``bench exec`` runs, linked with Debian's libsqlite3.a."""
    if not LIBSQLITE.exists():
        pytest.fail("libsqlite3.a is missing: ./tools/install-test-deps installs libsqlite3-dev")
    return static_build(SQLITE_SRC, tmp_path_factory.mktemp("sqlite") / "sqlite_workload",
                        "-lsqlite3", "-lm")


@pytest.fixture(scope="session")
def txn_prog(static_build: Build, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``programs/sqlite_txn.c``: numbered SQLite transactions, each number printed after its
    commit, then what the database holds; ``sqlite_txn N MODE STATUS``."""
    if not LIBSQLITE.exists():
        pytest.fail("libsqlite3.a is missing: ./tools/install-test-deps installs libsqlite3-dev")
    return static_build(PROGRAMS / "sqlite_txn.c", tmp_path_factory.mktemp("txn") / "sqlite_txn",
                        "-lsqlite3", "-lm")
