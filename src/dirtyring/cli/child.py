"""A `dirtyring` command run as a child process whose ``--json`` event lines we follow: the
demo's primary and standby, the benchmarks' standbys and receivers, and the integration tests'
processes are all one of these."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

#: How long ``ChildProcess.stop`` waits for a child after SIGKILL, seconds.
STOP_WAIT_S = 120.0

Event = dict[str, Any]


def free_port() -> int:
    """A loopback port nobody listens on (bound to port 0, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(p: subprocess.Popen[Any], grace: float = 5.0) -> int:
    """End a child by its PID: SIGCONT (in case it was stopped) and SIGTERM, then SIGKILL if it
    is still there after ``grace`` seconds; idempotent. Returns its exit status (Popen's)."""
    if p.poll() is None:
        try:
            os.kill(p.pid, signal.SIGCONT)
            os.kill(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            # A killed VMM's KVM teardown took over 10 s on a loaded host: wait it out (it
            # cannot refuse SIGKILL), so the caller never leaves a process behind.
            p.wait(STOP_WAIT_S)
    return int(p.returncode)


class ChildProcess:
    """``python -m dirtyring ARGS --json`` in a child; reader threads collect its events (every
    one, stats included, in order, each stamped with its arrival ``_rx``), its other stdout
    lines and its stderr. It is ended by its PID (:meth:`stop`)."""

    def __init__(self, name: str, args: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.args = args if "--json" in args else [*args, "--json"]
        self.p = subprocess.Popen([sys.executable, "-m", "dirtyring.cli.main", *self.args],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  stdin=subprocess.DEVNULL, env=env, text=True)
        self.pid = self.p.pid
        self.events: list[Event] = []
        self.last_stats: Event = {}
        self.stdout_other: list[str] = []
        self.stderr: list[str] = []
        self.eof = False  # its stdout ended: no further event can come
        self.cv = threading.Condition()
        self._readers = [threading.Thread(target=self._read, daemon=True),
                         threading.Thread(target=self._read_err, daemon=True)]
        for t in self._readers:
            t.start()

    # --- reading ---------------------------------------------------------------------------
    def _read(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            try:
                e = json.loads(line)
            except ValueError:
                e = None
            if not isinstance(e, dict):
                self.stdout_other.append(line.rstrip())
                continue
            e["_rx"] = time.monotonic()
            with self.cv:
                self.events.append(e)
                if e.get("event") == "stats":
                    self.last_stats = e
                self.cv.notify_all()
        with self.cv:
            self.eof = True
            self.cv.notify_all()

    def _read_err(self) -> None:
        assert self.p.stderr is not None
        for line in self.p.stderr:
            self.stderr.append(line.rstrip())

    def of(self, kind: str) -> list[Event]:
        with self.cv:
            return [e for e in self.events if e.get("event") == kind]

    def kinds(self) -> list[str]:
        with self.cv:
            return [e.get("event", "?") for e in self.events if e.get("event") != "stats"]

    def mark(self) -> int:
        """Where the events seen so far end (a ``start`` for :meth:`wait_event`)."""
        with self.cv:
            return len(self.events)

    def wait_event(self, kind: str, timeout: float, pred: Callable[[Event], bool] | None = None,
                   start: int = 0) -> Event | None:
        """The first event ``kind`` (at index >= start, matching ``pred``), or None on timeout
        or when the process's output ended without it."""
        end = time.monotonic() + timeout
        with self.cv:
            while True:
                for e in self.events[start:]:
                    if e.get("event") == kind and (pred is None or pred(e)):
                        return e
                left = end - time.monotonic()
                if left <= 0 or self.eof:
                    return None
                self.cv.wait(min(left, 0.1))

    def describe(self) -> str:
        """For error messages: exit status, recent events, stderr tail."""
        return (f"{self.name} pid {self.pid} rc={self.p.poll()} events={self.kinds()[-25:]} "
                f"stderr={self.stderr[-8:]} other={self.stdout_other[-5:]}")

    # --- ending ----------------------------------------------------------------------------
    def alive(self) -> bool:
        return self.p.poll() is None

    def signal(self, sig: int) -> None:
        if self.p.poll() is None:
            os.kill(self.pid, sig)

    def kill9(self) -> None:
        if self.p.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
        self.p.wait(10)

    def wait_exit(self, timeout: float) -> int | None:
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL, by PID; idempotent. Also resumes a SIGSTOPped child."""
        stop_process(self.p)
        for t in self._readers:
            t.join(5)
        for f in (self.p.stdout, self.p.stderr):
            if f is not None:
                f.close()
