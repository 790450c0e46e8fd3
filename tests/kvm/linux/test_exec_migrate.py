"""Live migration of a running Linux program: ``migrate --exec`` moves it mid-run to
``receive``, and what the source printed before the switchover followed by what the target
printed after is exactly a native run's output (no line lost, none twice: unprinted output
travels in the guest's memory)."""
from __future__ import annotations

import subprocess
import tempfile
import sys
from pathlib import Path

from dirtyring.cli.child import free_port

STEPS = "1000000000"  # runs for days: still running at the switchover on any host
RUN_TIMEOUT = 300


def _migrate(prog: Path, args: list[str], *receive_args: str
             ) -> tuple[subprocess.CompletedProcess[bytes], bytes, bytes, int]:
    """``receive`` on a free loopback port, then ``migrate --exec prog -- args`` to it; the
    source's result and the target's stdout, stderr and exit status. The target is ended by
    its PID whatever happens."""
    port = free_port()
    cli = [sys.executable, "-m", "dirtyring.cli.main"]
    target = subprocess.Popen([*cli, "receive", "--insecure", "--listen", f"127.0.0.1:{port}",
                               *receive_args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        first = target.stdout.readline() if target.stdout else b""  # it listens from here
        assert first.startswith(b"listening:"), first
        src = subprocess.run([*cli, "migrate", "--insecure", "--to", f"127.0.0.1:{port}",
                              "--warmup", "0.3", "--exec", str(prog), "--", *args],
                             capture_output=True, timeout=RUN_TIMEOUT)
        assert src.returncode == 0, src.stderr[-2000:]
        out, err = target.communicate(timeout=RUN_TIMEOUT)
    finally:
        if target.poll() is None:
            target.kill()
            target.wait()
    return src, out, err, target.returncode


def test_migrate_a_running_program(count_prog: Path) -> None:
    """The program never ends by itself (STEPS is huge), so it is surely running when the
    switchover comes, whatever the host's speed; the target runs it on for a while and stops.
    Whatever each side printed, together it is a native run's first lines, each once."""
    src, out, err, status = _migrate(count_prog, [STEPS], "--run-for", "2s")
    assert status == 0, err[-2000:]
    assert out, err[-2000:]  # the target ran the program on (and printed: a line per step)
    both = src.stdout + out
    lines = both.count(b"\n")
    native = subprocess.run([str(count_prog), str(lines)], capture_output=True, timeout=RUN_TIMEOUT)
    assert both == native.stdout


def test_migrate_the_numbered_sqlite_program(txn_prog: Path) -> None:
    """The SQLite program of the protect test, migrated while it commits: the source's lines
    then the target's are a native run's output (every number once, and the final line says
    the database the target finished holds every row), and the target exits with its status."""
    args = ["6000", "wal", "9", "200"]  # >= 1.2 s: running at the switchover on any host
    src, out, err, status = _migrate(txn_prog, args)
    assert status == 9, err[-2000:]
    with tempfile.TemporaryDirectory() as d:
        native = subprocess.run([str(txn_prog), *args], cwd=d, capture_output=True,
                                timeout=RUN_TIMEOUT)
    assert src.stdout + out == native.stdout
