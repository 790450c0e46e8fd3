"""Rollback over a Linux program: thousands of runs of a SQLite workload from one root, each
rolled back, print identical output and end with the same status; afterwards the guest's
memory is exactly the root's (its fingerprint), library OS and file system included."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest


import dirtyring
from dirtyring.machine.fingerprint import fingerprint

ITERATIONS = 2000
RUN_BOUND_S = 60.0  # generous: one run takes milliseconds; only a stuck guest reaches it


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
