"""Owners of host memory mappings: guest RAM (memfd) and the kernel-shared pages of a vCPU fd.

We call libc's mmap through ctypes rather than Python's ``mmap`` module because we need the raw
address for KVM_SET_USER_MEMORY_REGION and MAP_NORESERVE for sparse slots of many GiB, and a
numpy view over the same bytes without an exported-buffer lock that would block ``close``.
"""
from __future__ import annotations

import ctypes as C
import mmap as _mmap
import os

import numpy as np

from ..errors import DirtyringError
from ._ioctl import libc

_libc = libc()
_libc.mmap.restype = C.c_void_p
_libc.mmap.argtypes = [C.c_void_p, C.c_size_t, C.c_int, C.c_int, C.c_int, C.c_long]
_libc.munmap.argtypes = [C.c_void_p, C.c_size_t]
_libc.munmap.restype = C.c_int
_libc.madvise.argtypes = [C.c_void_p, C.c_size_t, C.c_int]
_libc.madvise.restype = C.c_int
_libc.mprotect.argtypes = [C.c_void_p, C.c_size_t, C.c_int]
_libc.mprotect.restype = C.c_int

MAP_FAILED = C.c_void_p(-1).value
MAP_NORESERVE = 0x4000
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class MappingError(DirtyringError):
    """mmap/munmap of guest memory or a kernel-shared page failed (the message names the call)."""


class Mapping:
    """A shared mapping of ``size`` bytes of ``fd`` at ``offset``; ``close()`` unmaps it."""

    def __init__(self, fd: int, size: int, *, offset: int = 0, prot: int | None = None,
                 noreserve: bool = False) -> None:
        if prot is None:
            prot = _mmap.PROT_READ | _mmap.PROT_WRITE
        flags = _mmap.MAP_SHARED | (MAP_NORESERVE if noreserve else 0)
        addr = _libc.mmap(None, size, prot, flags, fd, offset)
        if addr is None or addr == MAP_FAILED:
            err = C.get_errno()
            raise MappingError(f"mmap of {size} bytes at offset {offset:#x} failed: "
                               f"{os.strerror(err)}")
        self.addr: int = addr
        self.size = size
        self.fd = fd
        self._closed = False

    def array(self, dtype: type | np.dtype = np.uint8, offset: int = 0,
              count: int | None = None) -> np.ndarray:
        """A numpy view of the mapping; valid until ``close()`` (callers must not keep it past)."""
        itemsize = np.dtype(dtype).itemsize
        if count is None:
            count = (self.size - offset) // itemsize
        if offset + count * itemsize > self.size:
            raise ValueError("view past the end of the mapping")
        # SAFETY: [addr+offset, +count*itemsize) lies inside our live mapping (checked above).
        raw = (C.c_char * (count * itemsize)).from_address(self.addr + offset)
        return np.frombuffer(raw, dtype=dtype, count=count)

    def madvise(self, advice: int, offset: int = 0, length: int | None = None) -> None:
        length = self.size - offset if length is None else length
        if _libc.madvise(self.addr + offset, length, advice) != 0:
            raise MappingError(f"madvise failed: {os.strerror(C.get_errno())}")

    def mprotect(self, prot: int, offset: int = 0, length: int | None = None) -> None:
        length = self.size - offset if length is None else length
        if _libc.mprotect(self.addr + offset, length, prot) != 0:
            raise MappingError(f"mprotect failed: {os.strerror(C.get_errno())}")

    def close(self) -> None:
        if not self._closed:
            _libc.munmap(self.addr, self.size)
            self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed


def memfd(name: str, size: int) -> int:
    """A memfd of ``size`` bytes (sparse: costs nothing until touched), close-on-exec."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
    except OSError as e:
        os.close(fd)
        raise MappingError(f"cannot size guest memory to {size} bytes: {e.strerror}") from None
    return fd
