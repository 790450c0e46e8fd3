"""One way to call an ioctl: through libc with ctypes, raising :class:`KvmError` on failure.

Only KVM_RUN (:func:`ioctl_nocheck`) releases the GIL, so a vCPU thread in the guest never
blocks other threads. Every other KVM ioctl returns within microseconds and keeps the GIL
(``ctypes.PyDLL``): a checkpoint pause makes several of them, and releasing the GIL for each one
let a busy sender thread take it and hold it for a whole switch interval before the pause could
go on (measured here: a 64-page hot-set checkpoint pause went from ~110 µs alone to ~270 µs
p50 with the sender running). The errno is read with ``use_errno`` (no exception is built for
the common EINTR of KVM_RUN).
"""
from __future__ import annotations

import ctypes as C
import ctypes.util

from ..errors import KvmError
from ._uapi import IOCTL_NAMES

_LIBC = ctypes.util.find_library("c") or "libc.so.6"
_libc = C.CDLL(_LIBC, use_errno=True)

# Short ioctls: the GIL stays held (PyDLL). One function object per argument form.
_ioctl_ptr = C.PyDLL(_LIBC, use_errno=True).ioctl
_ioctl_ptr.argtypes = [C.c_int, C.c_ulong, C.c_void_p]
_ioctl_ptr.restype = C.c_int
_ioctl_int = C.PyDLL(_LIBC, use_errno=True).ioctl
_ioctl_int.argtypes = [C.c_int, C.c_ulong, C.c_ulong]
_ioctl_int.restype = C.c_int

# KVM_RUN: the GIL is released while the guest runs.
_ioctl_run = C.CDLL(_LIBC, use_errno=True).ioctl
_ioctl_run.argtypes = [C.c_int, C.c_ulong, C.c_ulong]
_ioctl_run.restype = C.c_int


def ioctl_name(request: int) -> str:
    return IOCTL_NAMES.get(request, f"ioctl {request:#x}")


def ioctl(fd: int, request: int, arg: object = None, *, name: str | None = None) -> int:
    """Call ``ioctl(fd, request, arg)``; ``arg`` is None, an int, or a ctypes object (by pointer).

    Returns the ioctl's non-negative result. Raises KvmError(errno, ioctl name) on failure.
    """
    if arg is None or isinstance(arg, int):
        ret = _ioctl_int(fd, request, arg or 0)
    else:
        ret = _ioctl_ptr(fd, request, C.addressof(arg))  # type: ignore[arg-type]
    if ret < 0:
        raise KvmError(name or ioctl_name(request), C.get_errno())
    return ret


def ioctl_nocheck(fd: int, request: int, arg: int = 0) -> tuple[int, int]:
    """Integer-argument ioctl returning (result, errno) without raising, with the GIL released:
    the KVM_RUN fast path."""
    ret = _ioctl_run(fd, request, arg)
    return ret, (C.get_errno() if ret < 0 else 0)


def libc() -> C.CDLL:
    return _libc
