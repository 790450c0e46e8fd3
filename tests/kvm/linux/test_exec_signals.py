"""Signals, futex, sleeps and the small process calls (the library OS's proc.c): a conformance
program's transcript is byte-identical natively and under dirtyring; a program a signal kills
ends with 128 + N and a report naming the signal; a wait no one can end is reported, never a
hang (each run is bounded by the runner's ``seconds``)."""
from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from dirtyring.linux.program import LinuxProgram
from dirtyring.linux.runner import CRASH_STATUS, ProgramResult, run_program
from dirtyring.linux.signals import killed_line

HERE = Path(__file__).resolve().parent / "programs"
BOUND_S = 120.0


@pytest.fixture(scope="module")
def signals_prog(tmp_path_factory: pytest.TempPathFactory,
                 static_build: Callable[..., Path]) -> Path:
    return static_build(HERE / "signals.c", tmp_path_factory.mktemp("signals") / "signals")


def _run(prog: Path, *args: str) -> tuple[ProgramResult, bytes, bytes]:
    out = {"stdout": bytearray(), "stderr": bytearray()}
    res = run_program(LinuxProgram(prog, [str(prog), *args]),
                      write=lambda k, b: out[k].extend(b), seconds=BOUND_S)
    return res, bytes(out["stdout"]), bytes(out["stderr"])


def test_transcript_is_native(signals_prog: Path, tmp_path: Path) -> None:
    native = subprocess.run([str(signals_prog)], capture_output=True, cwd=tmp_path, env={},
                            timeout=60)
    assert native.returncode == 0, native.stderr
    res, out, err = _run(signals_prog)
    assert res.crash is None and res.signal is None, res.crash
    assert res.status == 0 and not res.unsupported, res.unsupported
    assert out == native.stdout
    assert err == native.stderr
    assert out.endswith(b"-- end\n") and b"handler rewriting RAX = 42" in out


@pytest.mark.parametrize("how, sig, name", [("abort", 6, "SIGABRT"), ("term", 15, "SIGTERM")])
def test_a_fatal_signal_ends_the_program(signals_prog: Path, how: str, sig: int,
                                         name: str) -> None:
    native = subprocess.run([str(signals_prog), how], capture_output=True, timeout=60)
    assert native.returncode == -sig  # what the shell shows as 128 + sig
    res, out, _ = _run(signals_prog, how)
    assert res.crash is None, res.crash
    assert (res.status, res.signal) == (128 + sig, sig)
    assert out == native.stdout == b"before\n"
    assert killed_line(sig) == f"the program was killed by signal {sig} ({name})"


def test_run_exec_reports_the_signal(signals_prog: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "dirtyring.cli.main", "run", "--exec",
                        str(signals_prog), "--", "abort"], capture_output=True, timeout=120,
                       stdin=subprocess.DEVNULL)
    assert p.returncode == 134
    assert p.stdout == b"before\n"
    assert b"the program was killed by signal 6 (SIGABRT)" in p.stderr, p.stderr


@pytest.mark.parametrize("how, what", [
    ("futex", "the program waits on a futex no other thread can wake"),
    ("pause", "the program waits for a signal"),
])
def test_a_wait_no_one_can_end_is_reported(signals_prog: Path, how: str, what: str) -> None:
    # Never natively: it would hang there.
    res, out, _ = _run(signals_prog, how)
    assert res.crash is not None and what in res.crash, res.crash
    assert "still running" not in res.crash  # it ended by itself, not by the bound
    assert res.status == CRASH_STATUS and out == b"before\n"
