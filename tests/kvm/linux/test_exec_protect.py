"""``protect --exec``: a Linux program under Remus protection, with kill -9 of the primary.

The program commits numbered SQLite transactions to a database file in its (guest-memory) file
system and prints each number after its commit (``programs/sqlite_txn.c``). Its output is
released only once the checkpoint that printed it is acknowledged, and it stays in the stdio
device's state until written, so a standby resuming from any checkpoint writes what the dead
primary may not have:

- with ``--stdout FILE`` on every copy, each chunk lands at its byte offset: the file holds
  1..N once each, whatever moment the primary died at (exactly once);
- on plain stdout (a pipe) the standby cannot know what the primary wrote last: nothing is
  lost, and only a tail of the primary's last lines can appear again (at least once).

Kill points are counted in lines the primary has written (a random threshold from a seeded
generator), never in seconds, and the program either never ends by itself (it is stopped by
SIGTERM once the check has enough lines) or pauses after each line, so that the time left
after the kill point has a floor: every run kills a program that is surely mid-way, on any host
(with its syscall sites rewritten, 4,000 transactions take ~0.2 s here). Every line carries the
database's row count after that commit, so the database is checked at every line, across every
failover. Every process is ended by its PID.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dirtyring.cli.child import free_port


CLI = [sys.executable, "-m", "dirtyring.cli.main"]
#: How long any one step may take on a loaded host before the test gives up on it.
PATIENCE = 120.0
STATUS = 7  # the program's exit status: the copy that ends it must exit with it
#: Heartbeat timeout. On a loaded host a live process went silent for over 2 s: a shorter one
#: can take a live primary for dead. That would still keep every property checked here (the
#: primary is fenced, the standby writes from its checkpoint), but not the test's script.
HB = "4s"


def _seed(run: int = 0) -> random.Random:
    """Kill points come from this (DIRTYRING_TEST_SEED picks other ones)."""
    return random.Random(int(os.environ.get("DIRTYRING_TEST_SEED", "1515")) * 100 + run)


def _native(prog: Path, tmp: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    d = tmp / "native"
    d.mkdir(exist_ok=True)
    return subprocess.run([str(prog), *args], cwd=d, capture_output=True, timeout=PATIENCE)


class Procs:
    """CLI children writing to files; each is ended by its PID however the test ends."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        out = open(self.tmp / f"{name}.out", "wb")
        err = open(self.tmp / f"{name}.err", "wb")
        p = subprocess.Popen([*CLI, *args], stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
        out.close()
        err.close()
        self.procs[name] = p
        return p

    def text(self, name: str, stream: str = "out") -> bytes:
        return (self.tmp / f"{name}.{stream}").read_bytes()

    def events(self, name: str, stream: str) -> list[dict[str, object]]:
        out = []
        for line in self.text(name, stream).splitlines():
            if line.startswith(b'{"v"'):
                out.append(json.loads(line))
        return out

    def wait_event(self, name: str, stream: str, kind: str) -> dict[str, object]:
        end = time.monotonic() + PATIENCE
        while time.monotonic() < end:
            for e in self.events(name, stream):
                if e["event"] == kind:
                    return e
            if self.procs[name].poll() is not None:
                break
            time.sleep(0.02)
        raise AssertionError(f"{name}: no {kind!r} event\n" + self.describe())

    def describe(self) -> str:
        return "\n".join(f"--- {n}.{s}:\n" + self.text(n, s)[-3000:].decode(errors="replace")
                         for n in self.procs for s in ("out", "err"))

    def wait_exit(self, name: str) -> int:
        try:
            return self.procs[name].wait(PATIENCE)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{name} did not end\n" + self.describe()) from None

    def kill9(self, name: str) -> None:
        p = self.procs[name]
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
        p.wait(30)

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(10)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    try:
        yield p
    finally:
        p.close()


def _wait_lines(read: Callable[[], bytes], n: int, what: str, procs: Procs) -> int:
    """Wait until ``read()`` holds at least ``n`` complete lines; how many it holds then."""
    end = time.monotonic() + PATIENCE
    while time.monotonic() < end:
        k = read().count(b"\n")
        if k >= n:
            return k
        time.sleep(0.005)
    raise AssertionError(f"{what} never reached {n} lines\n" + procs.describe())


def _lines(data: bytes) -> list[tuple[int, int]]:
    """The program's "i rows" lines; each must be whole and say the database holds i rows."""
    assert data.endswith(b"\n") or not data, data[-200:]
    out = []
    for line in data.splitlines():
        i, rows = (int(x) for x in line.split())
        assert rows == i, line  # the database after commit i holds i rows
        out.append((i, rows))
    return out


def _consecutive(data: bytes) -> int:
    """The lines are 1..K, each once, each with its database count: K."""
    nums = [i for i, _ in _lines(data)]
    assert nums == list(range(1, len(nums) + 1)), _first_break(nums)
    return len(nums)


def _first_break(nums: list[int]) -> str:
    for k, v in enumerate(nums, 1):
        if v != k:
            return f"line {k} is {v} (around: {nums[max(0, k - 4):k + 3]})"
    return "ok"


def _standby(procs: Procs, name: str, port: int, *extra: str) -> None:
    procs.start(name, "standby", "--listen", f"127.0.0.1:{port}", "--insecure", "--json",
                "--heartbeat-timeout", HB, *extra)


def _protect(procs: Procs, port: int, prog: Path, *extra: str, n: int, mode: str,
             pause_us: int = 0) -> None:
    procs.start("primary", "protect", "--standby", f"127.0.0.1:{port}", "--insecure", "--json",
                "--heartbeat-timeout", HB, *extra, "--exec", str(prog), "--", str(n), mode,
                str(STATUS), str(pause_us))


def _stop(procs: Procs, name: str) -> int:
    """A planned stop (SIGTERM) of a copy running the program; its exit status."""
    p = procs.procs[name]
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
    return procs.wait_exit(name)


def test_protected_program_runs_like_native(procs: Procs, txn_prog: Path,
                                            tmp_path: Path) -> None:
    """No failure: the program's stdout is a native run's, byte for byte, released through
    output commit, and protect exits with the program's status after the standby
    acknowledged its last checkpoint (guest_finished, then done)."""
    n = 300
    native = _native(txn_prog, tmp_path, str(n), "delete", str(STATUS))
    assert native.returncode == STATUS
    port = free_port()
    _standby(procs, "standby", port)
    procs.wait_event("standby", "out", "listening")
    _protect(procs, port, txn_prog, n=n, mode="delete")
    assert procs.wait_exit("primary") == STATUS, procs.describe()
    assert procs.text("primary") == native.stdout
    ev = procs.events("primary", "err")
    kinds = [e["event"] for e in ev]
    assert "guest_finished" in kinds, kinds  # (it may end before "protected" is seen)
    done = ev[-1]
    assert done["event"] == "done" and done["output_violations"] == 0, done
    assert done["acked"] == done["epoch"], done  # the last checkpoint was acknowledged
    # The standby saw a planned stop, not a failure: it never took over.
    sb = [e["event"] for e in procs.events("standby", "out")]
    assert "failover_started" not in sb, sb


@pytest.mark.slow
@pytest.mark.parametrize("run", range(3))
def test_kill9_twice_numbers_continue_exactly_once(procs: Procs, txn_prog: Path,
                                                   tmp_path: Path, run: int) -> None:
    """Primary P, standby A (which re-protects to B when it takes over), standby B; all write
    the same --stdout file. The program never ends by itself. Kill -9 P at a random line, then
    kill -9 A (by then B protects it) at a later random line; let B print more, then stop it.
    The file is 1..K once each, and every line says the database holds exactly its rows."""
    rng = _seed(run)
    out = tmp_path / "program.out"
    pa, pb = free_port(), free_port()
    _standby(procs, "B", pb, "--stdout", str(out))
    _standby(procs, "A", pa, "--stdout", str(out), "--reprotect", f"127.0.0.1:{pb}",
             "--interval", "1ms")
    procs.wait_event("A", "out", "listening")
    procs.wait_event("B", "out", "listening")
    _protect(procs, pa, txn_prog, "--stdout", str(out), n=0, mode="wal")
    procs.wait_event("primary", "err", "protected")
    first = rng.randint(1, 1500)
    seen = _wait_lines(out.read_bytes, first, "the primary's output", procs)
    procs.kill9("primary")
    procs.wait_event("A", "out", "failover_done")
    procs.wait_event("B", "out", "protected")  # A's guest is protected by B now
    seen2 = _wait_lines(out.read_bytes, seen + rng.randint(1, 1500), "A's output", procs)
    procs.kill9("A")
    procs.wait_event("B", "out", "failover_done")
    _wait_lines(out.read_bytes, seen2 + 200, "B's output", procs)
    _stop(procs, "B")
    k = _consecutive(out.read_bytes())
    assert k >= seen2 + 200
    print(f"killed P after line {seen}, A after line {seen2}; B went on to {k}: each once")


@pytest.mark.slow
def test_kill9_on_pipes_loses_nothing(procs: Procs, txn_prog: Path, tmp_path: Path) -> None:
    """Without --stdout the streams are the processes' own (pipes here): the primary's
    output, then the standby's, holds every number in order; the only overlap allowed is the
    standby repeating the primary's last lines (at least once), never a gap."""
    rng = _seed()
    port = free_port()
    _standby(procs, "standby", port)
    procs.wait_event("standby", "out", "listening")
    _protect(procs, port, txn_prog, n=0, mode="delete")
    procs.wait_event("primary", "err", "protected")
    k = _wait_lines(lambda: procs.text("primary"), rng.randint(50, 800),
                    "the primary's output", procs)
    procs.kill9("primary")
    procs.wait_event("standby", "err", "failover_done")
    # The standby learnt its guest is a program and moved its events to stderr; its stdout
    # is the events it printed before that, then the program's output alone.
    def after() -> bytes:
        data = procs.text("standby")
        while data.startswith(b'{"v"') and b"\n" in data:
            data = data.split(b"\n", 1)[1]
        return data
    _wait_lines(after, 200, "the standby's output", procs)
    _stop(procs, "standby")
    p_nums = [i for i, _ in _lines(procs.text("primary"))]
    assert p_nums == list(range(1, len(p_nums) + 1)) and len(p_nums) >= k
    s_nums = [i for i, _ in _lines(after())]
    j = s_nums[0]
    assert 1 <= j <= len(p_nums) + 1, (len(p_nums), j)  # no gap (a repeat at most)
    assert s_nums == list(range(j, j + len(s_nums))), _first_break(
        [x - j + 1 for x in s_nums])
    print(f"primary printed 1..{len(p_nums)}, the standby {j}..{s_nums[-1]}: "
          f"{len(p_nums) - j + 1} line(s) repeated")


@pytest.mark.slow
def test_kill9_with_etcd_then_the_standby_ends_the_program(procs: Procs, txn_prog: Path,
                                                           tmp_path: Path) -> None:
    """With the group's key in a real etcd member: kill -9 the primary; the standby goes live
    only holding the key, and runs the program to its end: the --stdout file is a native run's
    output exactly, and the standby exits with the program's status. The program pauses 0.5 ms
    after each line and is killed within its first 1,000 of 20,000: ~9.5 s of its run are
    surely left, whatever the host's speed."""
    from dirtyring.bench.etcd_member import EtcdMember
    rng = _seed(7)
    n, pause_us = 20000, 500
    native = _native(txn_prog, tmp_path, str(n), "delete", str(STATUS), "0")
    out = tmp_path / "program.out"
    port = free_port()
    with EtcdMember() as etcd:
        grp = ["--etcd", etcd.url, "--name", f"exec-{port}"]
        _standby(procs, "standby", port, "--stdout", str(out), *grp)
        procs.wait_event("standby", "out", "listening")
        _protect(procs, port, txn_prog, "--stdout", str(out), *grp, n=n, mode="delete",
                 pause_us=pause_us)
        procs.wait_event("primary", "err", "protected")
        seen = _wait_lines(out.read_bytes, rng.randint(1, 1000), "the primary's output", procs)
        procs.kill9("primary")
        done = procs.wait_event("standby", "out", "failover_done")
        assert done.get("lease"), done  # it went live holding the key
        assert procs.wait_exit("standby") == STATUS, procs.describe()
    assert out.read_bytes() == native.stdout, seen
