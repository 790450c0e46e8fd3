"""Which CLI module defines each command, and its one-line help: what ``dirtyring --help``
lists without importing the modules.

Why: a command imports only its own module (``main.build_parser(command=...)``), so
``dirtyring run --exec`` does not pay for importing replication, migration and snapshots
(~110 ms of a ~260 ms start here). The modules take their help lines from this table, so each
line is written once.
"""
from __future__ import annotations

#: Command -> (module in dirtyring.cli that adds it, help line), in the order ``--help`` lists.
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("run", "run a guest: a built-in one under dirty tracking with live figures, or "
                   "your program (--exec) like itself"),
    "doctor": ("doctor", "print this host's KVM facts and run the self-tests"),
    "protect": ("replication", "run a guest protected by a standby (Remus primary)"),
    "standby": ("replication", "hold a non-running replica and take over on failure"),
    "failover": ("replication", "tell a standby to take over now (manual failover)"),
    "demo": ("demo", "protected key-value VM + local standby, kill, failover, proof"),
    "snapshot": ("snapshot", "run a guest and write a full snapshot, then incremental ones"),
    "restore": ("snapshot", "start a guest from a snapshot (any of a chain) and run it"),
    "migrate": ("migration", "boot a guest and migrate it live to `dirtyring receive`"),
    "receive": ("migration", "wait for an incoming migration and run the guest"),
    "serve": ("serve", "a warm dirtyring: run commands for dirtyring-client without Python's "
                       "start-up"),
}


def command_help(name: str) -> str:
    """The help line of command ``name``."""
    return COMMANDS[name][1]
