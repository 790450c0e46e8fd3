"""poll, ppoll, select and pselect in the library OS against Linux: ``programs/poll.c`` prints
the same transcript natively and in the guest (files, /dev/null, pipes empty, with data and with
no writer left, stdin's bytes and then its end, bad descriptors, timeouts that run out and the
time left they report, a wait mask restored). A poll that nothing but a signal could end waits
for one where the VMM forwards them (``run --exec``), and elsewhere ends the program with a
report instead of hanging."""
from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from dirtyring.linux.program import LinuxProgram
from dirtyring.linux.runner import run_program

HERE = Path(__file__).resolve().parent / "programs"
RUN_TIMEOUT = 120  # generous: the program ends in well under a second
STDIN = b"line1\nline2\n"


@pytest.fixture(scope="module")
def poll_prog(tmp_path_factory: pytest.TempPathFactory,
              static_build: Callable[..., Path]) -> Path:
    return static_build(HERE / "poll.c", tmp_path_factory.mktemp("prog") / "poll")


@pytest.mark.parametrize("options", [(), ("--tracker", "ring", "--verify-every", "5")],
                         ids=["untracked", "tracked"])
def test_poll_and_select_match_a_native_run(poll_prog: Path, tmp_path: Path,
                                            options: tuple[str, ...]) -> None:
    n = subprocess.run([str(poll_prog)], cwd=tmp_path, input=STDIN, capture_output=True,
                       env={}, timeout=RUN_TIMEOUT)
    assert n.returncode == 0, n.stderr
    g = subprocess.run([sys.executable, "-m", "dirtyring.cli.main", "run", "--exec",
                        str(poll_prog), *options], input=STDIN, capture_output=True,
                       timeout=RUN_TIMEOUT)
    assert g.returncode == 0, g.stderr
    assert b"not supported" not in g.stderr, g.stderr
    assert g.stdout == n.stdout
    assert b"stdin read 12, then: 1 0x10" in g.stdout  # its bytes, then its end


def test_a_poll_nothing_can_end_is_reported_where_no_signal_can_come(poll_prog: Path) -> None:
    prog = LinuxProgram(poll_prog, [str(poll_prog), "forever"])
    res = run_program(prog, write=lambda k, b: None, tracker="none", seconds=RUN_TIMEOUT)
    assert res.crash is not None and "waits in poll or select with no timeout" in res.crash


def test_a_poll_nothing_can_end_waits_for_a_signal_under_run(poll_prog: Path) -> None:
    p = subprocess.Popen([sys.executable, "-m", "dirtyring.cli.main", "run", "--exec",
                          str(poll_prog), "--", "forever"], stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert p.stdout is not None
        assert p.stdout.readline() == b"polling\n"
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=RUN_TIMEOUT)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 128 + signal.SIGTERM, err
