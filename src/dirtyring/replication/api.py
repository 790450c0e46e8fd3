"""Scripting replication: ``protect`` and ``standby`` do the wiring ``dirtyring protect``
and ``dirtyring standby`` do (transport, keys, threads, events) and return handles with
``status()``, ``events()`` and ``close()``.

Theory of operation
-------------------
A ``StandbyHandle`` serves a ``dirtyring.replication.standby.Standby`` on a thread
of this process: it listens, builds the replica VM when a primary connects, commits its
checkpoints and, on a failover, resumes the guest in this process (``handle.machine``).
``standby()`` must be called on the main thread (it installs the vCPU kick signal handler).

A ``ProtectHandle`` holds a ``dirtyring.replication.primary.Primary`` that is
connected to its standby (handshake done) but not running: the epoch loop runs on the calling
thread inside ``ProtectHandle.run``, because an inline machine (``threaded=False``, the
fast mode) runs its vCPU on that thread and ends epochs with a timer signal aimed at it. Call
``run`` from the main thread, once; it returns after ``seconds``, when ``stop`` is set, or as
soon as the primary is fenced (the standby took over).

Events are the same dictionaries the CLI prints with ``--json`` (see the guide's event
schema); both handles queue them, and ``events()`` drains the queue.
"""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from typing import Any, Callable

from ..errors import ConfigError
from ..machine.vm import Machine
from .arbiter import Arbiter
from .primary import Primary, PrimaryOptions
from .standby import Standby
from .transport import connect, parse_addr

Event = dict[str, Any]
Address = str | tuple[str, int]


def _addr(a: Address) -> tuple[str, int]:
    """``(host, port)`` from "HOST:PORT" or a tuple; port 0 (any free port) is allowed here."""
    if isinstance(a, str):
        host, sep, port = a.rpartition(":")
        if sep and port == "0":
            return host or "127.0.0.1", 0
        return parse_addr(a)
    return a[0], int(a[1])


class _Events:
    """A thread-safe queue of events, optionally passed on to a callback too."""

    def __init__(self, on_event: Callable[[Event], None] | None) -> None:
        self.q: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self.on_event = on_event
        self.seen: list[Event] = []
        self.lock = threading.Lock()

    def __call__(self, e: Event) -> None:
        with self.lock:
            self.seen.append(e)
        self.q.put(e)
        if self.on_event is not None:
            self.on_event(e)

    def drain(self, timeout: float | None) -> Iterator[Event]:
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                if end is None:
                    yield self.q.get_nowait()
                    continue
                left = end - time.monotonic()
                yield self.q.get(timeout=max(0.0, left)) if left > 0 else self.q.get_nowait()
            except queue.Empty:
                return

    def wait(self, kind: str, timeout: float) -> Event | None:
        end = time.monotonic() + timeout
        while True:
            with self.lock:
                for e in self.seen:
                    if e["event"] == kind:
                        return e
            if time.monotonic() >= end:
                return None
            time.sleep(0.01)


