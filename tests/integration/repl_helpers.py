"""Shared helpers for the two-process replication tests (not collected: no ``test_`` prefix).

Every process a test starts is a :class:`Proc` made through the ``spawn`` fixture, which ends
each one by its PID (SIGTERM, then SIGKILL) however the test ends. Loopback only; ports come
from binding port 0. Processes speak the CLI's ``--json`` event lines, which a reader thread
collects, so a test can wait for an event and look at every event afterwards.
"""
from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from dirtyring.cli.child import ChildProcess
from dirtyring.cli.replication import control_request
from dirtyring.replication.kvservice import KvClient, missing_writes
from dirtyring.replication.standby import Standby

CLI = [sys.executable, "-m", "dirtyring.cli.main"]
HOST = "127.0.0.1"
Event = dict[str, Any]


class PreconditionFailed(Exception):
    """A step before the property under test failed. Not an AssertionError, so a strict
    ``xfail(raises=AssertionError)`` test that trips over it fails instead of passing as
    "expected failure" for the wrong reason."""


def require(cond: object, msg: str = "") -> None:
    if not cond:
        raise PreconditionFailed(msg)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def addr(port: int) -> str:
    return f"{HOST}:{port}"


def new_key() -> bytes:
    return os.urandom(32)


def child_env(key: bytes) -> dict[str, str]:
    env = dict(os.environ)
    env["DIRTYRING_KEY"] = key.hex()
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Proc(ChildProcess):
    """A dirtyring child process printing JSON event lines (``--json``): the CLI's own
    :class:`~dirtyring.cli.child.ChildProcess`, plus what tests ask of it."""

    def __init__(self, name: str, args: list[str], env: dict[str, str]) -> None:
        super().__init__(name, args, env)

    def need_event(self, kind: str, timeout: float,
                   pred: Callable[[Event], bool] | None = None) -> Event:
        """Like :meth:`wait_event`, but a missing event is a failed precondition."""
        e = self.wait_event(kind, timeout, pred)
        if e is None:
            raise PreconditionFailed(f"no {kind!r} event: " + self.describe())
        return e

    def wait_count(self, kind: str, n: int, timeout: float) -> bool:
        """True once at least ``n`` events ``kind`` arrived (False on timeout / output end)."""
        return self.wait_event(kind, timeout, lambda e: len(self.of(kind)) >= n) is not None

    def end(self) -> None:
        """SIGTERM, then SIGKILL, by PID; idempotent (:meth:`ChildProcess.stop`)."""
        self.stop()


class Spawner:
    """Starts CLI children with a shared key; :meth:`close` ends every one by PID. Their
    heartbeat timeout is 10 s unless a test asks otherwise: on a loaded host live processes
    went silent for over 2 s (see HB_CALM), and a test that does not test heartbeats must not
    fail over because of that."""

    def __init__(self) -> None:
        self.key = new_key()
        self.env = child_env(self.key)
        self.procs: list[Proc] = []
        self.loads: list[KvLoad] = []

    def kv_load(self, port: int, clients: int = 3) -> KvLoad:
        load = KvLoad(port, clients=clients)
        self.loads.append(load)
        return load

    def __call__(self, name: str, *args: str) -> Proc:
        p = Proc(name, list(args), self.env)
        self.procs.append(p)
        return p

    def standby(self, port: int, *extra: str, control: int | None = None,
                serve: int | None = None, hb_timeout: str = "10s") -> Proc:
        args = ["standby", "--listen", addr(port), "--json", "--heartbeat-timeout", hb_timeout]
        if control is not None:
            args += ["--control", addr(control)]
        if serve is not None:
            args += ["--serve", addr(serve)]
        p = self("standby", *args, *extra)
        if p.wait_event("listening", 30) is None:
            raise AssertionError("standby did not start listening: " + p.describe())
        if control is not None:
            wait_port(control, 10)
        return p

    def primary(self, guest: str, standby_port: int, *extra: str, serve: int | None = None,
                memory: str = "4M", hb_timeout: str = "10s") -> Proc:
        args = ["protect", guest, "--standby", addr(standby_port), "--json", "--memory", memory,
                "--heartbeat-timeout", hb_timeout]
        if serve is not None:
            args += ["--serve", addr(serve)]
        return self("primary", *args, *extra)

    def close(self) -> None:
        for load in self.loads:
            load.finish()
        errors = []
        for p in reversed(self.procs):
            try:
                p.end()
            except Exception as e:  # keep ending the others
                errors.append(e)
        if errors:
            raise errors[0]


