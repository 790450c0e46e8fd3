"""Network namespaces for partition tests (not collected: no ``test_`` prefix).

A :class:`Lab` builds a small private network out of namespaces the test creates, named
``dr-<pid>-<n><role>`` so two tests (or two pytest processes) never share one, with addresses
(``10.200.x.y``) that exist only inside them, and deletes every namespace when it is closed,
however the test ended. Links are cut with ``ip link set DEV down`` (netem is not available on
this host: ``platform.md``, "Networks for tests").

Code runs inside a namespace in two ways, neither of which moves the test process itself:

- :meth:`Lab.call` runs a function on a fresh thread that entered the namespace with setns(2)
  (it changes only the calling thread). Sockets that thread opens live in the namespace, and so
  do threads and child processes it starts: a child's PID is its own (no ``ip netns exec``
  wrapper in between), so it is ended by that PID as usual.
- :meth:`Lab.exec_args` gives ``ip netns exec NS ...`` for a command line (``ip`` execs, so the
  PID is the command's own as well).
"""
from __future__ import annotations

import ctypes
import itertools
import os
import subprocess
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_counter = itertools.count(1)
_counter_lock = threading.Lock()


def ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip [-n NS] ARGS``; a failure raises with ip's own message."""
    cmd = ["ip", *(["-n", ns] if ns else []), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip() or r.returncode}")
    return r


def enter(ns: str) -> None:
    """Move the calling thread (only it) into network namespace ``ns``."""
    fd = os.open(f"/var/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({ns}): {os.strerror(err)}")
    finally:
        os.close(fd)


def call_in(ns: str, fn: Callable[[], T], timeout: float = 120.0) -> T:
    """``fn()`` on a new thread inside ``ns``; its result, or its exception re-raised here."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            enter(ns)
            box["ok"] = fn()
        except BaseException as e:  # noqa: BLE001  (handed to the caller)
            box["err"] = e

    t = threading.Thread(target=run, name=f"in-{ns}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"call in namespace {ns} still running after {timeout:g} s")
    if "err" in box:
        raise box["err"]
    out: T = box["ok"]
    return out


class Lab:
    """Namespaces joined by links the test can cut.

    ``nodes``: role letters. Every node gets a ``ctl`` link to a hub namespace holding a bridge
    (the control network, 10.200.0.0/24: node k's first address is 10.200.0.<k+1>); ``extra``
    adds more addresses on a node's ``ctl`` (e.g. three etcd members on one node). ``pairs``:
    direct veth links between two nodes (named ``to<other>`` on each side, one /24 each from
    10.200.1.0 on). Loopback is up in every namespace."""

    def __init__(self, nodes: str, *, pairs: tuple[tuple[str, str], ...] = (),
                 extra: dict[str, list[str]] | None = None) -> None:
        with _counter_lock:
            n = next(_counter)
        self.prefix = f"dr-{os.getpid()}-{n}"
        self.made: list[str] = []
        self.addr: dict[str, list[str]] = {}  # role -> control addresses
        self.pair_addr: dict[tuple[str, str], str] = {}  # (node, peer) -> node's address
        try:
            self._build(nodes, pairs, extra or {})
        except BaseException:
            self.close()
            raise

    def ns(self, role: str) -> str:
        return f"{self.prefix}{role}"

    def _add_ns(self, name: str) -> None:
        ip("netns", "add", name)
        self.made.append(name)
        ip("link", "set", "lo", "up", ns=name)

    def _build(self, nodes: str, pairs: tuple[tuple[str, str], ...],
               extra: dict[str, list[str]]) -> None:
        hub = self.ns("hub")
        self._add_ns(hub)
        ip("link", "add", "br0", "type", "bridge", ns=hub)
        ip("link", "set", "br0", "up", ns=hub)
        for k, role in enumerate(nodes):
            name = self.ns(role)
            self._add_ns(name)
            # Both ends are made inside namespaces: nothing appears in the host's namespace.
            ip("link", "add", "ctl", "netns", name, "type", "veth", "peer", "name",
               f"n{role}", "netns", hub)
            ip("link", "set", f"n{role}", "master", "br0", ns=hub)
            ip("link", "set", f"n{role}", "up", ns=hub)
            addrs = [f"10.200.0.{k + 1}", *extra.get(role, [])]
            for a in addrs:
                ip("addr", "add", f"{a}/24", "dev", "ctl", ns=name)
            ip("link", "set", "ctl", "up", ns=name)
            self.addr[role] = addrs
        for j, (a, b) in enumerate(pairs):
            ip("link", "add", f"to{b}", "netns", self.ns(a), "type", "veth", "peer", "name",
               f"to{a}", "netns", self.ns(b))
            for side, other, host in ((a, b, 1), (b, a, 2)):
                address = f"10.200.{j + 1}.{host}"
                ip("addr", "add", f"{address}/24", "dev", f"to{other}", ns=self.ns(side))
                ip("link", "set", f"to{other}", "up", ns=self.ns(side))
                self.pair_addr[(side, other)] = address

    # --- cutting -----------------------------------------------------------------------------
    def set_link(self, role: str, dev: str, up: bool) -> None:
        """``ip link set DEV up|down`` in ``role``'s namespace (down cuts the link)."""
        ip("link", "set", dev, "up" if up else "down", ns=self.ns(role))

    def cut(self, role: str, *devs: str) -> None:
        for d in devs:
            self.set_link(role, d, False)

    def heal(self, role: str, *devs: str) -> None:
        for d in devs:
            self.set_link(role, d, True)

    def link_up(self, role: str, dev: str) -> bool:
        r = ip("-o", "link", "show", dev, ns=self.ns(role))
        return "state UP" in r.stdout or ",UP" in r.stdout.split(">")[0]

    # --- running inside ----------------------------------------------------------------------
    def call(self, role: str, fn: Callable[[], T], timeout: float = 120.0) -> T:
        """``fn()`` on a thread inside ``role``'s namespace (see the module's notes)."""
        return call_in(self.ns(role), fn, timeout)

    def exec_args(self, role: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns(role), *argv]

    def pids_inside(self) -> list[int]:
        """PIDs of processes still in one of our namespaces (``ip netns pids``)."""
        out: list[int] = []
        for name in self.made:
            r = ip("netns", "pids", name, check=False)
            out += [int(p) for p in r.stdout.split()]
        return out

    def close(self) -> None:
        """Delete every namespace made (its veths and bridge go with it). Processes must have
        been ended by their owners first: one still inside keeps its namespace's network alive
        after the name is gone, so they are reported (never killed here: they are not ours to
        pick by namespace)."""
        left = self.pids_inside()
        errors = []
        for name in reversed(self.made):
            r = ip("netns", "del", name, check=False)
            if r.returncode != 0:
                errors.append(f"{name}: {r.stderr.strip()}")
        self.made = []
        if errors or left:
            raise RuntimeError(f"namespace teardown: {errors} processes still inside: {left}")

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
