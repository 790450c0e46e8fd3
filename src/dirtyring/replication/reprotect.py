"""Re-protection: after a failover, the guest this standby now runs gets a new standby.

A standby that took over is an unprotected primary. Re-protecting it is replication from here
on, with nothing new in it: tracking (stopped at the failover) is started again, and a
:class:`~dirtyring.replication.primary.Primary` syncs the whole of memory to the new standby while
the guest runs, then checkpoints it epoch by epoch, holding output until the new standby has
acknowledged it. Until the new standby answers, the guest runs on unprotected, as it did.
"""
from __future__ import annotations

import threading
from typing import Any, Callable

from ..errors import DirtyringError
from .arbiter import Arbiter
from .primary import EventSink, Primary, PrimaryOptions
from .standby import Standby
from .transport import connect

Release = Callable[[str, Any, int], None]


def reprotect(sb: Standby, new_standby: tuple[str, int], key: bytes, *, stop: threading.Event,
              insecure: bool = False, options: PrimaryOptions = PrimaryOptions(),
              on_event: EventSink, release: Release, retry_s: float = 1.0,
              arbiter: Arbiter | None = None) -> Primary | None:
    """Protect the guest ``sb`` took over with a standby at ``new_standby``; runs until ``stop``
    (or the guest stops) and returns the finished Primary, or None if it never connected.
    A refused or unreachable standby is retried every ``retry_s``. ``arbiter``: the group's key
    this standby took at its failover, kept by the new primary (the same tenure)."""
    m = sb.machine
    if m is None or sb.state != "failed_over" or m.tracker is None:
        raise DirtyringError("only a standby that took over runs a guest to protect")
    where = f"{new_standby[0]}:{new_standby[1]}"
    own_sink = m.sink  # output straight out: for as long as nobody protects it
    while not stop.is_set():
        if m.crashed or m.wait_stopped(0):
            return None
        try:
            sock = connect(new_standby)
        except DirtyringError as e:
            on_event({"event": "reprotect_waiting", "standby": where, "reason": str(e)})
            stop.wait(retry_s)
            continue
        m.pause_all()
        m.tracker.start()  # stopped at the failover; the initial sync re-arms every page
        m.resume_all()
        prim = Primary(m, new_standby, key, insecure=insecure, options=options,
                       on_event=on_event, release=release, arbiter=arbiter)
        try:
            prim.connect(sock)
        except DirtyringError as e:
            m.pause_all()
            m.tracker.stop()
            m.sink = own_sink
            m.resume_all()
            on_event({"event": "reprotect_waiting", "standby": where, "reason": str(e)})
            stop.wait(retry_s)
            continue
        on_event({"event": "reprotect_started", "standby": where})
        sb.reprotected_by = prim
        try:
            prim.run(stop=stop)
        finally:
            prim.close()
        return prim
    return None
