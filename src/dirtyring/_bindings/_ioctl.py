"""One way to call an ioctl: through libc with ctypes, raising :class:`KvmError` on failure.

ctypes releases the GIL for the call, so a vCPU thread in KVM_RUN never blocks other threads;
the errno is read with ``use_errno`` (no exception is built for the common EINTR of KVM_RUN,
see :func:`ioctl_nocheck`).
"""
from __future__ import annotations

import ctypes as C
import ctypes.util

from ..errors import KvmError
from ._uapi import IOCTL_NAMES

_libc = C.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

_ioctl_ptr = _libc.ioctl
_ioctl_ptr.argtypes = [C.c_int, C.c_ulong, C.c_void_p]
_ioctl_ptr.restype = C.c_int

# A second function object, so the integer form has its own argtypes.
_ioctl_int = C.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).ioctl
_ioctl_int.argtypes = [C.c_int, C.c_ulong, C.c_ulong]
_ioctl_int.restype = C.c_int


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
    """Integer-argument ioctl returning (result, errno) without raising: the KVM_RUN fast path."""
    ret = _ioctl_int(fd, request, arg)
    return ret, (C.get_errno() if ret < 0 else 0)


def libc() -> C.CDLL:
    return _libc