class StandbyHandle:
    """A standby served on a thread of this process (made by ``standby``).

    Example::

        sb = dirtyring.standby("127.0.0.1:0", key)
        print(sb.address)                 # ('127.0.0.1', 41234): give it to protect()
        ...
        sb.failover()                     # manual failover: the replica's guest runs here
        print(sb.status()["state"])       # 'failed_over'
        sb.close()
    """

    def __init__(self, sb: Standby, events: _Events) -> None:
        self.standby = sb
        self._events = events
        self._stop = threading.Event()
        self._thread = threading.Thread(target=sb.serve, args=(self._stop,), name="standby",
                                        daemon=True)
        self._thread.start()
        if events.wait("listening", 10.0) is None:
            self.close()
            raise ConfigError("the standby did not start listening within 10 s")
        listener = sb._listener
        host, port = sb.addr
        if listener is not None and port == 0:
            port = int(listener.getsockname()[1])
        #: Where primaries connect: ``(host, port)`` (the real port when 0 was asked).
        self.address: tuple[str, int] = (host, port)

    @property
    def machine(self) -> Machine | None:
        """The replica VM: built when a primary connects, running after a failover.

        Example::

            m = sb.machine
            if m is not None and sb.status()["state"] == "failed_over":
                print(m.progress())       # the guest goes on here
        """
        return self.standby.machine

    def status(self) -> dict[str, Any]:
        """The standby's status, as ``dirtyring failover --status`` prints it.

        Example::

            >>> sb.status()["state"]      # doctest: +SKIP
            'protected'
        """
        return self.standby.status()

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """The events since the last call (``timeout``: wait up to that long for more).

        Example::

            for e in sb.events():
                if e["event"] == "failover_done":
                    print("resumed in", e["resume_ms"], "ms")
        """
        return self._events.drain(timeout)

    def wait_for(self, event: str, timeout: float) -> Event | None:
        """The first event named ``event`` so far, waiting up to ``timeout`` s (None if none).

        Example::

            if sb.wait_for("protected", 10.0) is None:
                raise SystemExit("the standby never became consistent")
        """
        return self._events.wait(event, timeout)

    def failover(self, timeout: float = 5.0) -> bool:
        """Take over now (manual failover); True once the guest runs here.

        Example::

            assert sb.failover()
            assert sb.status()["state"] == "failed_over"
        """
        self.standby.request_failover()
        self.standby.failed_over.wait(timeout)
        return self.standby.state == "failed_over"

    def close(self) -> None:
        """Stop serving and close the replica VM (a guest that took over stops too).

        Example::

            sb.close()
        """
        self._stop.set()
        self._thread.join(10)
        self.standby.close()

    def __enter__(self) -> StandbyHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def standby(listen: Address, key: bytes = b"", *, insecure: bool = False,
            heartbeat_timeout: float = 1.0, heartbeat_interval: float = 0.1,
            verify: bool = False, auto_failover: bool = True,
            etcd: Arbiter | None = None,
            sink: Callable[[str, Any], None] | None = None,
            on_event: Callable[[Event], None] | None = None) -> StandbyHandle:
    """Serve a standby on ``listen`` (``"HOST:PORT"``; port 0 picks a free one) and return
    its handle. Call on the main thread.

    Args:
        listen: the address the primary connects to.
        key: the shared key (at least 16 bytes), the same on both sides.
        insecure: no key (trusted loopback only); ``key`` must then be empty.
        heartbeat_timeout: treat the primary as failed after this long without a frame.
        heartbeat_interval: how often to send heartbeats, seconds.
        verify: check the primary's memory digest at every commit.
        auto_failover: take over on connection loss or heartbeat timeout (else only
            ``StandbyHandle.failover`` does).
        etcd: an arbiter (``dirtyring.replication.arbiter.Arbiter``, role "standby"):
            every failover first takes the group's key.
        sink: receives the guest's output once it runs here (``(kind, payload)``).
        on_event: also called with every event (from the standby's threads).

    Example::

        import os, dirtyring
        key = os.urandom(32)
        with dirtyring.standby("127.0.0.1:0", key) as sb:
            print("standby on", sb.address)
    """
    if insecure and key:
        raise ConfigError("insecure replication takes no key")
    if not insecure and len(key) < 16:
        raise ConfigError("the shared key must be at least 16 bytes (or insecure=True)")
    ev = _Events(on_event)
    sb = Standby(_addr(listen), key, insecure=insecure, heartbeat_timeout=heartbeat_timeout,
                 heartbeat_interval=heartbeat_interval, verify=verify,
                 auto_failover=auto_failover, on_event=ev, sink=sink, etcd=etcd)
    return StandbyHandle(sb, ev)


