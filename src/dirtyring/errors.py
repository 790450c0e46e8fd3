"""Every error dirtyring raises derives from :class:`DirtyringError`.

Who raises what, and what the caller should do, is in each docstring. The CLI turns any
``DirtyringError`` into one line on stderr and a non-zero exit; anything else is a bug.
"""
from __future__ import annotations

import errno as _errno
import os


class DirtyringError(Exception):
    """Root of every error this package raises on purpose.

    Example::

        try:
            m = dirtyring.Machine(dirtyring.MachineConfig(vcpus=9))
        except dirtyring.DirtyringError as e:
            print(f"dirtyring: error: {e}")     # vcpus must be 1..4 ...
    """


class KvmError(DirtyringError, OSError):
    """An ioctl on a KVM file descriptor failed.

    Raised by the bindings layer. Carries the errno and the ioctl name so a message reads like
    ``KVM_ENABLE_CAP failed: EINVAL (Invalid argument)``.

    Example::

        try:
            m = dirtyring.Machine(cfg)
        except dirtyring.KvmError as e:
            print(e.ioctl, e.errno)              # e.g. KVM_CREATE_VM 12
    """

    def __init__(self, ioctl: str, err: int, hint: str = "") -> None:
        self.ioctl = ioctl
        name = _errno.errorcode.get(err, str(err))
        msg = f"{ioctl} failed: {name} ({os.strerror(err)})"
        if hint:
            msg += f": {hint}"
        OSError.__init__(self, err, msg)
        self.hint = hint

    def __str__(self) -> str:  # OSError's default prefixes "[Errno n]"
        return str(self.args[1])


class KvmUnavailable(DirtyringError):
    """/dev/kvm is missing or cannot be opened; the message says which and what to do.

    Example::

        try:
            m = dirtyring.Machine(dirtyring.MachineConfig())
        except dirtyring.KvmUnavailable as e:
            raise SystemExit(f"no usable KVM on this host: {e}")
    """


class CapabilityMissing(DirtyringError):
    """The host kernel lacks one or more KVM capabilities a feature needs (all are listed).

    Example::

        try:
            m = dirtyring.Machine(dirtyring.MachineConfig(tracker="ring"))
        except dirtyring.CapabilityMissing as e:
            print("missing:", e.missing)         # then try tracker="bitmap"
    """

    def __init__(self, missing: list[str], feature: str = "") -> None:
        self.missing = list(missing)
        what = f" for {feature}" if feature else ""
        super().__init__(f"host KVM lacks capabilities{what}: {', '.join(missing)}")


class GuestError(DirtyringError):
    """A guest program is missing, malformed, or did something the VMM cannot serve.

    Example::

        try:
            m.check()                            # raises if a vCPU crashed
        except dirtyring.GuestError as e:
            print("guest failed:", e)
    """


class GuestCrashed(GuestError):
    """The guest stopped unexpectedly (triple fault, internal error, failed entry).

    Example::

        try:
            m.check()
        except dirtyring.GuestCrashed as e:
            print("crashed:", e)
    """


class ProgramError(GuestError):
    """A Linux program given to run as a guest cannot be run as it is: not an ELF file, not
    x86-64, truncated, inconsistent program headers, or a kind not supported yet (the message
    names the program and says which). Also what a guest that broke the library OS's contract
    with the VMM ends in ("the guest broke its contract: ...").

    Example::

        try:
            dirtyring.LinuxProgram("/bin/ls")
        except dirtyring.ProgramError as e:
            print(e)      # /bin/ls: a dynamically linked program (it needs /lib64/ld-linux...
    """


class TrackingError(DirtyringError):
    """Dirty tracking cannot guarantee completeness (ring overflow, bad entry, reset interrupted).

    The caller must treat every page as dirty (full resync) rather than trust the last harvest.

    Example::

        try:
            dirty = m.tracker.harvest()
        except dirtyring.TrackingError:
            dirty = m.tracker.full()             # every page, re-armed: resync
    """


class RingOverflow(TrackingError):
    """The dirty ring lost entries (wrapped, or full with nothing to harvest): resync everything.

    Example::

        try:
            dirty = m.tracker.harvest()
        except dirtyring.RingOverflow:
            dirty = m.tracker.full()
    """


