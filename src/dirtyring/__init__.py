"""dirtyring: run VMs on the real Linux KVM and checkpoint them through KVM's dirty ring.

The public API. A machine runs a built-in guest program, or an unmodified static Linux program
under the library OS (:class:`LinuxProgram`); a tracker tells which pages it
changed since the last harvest; on top of that sit replication (a primary and a standby),
snapshots, rollback and live migration. Importing this package is cheap and touches no device:
/dev/kvm is opened when a :class:`Machine` is built, and the native helpers are built (or
loaded) on first use.

Example::

    import dirtyring

    cfg = dirtyring.MachineConfig(guest="dirtier", tracker="ring", data_slots=(16 << 20,))
    with dirtyring.Machine(cfg) as m:          # boots the guest; its vCPU threads start
        drv = dirtyring.EpochDriver(m)
        for _ in range(10):
            e = drv.run_epoch(0.001)           # run 1 ms, pause, harvest (and re-arm)
            print(e.number, e.reason, len(e.dirty))

Every error raised on purpose derives from :class:`DirtyringError`.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers and the API reference read; at run time, see _LAZY
    from .errors import (CapabilityMissing, ConfigError, DirtyringError, GuestCrashed, GuestError,
                         KvmError, KvmUnavailable, LocalProtocolError, ProgramError, ProtocolError,
                         RemoteProtocolError, RingOverflow, SnapshotFormatError, TrackingError,
                         TruncatedStream)
    from .guests.protocol import GuestParams, Pattern
    from .linux.program import LinuxProgram
    from .linux.runner import ProgramResult, run_program
    from .machine.config import MachineConfig
    from .machine.epoch import Epoch, EpochDriver
    from .machine.fingerprint import fingerprint
    from .machine.vm import Machine
    from .migration.api import migrate, receive
    from .migration.source import Migration
    from .migration.types import MigrationError, MigrationOptions, MigrationReport
    from .replication.api import ProtectHandle, StandbyHandle, protect, standby
    from .replication.arbiter import Arbiter, ArbiterUnavailable
    from .replication.primary import Primary, PrimaryOptions
    from .replication.standby import Standby
    from .replication.transport import HandshakeRefused, LinkClosed
    from .snapshots.files import SnapshotInfo, SnapshotWriter, read_info, resolve_chain, restore
    from .snapshots.rollback import Rollback, RollbackPoint, RollbackStats
    from .tracking import BitmapTracker, DirtySet, HotSetTracker, RingTracker, Tracker

#: Public name -> the module that defines it. Each is imported on first use (PEP 562), so
#: ``import dirtyring`` (and every CLI command, which imports a submodule and so this package)
#: costs only what is used: ``dirtyring run --exec`` started ~110 ms sooner here without
#: importing replication, migration and snapshots.
_LAZY = {
    "CapabilityMissing": ".errors",
    "ConfigError": ".errors",
    "DirtyringError": ".errors",
    "GuestCrashed": ".errors",
    "GuestError": ".errors",
    "KvmError": ".errors",
    "KvmUnavailable": ".errors",
    "LocalProtocolError": ".errors",
    "ProgramError": ".errors",
    "ProtocolError": ".errors",
    "RemoteProtocolError": ".errors",
    "RingOverflow": ".errors",
    "SnapshotFormatError": ".errors",
    "TrackingError": ".errors",
    "TruncatedStream": ".errors",
    "GuestParams": ".guests.protocol",
    "Pattern": ".guests.protocol",
    "LinuxProgram": ".linux.program",
    "ProgramResult": ".linux.runner",
    "run_program": ".linux.runner",
    "MachineConfig": ".machine.config",
    "Epoch": ".machine.epoch",
    "EpochDriver": ".machine.epoch",
    "fingerprint": ".machine.fingerprint",
    "Machine": ".machine.vm",
    "migrate": ".migration.api",
    "receive": ".migration.api",
    "Migration": ".migration.source",
    "MigrationError": ".migration.types",
    "MigrationOptions": ".migration.types",
    "MigrationReport": ".migration.types",
    "ProtectHandle": ".replication.api",
    "StandbyHandle": ".replication.api",
    "protect": ".replication.api",
    "standby": ".replication.api",
    "Arbiter": ".replication.arbiter",
    "ArbiterUnavailable": ".replication.arbiter",
    "Primary": ".replication.primary",
    "PrimaryOptions": ".replication.primary",
    "Standby": ".replication.standby",
    "HandshakeRefused": ".replication.transport",
    "LinkClosed": ".replication.transport",
    "SnapshotInfo": ".snapshots.files",
    "SnapshotWriter": ".snapshots.files",
    "read_info": ".snapshots.files",
    "resolve_chain": ".snapshots.files",
    "restore": ".snapshots.files",
    "Rollback": ".snapshots.rollback",
    "RollbackPoint": ".snapshots.rollback",
    "RollbackStats": ".snapshots.rollback",
    "BitmapTracker": ".tracking",
    "DirtySet": ".tracking",
    "HotSetTracker": ".tracking",
    "RingTracker": ".tracking",
    "Tracker": ".tracking",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dirtyring' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    # the machine
    "Machine", "MachineConfig", "GuestParams", "Pattern", "fingerprint",
    # dirty tracking and epochs
    "Tracker", "RingTracker", "BitmapTracker", "HotSetTracker", "DirtySet",
    "EpochDriver", "Epoch",
    # Linux programs as guests
    "LinuxProgram", "run_program", "ProgramResult",
    # replication
    "protect", "standby", "ProtectHandle", "StandbyHandle",
    "Primary", "PrimaryOptions", "Standby", "Arbiter",
    # snapshots and rollback
    "SnapshotWriter", "SnapshotInfo", "restore", "read_info", "resolve_chain",
    "Rollback", "RollbackPoint", "RollbackStats",
    # live migration
    "migrate", "receive", "Migration", "MigrationOptions", "MigrationReport",
    # errors
    "DirtyringError", "KvmError", "KvmUnavailable", "CapabilityMissing", "ConfigError",
    "GuestError", "GuestCrashed", "TrackingError", "RingOverflow", "SnapshotFormatError",
    "ProtocolError", "LocalProtocolError", "RemoteProtocolError", "TruncatedStream", "LinkClosed",
    "HandshakeRefused", "ArbiterUnavailable", "MigrationError", "ProgramError",
]