@pytest.fixture
def spawn() -> Iterator[Spawner]:
    s = Spawner()
    try:
        yield s
    finally:
        s.close()


def wait_port(port: int, timeout: float) -> None:
    end = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((HOST, port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > end:
                raise AssertionError(f"nothing listens on {HOST}:{port}") from None
            time.sleep(0.02)


# --- a standby inside the test process ----------------------------------------------------------
class StandbyThread:
    """A ``Standby`` served on a thread of the test process, so a test can reach its memory and
    its guest's output. Records events, guest output (the machine's sink), every commit as
    (epoch, kind, consistent after it, mismatches after it), and each vCPU's chain step in the
    committed memory at failover_started (still parked then). Construct on the main thread."""

    def __init__(self, port: int, key: bytes, **kw: Any) -> None:
        self.events: list[Event] = []
        self.output: list[tuple[float, str, Any]] = []
        self.commits: list[tuple[int, str, bool, int]] = []
        self.at_failover: dict[int, int] = {}
        self.lock = threading.RLock()
        self.sb = Standby((HOST, port), key, on_event=self._on_event, sink=self._sink, **kw)
        orig = self.sb._commit

        def spy(link: Any, epoch: int, digest: bytes) -> None:
            kind = self.sb._staged_kind
            orig(link, epoch, digest)
            with self.lock:
                self.commits.append((epoch, kind, self.sb.consistent, self.sb.mismatches))

        self.sb._commit = spy  # type: ignore[method-assign]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.sb.serve, args=(self.stop,), daemon=True)
        self.thread.start()

    def _on_event(self, e: Event) -> None:
        m = self.sb.machine
        if e["event"] == "failover_started" and m is not None:
            self.at_failover = {r.index: m.status(r.index, "step") for r in m.runners}
        with self.lock:
            self.events.append(e)

    def _sink(self, kind: str, payload: Any) -> None:
        with self.lock:
            self.output.append((time.monotonic(), kind, payload))

    def of(self, kind: str) -> list[Event]:
        with self.lock:
            return [e for e in self.events if e["event"] == kind]

    def wait(self, pred: Callable[[], object], timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self.lock:
                if pred():
                    return True
            time.sleep(0.02)
        return False

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        self.sb.close()


# --- the standby's control port ---------------------------------------------------------------
def control(port: int, cmd: str = "status", timeout: float = 10.0) -> dict[str, Any]:
    """Send one control command ("status" or "failover") and return the JSON answer."""
    out: dict[str, Any] = json.loads(control_request((HOST, port), cmd, timeout))
    return out


def failover_cli(port: int, *, status_only: bool = False, env: dict[str, str] | None = None,
                 timeout: float = 30.0) -> dict[str, Any]:
    """``dirtyring failover [--status] HOST:PORT``; returns the JSON it prints."""
    args = [*CLI, "failover", addr(port)] + (["--status"] if status_only else [])
    r = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    out: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def wait_status(port: int, pred: Callable[[dict[str, Any]], bool], timeout: float,
                every: float = 0.1) -> dict[str, Any]:
    end = time.monotonic() + timeout
    st: dict[str, Any] = {}
    while time.monotonic() < end:
        st = control(port)
        if pred(st):
            return st
        time.sleep(every)
    raise AssertionError(f"standby status never matched within {timeout} s; last: {st}")


# --- key-value clients -------------------------------------------------------------------------
def kv_value(key: int) -> int:
    return (key * 0x9E3779B97F4A7C15) & ((1 << 64) - 1)


class KvLoad:
    """Client threads writing unique keys (as ``dirtyring demo`` does); remembers every write
    acknowledged to them and the epoch each acknowledgement carried."""

    def __init__(self, port: int, clients: int = 3, connect_timeout: float = 20.0) -> None:
        self.addr = (HOST, port)
        self.acked: dict[int, int] = {}
        self.epochs: list[int] = []
        self.bad: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.connected = threading.Event()
        self.connect_timeout = connect_timeout
        self.threads = [threading.Thread(target=self._client, args=(i, clients), daemon=True)
                        for i in range(clients)]
        for t in self.threads:
            t.start()

    def _connect(self) -> KvClient | None:
        end = time.monotonic() + self.connect_timeout
        while not self.stop.is_set() and time.monotonic() < end:
            try:
                c = KvClient(self.addr, timeout=30.0)
                self.connected.set()
                return c
            except OSError:
                time.sleep(0.005)
        return None

    def _client(self, idx: int, n: int) -> None:
        c = self._connect()
        if c is None:
            return
        key = idx + 1
        try:
            while not self.stop.is_set():
                c.send({"id": key, "op": "put", "key": key, "value": kv_value(key)})
                r = c.recv()
                with self.lock:
                    if r.get("status") == "ok" and r.get("key") == key:
                        self.acked[key] = kv_value(key)
                        self.epochs.append(int(r.get("epoch", -1)))
                    else:
                        self.bad.append(r)
                key += n
        except (OSError, ConnectionError, ValueError):
            return  # the server went away: writes in flight were never acknowledged
        finally:
            c.close()

    def count(self) -> int:
        with self.lock:
            return len(self.acked)

    def wait_acked(self, n: int, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.count() >= n:
                return True
            time.sleep(0.01)
        return False

    def finish(self) -> tuple[dict[int, int], list[int]]:
        self.stop.set()
        for t in self.threads:
            t.join(10)
        with self.lock:
            return dict(self.acked), list(self.epochs)


def kv_missing(port: int, acked: dict[int, int], timeout: float = 30.0) -> list[int]:
    """Keys whose acknowledged value the key-value server on ``port`` does not return."""
    return missing_writes((HOST, port), acked, timeout)


# --- the compute guest's hash chain, natively (Python would need minutes) -------------------------
_CHAIN_C = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
static uint64_t mix(uint64_t x) {
    x += 0x9E3779B97F4A7C15ULL;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}
int main(int argc, char **argv) {  /* chain H FROM TO: the value at step TO from H at FROM */
    uint64_t h = strtoull(argv[1], 0, 0), from = strtoull(argv[2], 0, 0);
    uint64_t to = strtoull(argv[3], 0, 0);
    for (uint64_t k = from; k < to; k++) h = mix(h ^ k);
    printf("%llu\n", (unsigned long long)h);
    return 0;
}
"""


class Chain:
    """``hash_chain(seed, steps, start)`` of guests/protocol.py, compiled with the host's cc;
    remembers values so a chain is walked from scratch only once."""

    def __init__(self, tmpdir: str) -> None:
        src = os.path.join(tmpdir, "chain.c")
        self.exe = os.path.join(tmpdir, "chain")
        with open(src, "w") as f:
            f.write(_CHAIN_C)
        subprocess.run(["cc", "-O2", "-o", self.exe, src], check=True, timeout=60)

        self._known: dict[int, dict[int, int]] = {}  # seed -> step -> value

    def __call__(self, seed: int, steps: int) -> int:
        known = self._known.setdefault(seed, {0: seed})
        if steps not in known:
            frm = max(k for k in known if k <= steps)
            r = subprocess.run([self.exe, str(known[frm]), str(frm), str(steps)],
                               capture_output=True, text=True, check=True, timeout=300)
            known[steps] = int(r.stdout)
        return known[steps]


# --- hand-made peers ---------------------------------------------------------------------------
def raw_peer(port: int, data: bytes, *, eof: bool = False, hold: float = 0.0,
             read_reply: float = 5.0) -> bytes:
    """Connect, send ``data`` (then half-close if ``eof``), stay ``hold`` seconds, and read what
    comes back until the standby closes (or ``read_reply`` seconds pass); then close."""
    reply = b""
    with socket.create_connection((HOST, port), timeout=5.0) as s:
        if data:
            s.sendall(data)
        if eof:
            s.shutdown(socket.SHUT_WR)
        if hold:
            time.sleep(hold)
        if read_reply:
            s.settimeout(read_reply)
            try:
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    reply += chunk
            except OSError:  # timeout or reset
                pass
    return reply


def rng_from_env(name: str) -> random.Random:
    """A seeded RNG; the seed is printed so a failing random schedule can be replayed with
    REPL_TEST_SEED=<seed>."""
    seed = int(os.environ.get("REPL_TEST_SEED", "0")) or random.randrange(1 << 30)
    print(f"{name}: REPL_TEST_SEED={seed}")
    return random.Random(seed)


# --- test hooks in children ----------------------------------------------------------------------
class env_added:
    """``with env_added(spawn, {"VAR": "value"}):`` children spawned inside get these variables
    too (a test hook such as DIRTYRING_TEST_PAUSE_IN_COMMIT); the spawner ends them as usual."""

    def __init__(self, spawner: Spawner, extra: dict[str, str]) -> None:
        self.spawner, self.extra, self.saved = spawner, extra, spawner.env

    def __enter__(self) -> None:
        self.saved = self.spawner.env
        self.spawner.env = {**self.saved, **self.extra}

    def __exit__(self, *exc: object) -> None:
        self.spawner.env = self.saved


def wait_file(path: str, timeout: float, proc: Proc | None = None) -> str:
    """The contents of ``path`` once it exists (a child's test hook writes it whole, by rename);
    a failed precondition after ``timeout`` s, or as soon as ``proc`` has exited."""
    end = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > end or (proc is not None and not proc.alive()):
            raise PreconditionFailed(f"{path} never appeared"
                                     + (": " + proc.describe() if proc is not None else ""))
        time.sleep(0.01)
    with open(path) as f:
        return f.read()


# --- waiting on the event itself, whatever the host's speed ------------------------------------
#: How long a test waits for something that takes well under a second on a quick idle host. The
#: host may be ten times slower and loaded by other work: a deadline is there to end a test that
#: would hang, never to measure speed (benchmarks do that).
PATIENCE = 60.0


def wait_for(cond: Callable[[], object], timeout: float = PATIENCE,
             every: float = 0.02) -> bool:
    """Poll ``cond`` until it holds (True) or ``timeout`` seconds pass (False)."""
    end = time.monotonic() + timeout
    while True:
        if cond():
            return True
        if time.monotonic() > end:
            return False
        time.sleep(every)


def wait_advancing(read: Callable[[], int], target: int, stall: float = PATIENCE,
                   every: float = 0.2, check: Callable[[], None] | None = None) -> int:
    """Poll the counter ``read()`` until it reaches ``target``, however long that takes, as long
    as it keeps moving: fail only if it does not advance for ``stall`` seconds (a wedge, not a
    slow host). ``check`` runs at every poll (to fail early on a bad event). Returns the last
    value read."""
    last = read()
    moved = time.monotonic()
    while last < target:
        if check is not None:
            check()
        time.sleep(every)
        now = read()
        if now > last:
            last, moved = now, time.monotonic()
        elif time.monotonic() - moved > stall:
            raise AssertionError(f"counter stuck at {last} for {stall:g} s (target {target})")
    return last


def thread_count(pid: int) -> int:
    """Threads of process ``pid`` now (its /proc/PID/task entries)."""
    return len(os.listdir(f"/proc/{pid}/task"))


def wait_threads(pid: int, at_most: int, timeout: float = PATIENCE) -> None:
    """Until process ``pid`` runs no more than ``at_most`` threads: e.g. a standby's connection
    thread has returned (and released what it held) after it reported that connection."""
    if not wait_for(lambda: thread_count(pid) <= at_most, timeout, every=0.005):
        raise AssertionError(f"process {pid} still runs {thread_count(pid)} threads "
                             f"(> {at_most}) after {timeout:g} s")


class SlowStranger:
    """A peer that connects and never finishes authenticating, for as long as it is open: it
    sends a frame header announcing a large body, then one byte of that body every ``every``
    seconds, so each of the standby's reads gets data well within its timeout and the frame
    (whose MAC would fail anyway) never completes. Unlike a silent peer, which the standby drops
    after a fixed wait, it stays unauthenticated however slow the host is. A context manager;
    :meth:`dropped` tells whether the standby has closed the connection."""

    def __init__(self, port: int, every: float = 0.2) -> None:
        from dirtyring.wire.codec import HEADER, MAGIC, WIRE_VERSION
        self.sock = socket.create_connection((HOST, port), timeout=5.0)
        self.sock.sendall(HEADER.pack(MAGIC, WIRE_VERSION, 1, 1 << 20, 0, 0))
        self.sock.settimeout(None)  # blocking, so a MSG_DONTWAIT read never waits (dropped())
        self.every = every
        self.stop = threading.Event()
        self.send_error: OSError | None = None
        self.thread = threading.Thread(target=self._trickle, daemon=True)
        self.thread.start()

    def _trickle(self) -> None:
        while not self.stop.wait(self.every):
            try:
                self.sock.sendall(b"\0")
            except OSError as e:
                self.send_error = e
                return

    def dropped(self) -> bool:
        """True if the standby closed this connection (EOF or reset seen, or a send failed)."""
        if self.send_error is not None:
            return True
        try:
            return self.sock.recv(1, socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        self.sock.close()

    def __enter__(self) -> SlowStranger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: Heartbeat timeout for a test that does not test heartbeat detection (a kill -9 shows as a
#: dropped connection at once). With two busy loops on this host's two cores, 0.5 s and even 2 s
#: of silence happened between live processes (a standby dropped a primary mid-sync, a verify
#: run failed over): a test that did not mean to test that failed. Pass as ``hb_timeout=``.
HB_CALM = "30s"
#: Heartbeat timeout for a test whose loss only the heartbeat can tell (SIGSTOP): short enough
#: to wait for, long enough not to trip on a loaded host before the stop.
HB_DETECT = "10s"
