"""Scripting live migration: ``migrate`` moves a running machine to a receiver and returns
the report; ``receive`` serves the receiving side on a thread of this process (what
``dirtyring receive`` runs) and returns a handle whose machine runs the guest after the
switchover.

A receiver is a replication standby that never fails over by itself: the source's switchover
is its only way to go live (``auto_failover=False``), and its heartbeat timeout is long since
big epochs take a while to commit. Call both functions on the main thread: the source runs its
vCPU inline on that thread, and the receiver installs the vCPU kick handler.
"""
from __future__ import annotations

from typing import Any, Callable

from ..machine.vm import Machine
from ..replication.api import Address, StandbyHandle, _addr, standby
from .source import Migration
from .types import MigrationOptions, MigrationReport

Event = dict[str, Any]


def migrate(machine: Machine, to: Address, key: bytes = b"", *, insecure: bool = False,
            options: MigrationOptions = MigrationOptions(),
            on_event: Callable[[Event], None] | None = None) -> MigrationReport:
    """Live-migrate ``machine`` to the receiver at ``to``; returns once the target runs the
    guest. The source machine is then paused for good (close it yourself).

    Args:
        machine: built with ``Machine(config, threaded=False)`` on the main thread.
        to: the receiver's address (``"HOST:PORT"`` or a tuple).
        key: the shared key (``insecure=True``: none, trusted loopback only).
        options: downtime and bandwidth limits, timeout, throttling, ``verify``.
        on_event: called with every event (``round``, ``throttle``, ``stop_and_copy``, ``switched_over`` ...).

    Raises:
        MigrationError: the migration failed; ``source_may_run`` says whether the source may
            go on running (False once the switchover was requested).

    Example::

        cfg = dirtyring.MachineConfig(guest="dirtier", data_slots=(64 << 20,))
        with dirtyring.Machine(cfg, threaded=False) as m:
            rep = dirtyring.migrate(m, "10.0.0.2:7100", key,
                                    options=dirtyring.MigrationOptions(downtime_limit=0.05))
            print(rep.stop_reason, rep.total_s, rep.downtime_ms)
    """
    mig = Migration(machine, _addr(to), key, insecure=insecure, options=options,
                    on_event=on_event)
    try:
        return mig.run()
    finally:
        mig.close()


def receive(listen: Address, key: bytes = b"", *, insecure: bool = False,
            verify: bool = False, heartbeat_timeout: float = 10.0,
            sink: Callable[[str, Any], None] | None = None,
            on_event: Callable[[Event], None] | None = None) -> StandbyHandle:
    """Wait for an incoming migration on ``listen`` (port 0 picks a free one). The handle's
    ``machine`` runs the guest once its state is ``"failed_over"`` (the switchover happened).

    Args:
        listen: the address the source connects to.
        key: the shared key (``insecure=True``: none).
        verify: check the source's memory digest at the switchover.
        heartbeat_timeout: give up on a silent source after this long, seconds.
        sink: receives the guest's output once it runs here.
        on_event: also called with every event.

    Example::

        rx = dirtyring.receive("0.0.0.0:7100", key)
        if rx.wait_for("failover_done", 60.0):
            print("guest runs here:", rx.machine.progress())
        rx.close()
    """
    return standby(listen, key, insecure=insecure, verify=verify,
                   heartbeat_timeout=heartbeat_timeout, auto_failover=False, sink=sink,
                   on_event=on_event)
