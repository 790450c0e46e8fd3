"""Signals sent from outside to ``dirtyring run --exec``: the program gets them as it would
natively, wherever it is (computing in its own code, sleeping, blocked on stdin, in sigsuspend
or sigwait), and one it has no handler for ends it with the shell's 128 + signal. Each test drives the native run and
the guest run the same way and compares their transcripts."""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent / "programs"
PATIENCE = 60.0  # per line: generous, so a loaded host cannot fail it


@pytest.fixture(scope="module")
def prog(static_build, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return static_build(HERE / "outside_signals.c",
                        tmp_path_factory.mktemp("outside") / "outside_signals")


def _end(p: subprocess.Popen[bytes]) -> None:
    """End ``p`` by its PID if it is still running (whatever the test's outcome)."""
    if p.poll() is None:
        p.kill()
        p.wait()


def _drive(cmd: list[str], plan: dict[bytes, int | bytes]) -> tuple[list[bytes], int]:
    """Run ``cmd`` with an open, empty stdin; each time it prints a line of ``plan``, send it
    that signal. Returns its stdout lines and its status (a shell's: 128 + signal when killed).
    The process is ended by its PID whatever happens."""
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    lines: list[bytes] = []
    try:
        assert p.stdout is not None
        buf = b""
        while True:
            ready, _, _ = select.select([p.stdout], [], [], PATIENCE)
            assert ready, f"no output for {PATIENCE} s after {lines!r}"
            chunk = os.read(p.stdout.fileno(), 4096)
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                lines.append(line)
                if line in plan:
                    act = plan[line]
                    if isinstance(act, bytes):  # bytes for its stdin
                        assert p.stdin is not None
                        p.stdin.write(act)
                        p.stdin.flush()
                    else:
                        p.send_signal(act)
        status = p.wait(PATIENCE)
    finally:
        _end(p)
        if p.stdin is not None:
            p.stdin.close()
    return lines, 128 - status if status < 0 else status


def _guest(prog: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "dirtyring.cli.main", "run", "--exec", str(prog), "--", *args]


PLAN: dict[bytes, int | bytes] = {
    b"ready-compute": signal.SIGINT, b"ready-sleep": signal.SIGTERM,
    b"ready-read": signal.SIGHUP, b"ready-restart": signal.SIGHUP, b"handled": b"x",
    b"ready-suspend": signal.SIGQUIT, b"ready-sigwait": signal.SIGTERM}


@pytest.mark.parametrize("options", [(), ("--tracker", "ring")], ids=["untracked", "tracked"])
def test_handlers_run_wherever_the_program_is(prog: Path, options: tuple[str, ...]) -> None:
    native = _drive([str(prog)], PLAN)
    cmd = _guest(prog)
    cmd[cmd.index("--exec"):cmd.index("--exec")] = list(options)
    guest = _drive(cmd, PLAN)
    assert native == ([b"ready-compute", b"compute: caught 2", b"ready-sleep",
                       b"sleep: caught 15", b"ready-read", b"read: caught 1",
                       b"ready-restart", b"handled", b"restart: read 1 byte x caught 1",
                       b"ready-suspend", b"suspend: returned -1 errno EINTR, caught 3",
                       b"ready-sigwait", b"sigwait: got 15"], 0)
    assert guest == native


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_without_handler_ends_the_program_like_natively(prog: Path, sig: int) -> None:
    plan = {b"ready-compute": sig}
    native = _drive([str(prog), "plain"], plan)
    guest = _drive(_guest(prog, "plain"), plan)
    assert native == ([b"ready-compute"], 128 + sig)
    assert guest == native


def test_a_signal_before_the_program_runs_is_kept(prog: Path) -> None:
    """Sent before the machine is even built: delivered once the program can take it (its
    default action, as the program has no handler yet when it starts)."""
    p = subprocess.Popen(_guest(prog, "plain"), stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(0.05)  # (any moment will do: whatever it reached, SIGTERM must end it)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=PATIENCE)
    finally:
        _end(p)
    # Before dirtyring takes SIGTERM over (while Python starts), the signal ends dirtyring
    # itself: a shell sees 143 either way.
    assert p.returncode in (128 + signal.SIGTERM, -signal.SIGTERM), err


def test_a_restored_program_gets_signals_too(prog: Path, tmp_path: Path) -> None:
    """``dirtyring restore`` of a program runs it like ``run --exec`` does: a SIGTERM for
    dirtyring goes to the program, which (no handler) ends with 143."""
    snaps = tmp_path / "snaps"
    cli = [sys.executable, "-m", "dirtyring.cli.main"]
    s = subprocess.run([*cli, "snapshot", str(snaps), "--exec", str(prog), "--seconds", "0.2",
                        "--every", "0.1", "--", "plain"], capture_output=True, timeout=120)
    assert s.returncode == 0 and s.stdout == b"ready-compute\n", s.stderr
    p = subprocess.Popen([*cli, "restore", str(snaps / "snap-0001.snap"), "--seconds", "600"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    try:
        assert p.stderr is not None
        seen = b""
        while b"running it" not in seen:  # the restored program runs from here on
            line = p.stderr.readline()
            assert line, seen
            seen += line
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=PATIENCE)
    finally:
        _end(p)
    assert p.returncode == 128 + signal.SIGTERM, seen + err
    assert out == b""
