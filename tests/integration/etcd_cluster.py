"""etcd members started by a test (not collected: no ``test_`` prefix).

Debian's ``etcd-server`` (3.4, ``/usr/bin/etcd``; ``tools/install-test-deps`` installs it).
Each member is a child process with its own data directory (in /dev/shm when it exists: fsync
on a loaded disk only slows the tests), on addresses and ports the test chooses, optionally
inside a network namespace (entered by setns on a helper thread before the fork, so the PID
is etcd's own). Members are ended by their PIDs, one at a time (:meth:`Cluster.kill`) or all
at the end (:meth:`Cluster.close`). Requests go to the JSON gateway (``/v3/``), the same path
the product's client (etcd3gw) uses.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from netns import call_in

ETCD = shutil.which("etcd") or "/usr/bin/etcd"


@dataclass
class Member:
    name: str
    host: str
    client_port: int
    peer_port: int
    data_dir: str = ""
    log_path: str = ""
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    killed: bool = False  # ended on purpose by the test (:meth:`Cluster.kill`)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 15) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""


class Cluster:
    """``members`` as (host, client port, peer port); ``netns``: the namespace they run in
    (None: this one). Started at once; :meth:`wait_ready` waits until all agree on a leader."""

    def __init__(self, members: list[tuple[str, int, int]], netns: str | None = None, *,
                 heartbeat_ms: int = 250, election_ms: int = 2500) -> None:
        """Raft timing: etcd's defaults (100 / 1000 ms) make a loaded host hold elections
        without any failure; these are slower to notice a dead leader, never less safe."""
        self.netns = netns
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.root = tempfile.mkdtemp(prefix="dr-etcd-", dir=base)
        self.members = [Member(f"m{i}", h, c, p) for i, (h, c, p) in enumerate(members)]
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        try:
            for m in self.members:
                m.data_dir = os.path.join(self.root, m.name)
                m.log_path = os.path.join(self.root, f"{m.name}.log")
                args = [ETCD, "--name", m.name, "--data-dir", m.data_dir,
                        "--listen-client-urls", m.url, "--advertise-client-urls", m.url,
                        "--listen-peer-urls", m.peer_url,
                        "--initial-advertise-peer-urls", m.peer_url,
                        "--initial-cluster", initial, "--initial-cluster-state", "new",
                        "--initial-cluster-token", os.path.basename(self.root),
                        "--heartbeat-interval", str(heartbeat_ms),
                        "--election-timeout", str(election_ms)]
                m.proc = self._spawn(args, m.log_path)
        except BaseException:
            self.close()
            raise

    def _spawn(self, args: list[str], log_path: str) -> subprocess.Popen[bytes]:
        def start() -> subprocess.Popen[bytes]:
            with open(log_path, "wb") as log:
                return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT)
        return call_in(self.netns, start) if self.netns else start()

    @property
    def endpoints(self) -> str:
        """For ``--etcd``: every member's client URL."""
        return ",".join(m.url for m in self.members)

    # --- requests ----------------------------------------------------------------------------
    def request(self, m: Member, path: str, body: dict[str, Any] | None = None,
                timeout: float = 2.0) -> dict[str, Any]:
        """POST ``/v3/PATH`` to member ``m`` (from inside its namespace)."""
        def go() -> dict[str, Any]:
            req = urllib.request.Request(f"{m.url}/v3/{path.lstrip('/')}",
                                         data=json.dumps(body or {}).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=timeout) as r:
                out: dict[str, Any] = json.loads(r.read())
                return out
        return call_in(self.netns, go, timeout + 5) if self.netns else go()

    def status(self, m: Member) -> dict[str, Any] | None:
        """``maintenance/status`` of ``m`` (member_id, leader...), or None if it does not
        answer."""
        try:
            return self.request(m, "maintenance/status")
        except (OSError, ValueError, urllib.error.URLError):
            return None

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until every living member answers and all name the same leader, one of them (after a
        leader was killed, the others go on naming it for a while)."""
        end = time.monotonic() + timeout
        last: list[Any] = []
        while time.monotonic() < end:
            for m in self.members:
                if m.proc is not None and not m.alive() and not m.killed:
                    raise RuntimeError(f"etcd {m.name} exited {m.proc.returncode}:\n"
                                       + m.log_tail())
            last = [self.status(m) for m in self.members if m.alive()]
            leaders = {int(s.get("leader", 0)) for s in last if s}
            living = {int(s["header"]["member_id"]) for s in last if s}
            if last and all(last) and len(leaders) == 1 and leaders <= living:
                return
            time.sleep(0.1)
        raise RuntimeError(f"etcd not ready after {timeout:g} s: {last}\n"
                           + "\n".join(m.log_tail(5) for m in self.members))

    def leader(self) -> Member:
        """The member the living ones name as leader."""
        ids: dict[int, Member] = {}
        lead = 0
        for m in self.members:
            if not m.alive():
                continue
            s = self.status(m)
            if s:
                ids[int(s["header"]["member_id"])] = m
                lead = lead or int(s.get("leader", 0))
        if lead not in ids:
            raise RuntimeError(f"no leader among the living members ({lead}, {list(ids)})")
        return ids[lead]

    # --- ending ------------------------------------------------------------------------------
    def kill(self, m: Member) -> None:
        """SIGKILL member ``m`` by its PID and reap it."""
        m.killed = True
        if m.proc is not None and m.proc.poll() is None:
            os.kill(m.pid, signal.SIGKILL)
            m.proc.wait(10)

    def close(self) -> None:
        """End every member by PID (SIGTERM, then SIGKILL) and remove the data directories."""
        for m in self.members:
            if m.proc is not None and m.proc.poll() is None:
                os.kill(m.pid, signal.SIGTERM)
        for m in self.members:
            if m.proc is not None:
                try:
                    m.proc.wait(5)
                except subprocess.TimeoutExpired:
                    os.kill(m.pid, signal.SIGKILL)
                    m.proc.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
