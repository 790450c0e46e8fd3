"""Every error dirtyring raises derives from :class:`DirtyringError`.

Who raises what, and what the caller should do, is in each docstring. The CLI turns any
``DirtyringError`` into one line on stderr and a non-zero exit; anything else is a bug.
"""
from __future__ import annotations

import errno as _errno
import os


class DirtyringError(Exception):
    """Root of every error this package raises on purpose."""


class KvmError(DirtyringError, OSError):
    """An ioctl on a KVM file descriptor failed.

    Raised by the bindings layer. Carries the errno and the ioctl name so a message reads like
    ``KVM_ENABLE_CAP failed: EINVAL (Invalid argument)``.
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
    """/dev/kvm is missing or cannot be opened; the message says which and what to do."""


class CapabilityMissing(DirtyringError):
    """The host kernel lacks one or more KVM capabilities a feature needs (all are listed)."""

    def __init__(self, missing: list[str], feature: str = "") -> None:
        self.missing = list(missing)
        what = f" for {feature}" if feature else ""
        super().__init__(f"host KVM lacks capabilities{what}: {', '.join(missing)}")


class GuestError(DirtyringError):
    """A guest program is missing, malformed, or did something the VMM cannot serve."""


class GuestCrashed(GuestError):
    """The guest stopped unexpectedly (triple fault, internal error, failed entry)."""


class ProgramError(GuestError):
    """A Linux program given to run as a guest cannot be run as it is: not an ELF file, not
    x86-64, truncated, inconsistent program headers, or a kind not supported yet (the message
    names the program and says which)."""


class TrackingError(DirtyringError):
    """Dirty tracking cannot guarantee completeness (ring overflow, bad entry, reset interrupted).

    The caller must treat every page as dirty (full resync) rather than trust the last harvest.
    """


class RingOverflow(TrackingError):
    """The dirty ring lost entries (wrapped, or full with nothing to harvest): resync everything."""


class SnapshotFormatError(DirtyringError):
    """A snapshot file or state blob is truncated, corrupted, of another version, or out of chain."""


class ProtocolError(DirtyringError):
    """Base of wire-protocol errors; not raised directly."""


class LocalProtocolError(ProtocolError):
    """We tried to send something the protocol state does not allow (a bug on our side)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that are malformed, unauthenticated or illegal in the current state."""


class ConfigError(DirtyringError):
    """A user-supplied setting is out of range or inconsistent; the message names the setting."""
