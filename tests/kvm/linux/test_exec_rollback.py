"""Rollback over a Linux program: thousands of runs of a SQLite workload from one root, each
rolled back, print identical output and end with the same status; afterwards the guest's
memory is exactly the root's (its fingerprint), library OS and file system included."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from dirtyring.bench import exec as bench_exec

import dirtyring
from dirtyring.machine.fingerprint import fingerprint

HERE = Path(__file__).resolve().parent / "programs"
SQLITE_SRC = Path(bench_exec.__file__).resolve().parent / "programs" / "sqlite_workload.c"
ITERATIONS = 2000
RUN_BOUND_S = 60.0  # generous: one run takes milliseconds; only a stuck guest reaches it


@pytest.fixture(scope="module")
def sqlite_prog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not Path("/usr/lib/x86_64-linux-gnu/libsqlite3.a").exists():
        pytest.fail("libsqlite3.a is missing: ./tools/install-test-deps installs libsqlite3-dev")
    gcc = shutil.which("gcc")
    if not gcc:
        pytest.fail("gcc is missing: ./tools/install-test-deps installs it")
    out = tmp_path_factory.mktemp("sqlite") / "sqlite_workload"
    r = subprocess.run([gcc, "-static", "-O1", "-o", str(out), str(SQLITE_SRC),
                        "-lsqlite3", "-lm"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.slow
def test_thousands_of_rollbacks_give_identical_output(sqlite_prog: Path) -> None:
    native = subprocess.run([str(sqlite_prog), "delete", "200"], capture_output=True,
                            cwd=sqlite_prog.parent, timeout=120)
    prog = dirtyring.LinuxProgram(sqlite_prog, [str(sqlite_prog), "delete", "200"])
    out = bytearray()

    def sink(kind: str, payload: bytes) -> None:
        if kind in ("stdout", "stderr"):
            out.extend(payload)

    seen = set()
    with dirtyring.Machine(prog.config(tracker="hotset"), boot=prog.boot, threaded=False,
                           sink=sink) as m:
        rb = dirtyring.Rollback(m)
        root = rb.mark()
        for i in range(ITERATIONS):
            why = rb.run(RUN_BOUND_S)
            assert why == "stopped" and m.crashed is None, (i, why, m.crashed)
            m.drain_output()
            seen.add((bytes(out), m.runners[0].exit_code))
            out.clear()
            rb.rollback()
        assert m.memory is not None
        assert fingerprint(m.memory) == root.digest
    assert seen == {(native.stdout, native.returncode)}