class ProtectHandle:
    """A primary connected to its standby (made by ``protect``); ``run`` replicates.

    Example::

        m = dirtyring.Machine(dirtyring.MachineConfig(tracker="hotset"), threaded=False)
        p = dirtyring.protect(m, sb.address, key)
        p.run(2.0)                        # epochs on this thread for 2 s
        print(p.status()["state"], p.status()["acked"])
        p.close()
        m.close()
    """

    def __init__(self, primary: Primary, events: _Events) -> None:
        self.primary = primary
        self._events = events
        self._ran = False

    def run(self, seconds: float | None = None, *, stop: threading.Event | None = None) -> str:
        """Replicate on the calling (main) thread for ``seconds`` (None: until ``stop`` is set
        or the primary is fenced or loses its guest). Call once. Returns the primary's state:
        "stopping" after a planned end, "fenced" if the standby took over, "degraded" if it
        was lost (the guest then ran unprotected until the end).

        Example::

            state = p.run(1.0)
            assert state in ("stopping", "fenced", "degraded")
        """
        if self._ran:
            raise ConfigError("ProtectHandle.run() may be called once")
        self._ran = True
        self.primary.run(seconds, stop=stop)
        return self.primary.state

    def status(self) -> dict[str, Any]:
        """The primary's figures: state, epoch, acked epoch, pauses, output held, staging ...
        (the fields of the ``stats`` event).

        Example::

            s = p.status()
            print(s["state"], s["epoch"], s["acked"], s["output_held"])
        """
        return self.primary.snapshot()

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """The events since the last call (``timeout``: wait up to that long for more).

        Example::

            kinds = [e["event"] for e in p.events()]   # e.g. ['connected', 'protected', ...]
        """
        return self._events.drain(timeout)

    def close(self) -> None:
        """Stop replicating: wait for the staged checkpoints to be acknowledged, then say
        Goodbye (a planned stop, which the standby does not take for a crash). The machine
        stays open: close it yourself.

        Example::

            p.close()
            m.close()
        """
        self.primary.close()

    def __enter__(self) -> ProtectHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def protect(machine: Machine, standby: Address, key: bytes = b"", *,
            insecure: bool = False, options: PrimaryOptions = PrimaryOptions(),
            arbiter: Arbiter | None = None,
            release: Callable[[str, Any, int], None] | None = None,
            on_event: Callable[[Event], None] | None = None) -> ProtectHandle:
    """Connect ``machine`` to the standby at ``standby`` and shake hands; the returned
    handle's ``ProtectHandle.run`` then replicates. Guest output is held until its
    checkpoint is acknowledged and then passed to ``release(kind, payload, epoch)``.

    Args:
        machine: a tracked machine; ``Machine(config, threaded=False)`` (one vCPU run inline)
            is the fast mode, and with ``tracker="hotset"`` takes the native steady path.
        standby: the standby's address (``"HOST:PORT"`` or a tuple).
        key: the shared key; ``insecure=True`` runs without one (trusted loopback only).
        options: epoch interval, heartbeats, staging, ``unsafe_output``, ``verify``.
        arbiter: the group's key in etcd, already acquired (``Arbiter.acquire``).
        release: receives output once it may leave (default: dropped).
        on_event: also called with every event.

    Raises:
        LinkClosed: the standby cannot be reached.
        DirtyringError: the standby refused this primary (another one is connected, or
            the keys differ); the message says why.

    Example::

        cfg = dirtyring.MachineConfig(guest="dirtier", tracker="hotset")
        with dirtyring.Machine(cfg, threaded=False) as m:
            p = dirtyring.protect(m, "10.0.0.2:7000", key)
            p.run(10.0)
            p.close()
    """
    ev = _Events(on_event)
    sock = connect(_addr(standby))
    prim = Primary(machine, _addr(standby), key, insecure=insecure, options=options,
                   on_event=ev, release=release, arbiter=arbiter)
    try:
        prim.connect(sock)
    except BaseException:
        prim.close()
        raise
    return ProtectHandle(prim, ev)