class SnapshotFormatError(DirtyringError):
    """A snapshot file or state blob is truncated, corrupted, of another version, or out of chain.

    Example::

        try:
            chain = dirtyring.resolve_chain("snaps/snap-0002.snap")
        except dirtyring.SnapshotFormatError as e:
            print("bad chain:", e)               # names the file and what is wrong
    """


class ProtocolError(DirtyringError):
    """Base of wire-protocol errors; not raised directly.

    Example::

        except dirtyring.ProtocolError as e:     # either kind: the connection is dead
            link.close()
    """


class LocalProtocolError(ProtocolError):
    """We tried to send something the protocol state does not allow (a bug on our side).

    Example::

        except dirtyring.LocalProtocolError as e:
            raise AssertionError(f"dirtyring bug: {e}")
    """


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that are malformed, unauthenticated or illegal in the current state.

    Example::

        except dirtyring.RemoteProtocolError as e:
            print("peer sent bad data:", e)      # e.g. a wrong key: the MAC does not match
    """


class TruncatedStream(RemoteProtocolError):
    """The peer's byte stream ended inside a frame: it stopped in the middle of a send (killed,
    crashed, or its link cut), which is a lost connection, not a malformed frame. The partial
    frame is discarded: it never touches committed state.

    Example::

        except dirtyring.TruncatedStream:
            ...                                  # the peer is gone: as after a plain EOF
    """


class ConfigError(DirtyringError):
    """A user-supplied setting is out of range or inconsistent; the message names the setting.

    Example::

        try:
            dirtyring.MachineConfig(tracker="magic")
        except dirtyring.ConfigError as e:
            print(e)                             # unknown tracker 'magic'; choose one of ...
    """


class LinkClosed(DirtyringError):
    """The peer closed the connection or the network failed; the message says how.

    Raised by ``replication.transport.Link`` (replication and migration both use it). A primary
    treats it as a lost standby; a standby as a lost primary (fail over or wait, by policy).

    Example::

        try:
            p = dirtyring.protect(m, "10.0.0.2:7000", key)
        except dirtyring.LinkClosed as e:
            print(e)                             # cannot connect to 10.0.0.2:7000: Connection refused
    """


class MigrationError(DirtyringError):
    """The migration failed. ``source_may_run`` says whether the source may go on running:
    False once the switchover was requested (the target may be running the guest).

    Raised by ``migration.source.Migration``; the CLI reports it and exits non-zero.

    Example::

        try:
            rep = dirtyring.migrate(m, "10.0.0.2:7100", key)
        except dirtyring.MigrationError as e:
            if not e.source_may_run:
                m.close()                # the target may run the guest: never resume this one
    """

    def __init__(self, message: str, *, source_may_run: bool = True) -> None:
        super().__init__(message)
        self.source_may_run = source_may_run


class NativeError(DirtyringError):
    """Base of what the C helpers (``machine/native.py``) raise; not raised directly."""


class NativeUnavailable(NativeError):
    """A native path was asked for on a host where the C helper could not be built (no gcc,
    or no writable cache directory). Callers that have a Python fallback check
    ``native.backend()`` first; seeing this error means one did not: a bug to report."""


class NativeCallFailed(NativeError, OSError):
    """A system call made by native code failed (a pause program's ioctl, or reading the vCPU's
    TSC offset). Carries the errno; the message names the call. The checkpoint in progress is
    void: the caller stops, as after any failed ioctl."""

    def __init__(self, err: int, message: str) -> None:
        OSError.__init__(self, err, message)

    def __str__(self) -> str:  # OSError's default prefixes "[Errno n]"
        return str(self.args[1])


class NativePageOutOfRange(NativeError, IndexError):
    """A page index handed to native code lies outside its memory slot (a gather or a pause
    program's gather). Nothing was copied. Trackers never report such pages: a bug."""


class NativeDataInvalid(NativeError, ValueError):
    """Data handed to native code is inconsistent (staged delta words outside their pages, or
    more of them than fit), or a pause program is changed out of shape. Nothing was applied."""
