"""Snapshots of a running Linux program: ``dirtyring snapshot DIR --exec PROGRAM`` writes a
chain while the program runs, and ``dirtyring restore`` of a snapshot taken mid-run finishes
the program: its output from there on is exactly the rest of a native run's output, and its
exit status is the native one."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent / "programs"
RUN_TIMEOUT = 300
STEPS = "1500"  # ~2 s natively: the first snapshots are taken long before it ends


@pytest.fixture(scope="module")
def count(count_prog: Path) -> tuple[Path, bytes, int]:
    n = subprocess.run([str(count_prog), STEPS], capture_output=True, timeout=RUN_TIMEOUT)
    return count_prog, n.stdout, n.returncode


def _cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "dirtyring.cli.main", *args],
                          capture_output=True, timeout=RUN_TIMEOUT)


def test_restore_mid_run_finishes_the_program(count: tuple[Path, bytes, int],
                                              tmp_path: Path) -> None:
    prog, native, status = count
    snaps = tmp_path / "snaps"
    s = _cli("snapshot", str(snaps), "--exec", str(prog), "--seconds", "0.3", "--every", "0.1",
             "--", STEPS)
    assert s.returncode == 0, s.stderr
    assert native.startswith(s.stdout)  # what it printed before the snapshots stopped
    for name in ("snap-0000.snap", "snap-0001.snap"):
        r = _cli("restore", str(snaps / name), "--seconds", "240")
        assert r.returncode == status, r.stderr
        assert r.stdout and native.endswith(r.stdout), (name, r.stdout[:200])
        assert b"the program ended with status" in r.stderr


def test_a_snapshot_of_an_ended_program_restores_its_exit_status(count_prog: Path,
                                                                 tmp_path: Path) -> None:
    """The last snapshot of a chain is taken after the program ended: restoring it prints
    nothing more and exits with the program's status (kept in the machine's state), not 0."""
    native = subprocess.run([str(count_prog), "3"], capture_output=True, timeout=RUN_TIMEOUT)
    assert native.returncode != 0  # (the hash chain's low bits: 3 steps end with a non-zero)
    snaps = tmp_path / "snaps"
    s = _cli("snapshot", str(snaps), "--exec", str(count_prog), "--seconds", "60",
             "--every", "0.05", "--", "3")
    assert s.returncode == 0, s.stderr
    assert s.stdout == native.stdout
    assert b"the guest finished" in s.stderr
    last = sorted(snaps.glob("snap-*.snap"))[-1]
    r = _cli("restore", str(last), "--seconds", "60")
    assert r.returncode == native.returncode, r.stderr
    assert r.stdout == b""


def test_restore_of_the_numbered_sqlite_program_continues_its_database(
        txn_prog: Path, tmp_path: Path) -> None:
    """The SQLite program of the protect test (a numbered transaction per line): restored
    from a mid-run snapshot it prints the rest of the numbers, and its database (a file in its
    guest-memory file system, restored with it) then holds exactly what a native run's does."""
    args = ["8000", "wal", "5", "100"]  # >= 0.8 s at any speed: snapshot 1 (50 ms) is mid-run
    nat_dir = tmp_path / "native"
    nat_dir.mkdir()
    native = subprocess.run([str(txn_prog), *args], cwd=nat_dir, capture_output=True,
                            timeout=RUN_TIMEOUT)
    assert native.returncode == 5
    snaps = tmp_path / "snaps"
    s = _cli("snapshot", str(snaps), "--exec", str(txn_prog), "--seconds", "0.2", "--every",
             "0.05", "--", *args)
    assert s.returncode == 0, s.stderr
    assert native.stdout.startswith(s.stdout)
    r = _cli("restore", str(snaps / "snap-0001.snap"), "--seconds", "240")
    assert r.returncode == 5, r.stderr
    assert r.stdout and native.stdout.endswith(r.stdout)
    assert r.stdout.startswith(b"1\n") or native.stdout[:-len(r.stdout)].endswith(b"\n")


def test_each_restore_draws_fresh_random_bytes(static_build, tmp_path: Path) -> None:
    """Two restores of one snapshot must not hand the program the same getrandom bytes: the
    snapshot holds the pool the original run drew from, and ``restore`` refills it. Only a
    line whose bytes were drawn before the capture (at most the first after it) may repeat."""
    prog = static_build(HERE / "entropy_steps.c", tmp_path / "entropy_steps")
    snaps = tmp_path / "snaps"
    s = _cli("snapshot", str(snaps), "--exec", str(prog), "--seconds", "0.3", "--every", "0.1",
             "--", "500")  # >= 1 s at any speed: the snapshots are mid-run
    assert s.returncode == 0, s.stderr
    runs = []
    for _ in range(2):
        r = _cli("restore", str(snaps / "snap-0001.snap"), "--seconds", "240")
        assert r.returncode == 0, r.stderr
        runs.append(dict(line.split() for line in r.stdout.decode().splitlines()))
    steps = sorted(set(runs[0]) & set(runs[1]), key=int)
    assert len(steps) >= 100 and steps[-1] == "499"
    same = [i for i in steps if runs[0][i] == runs[1][i]]
    assert same in ([], [steps[0]]), same[:5]
