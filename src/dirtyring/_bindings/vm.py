"""``VmFd``: a VM file descriptor (memory slots, dirty logging, vCPU creation).

Kernel facts that shape this class (Documentation/virt/kvm/api.rst):
- The dirty ring is a VM capability enabled with KVM_ENABLE_CAP, args[0] = ring size in bytes,
  after KVM_CREATE_VM and before any KVM_CREATE_VCPU, once only. Then KVM_GET_DIRTY_LOG and
  KVM_CLEAR_DIRTY_LOG fail on this VM (another VM may still use them).
- KVM_RESET_DIRTY_RINGS re-arms write protection for every entry userspace marked RESET in all
  vCPU rings and returns how many it reset. On Linux 6.17+ it returns early with EINTR when a
  signal is pending, leaving its last gathered batch unprotected: the caller must block signals
  around it (``tracking.ring`` does).
"""
from __future__ import annotations

import ctypes as C
import errno
import os
from typing import TYPE_CHECKING

import numpy as np

from ..errors import KvmError
from . import _uapi as U
from ._ioctl import ioctl
from .caps import Cap

if TYPE_CHECKING:
    from .system import Kvm
    from .vcpu import VcpuFd


#: VM descriptors ``close()`` left open for the process's exit to close (``defer_teardown``).
_DEFERRED: list[int] | None = None
#: At most this many: each holds a whole VM's kernel state until the process exits.
MAX_DEFERRED = 4


def defer_teardown() -> None:
    """From now on, leave the last VMs' descriptors open at ``close()`` (up to MAX_DEFERRED):
    the process's exit closes them. Closing a VM's descriptor is when KVM destroys it, which
    takes 3.5-6 ms here; a warm server's worker (``cli/server.py``) that ends right after its
    command reports the command's status first, and lets its exit pay for that."""
    global _DEFERRED
    if _DEFERRED is None:
        _DEFERRED = []


class VmFd:
    """A VM made by :meth:`Kvm.create_vm`."""

    def __init__(self, fd: int, kvm: Kvm) -> None:
        self.fd = fd
        self.kvm = kvm
        self.dirty_ring_bytes = 0
        self.manual_protect = False
        # (slot, id(bitmap)) -> (bitmap, its request): trackers GET into the same bitmaps at
        # every harvest, and building the request (with the array's address) cost as much
        # as the ioctl.
        self._logs: dict[tuple[int, int], tuple[np.ndarray, U.kvm_dirty_log]] = {}

    def check_extension_int(self, cap: Cap | int) -> int:
        """Wraps KVM_CHECK_EXTENSION on the VM fd (per-VM answers, e.g. NR_VCPUS)."""
        return ioctl(self.fd, U.KVM_CHECK_EXTENSION, int(cap))

    def set_user_memory_region(self, slot: int, guest_phys_addr: int, memory_size: int,
                               userspace_addr: int, flags: int = 0) -> None:
        """Wraps KVM_SET_USER_MEMORY_REGION (memory_size 0 deletes the slot)."""
        r = U.kvm_userspace_memory_region(slot, flags, guest_phys_addr, memory_size,
                                          userspace_addr)
        ioctl(self.fd, U.KVM_SET_USER_MEMORY_REGION, r)

    def enable_cap(self, cap: Cap | int, *args: int, flags: int = 0) -> None:
        """Wraps KVM_ENABLE_CAP."""
        ec = U.kvm_enable_cap()
        ec.cap = int(cap)
        ec.flags = flags
        for i, a in enumerate(args):
            ec.args[i] = a
        ioctl(self.fd, U.KVM_ENABLE_CAP, ec)

    def enable_dirty_log_ring(self, size_bytes: int) -> None:
        """KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING, size in bytes). Requires: Cap.DIRTY_LOG_RING.

        Must precede every KVM_CREATE_VCPU (EINVAL otherwise); E2BIG above the host maximum.
        The kernel reads the size as a u32, so larger values are refused here rather than
        silently truncated.
        """
        if not 0 < size_bytes < 1 << 32:
            raise KvmError("KVM_ENABLE_CAP", errno.EINVAL,
                           f"dirty ring size {size_bytes} bytes does not fit the kernel's u32")
        self.enable_cap(Cap.DIRTY_LOG_RING, size_bytes)
        self.dirty_ring_bytes = size_bytes

    def enable_manual_dirty_log_protect(self) -> None:
        """KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 with MANUAL_PROTECT_ENABLE (never INITIALLY_SET).

        After this, KVM_GET_DIRTY_LOG no longer clears; KVM_CLEAR_DIRTY_LOG re-arms pages.
        """
        self.enable_cap(Cap.MANUAL_DIRTY_LOG_PROTECT2, U.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
        self.manual_protect = True

    def get_dirty_log(self, slot: int, bitmap: np.ndarray) -> None:
        """Wraps KVM_GET_DIRTY_LOG into ``bitmap`` (uint64, one bit per page, 64-bit aligned).

        Without manual protect this also clears the log and re-protects the pages, atomically.
        """
        ioctl(self.fd, U.KVM_GET_DIRTY_LOG, self.dirty_log_request(slot, bitmap))

    def dirty_log_request(self, slot: int, bitmap: np.ndarray) -> U.kvm_dirty_log:
        """The (kept) KVM_GET_DIRTY_LOG argument for ``slot`` into ``bitmap``."""
        kept = self._logs.get((slot, id(bitmap)))
        if kept is None or kept[0] is not bitmap:
            assert bitmap.flags.c_contiguous and bitmap.dtype == np.uint64
            if len(self._logs) > 64:
                self._logs.clear()
            kept = self._logs[(slot, id(bitmap))] = (
                bitmap, U.kvm_dirty_log(slot, 0, bitmap.ctypes.data))
        return kept[1]

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int,
                        bitmap: np.ndarray) -> None:
        """Wraps KVM_CLEAR_DIRTY_LOG: re-arms the pages whose bits are set in ``bitmap``.

        first_page and num_pages must be multiples of 64 except at the slot's end.
        """
        assert bitmap.flags.c_contiguous and bitmap.dtype == np.uint64
        c = U.kvm_clear_dirty_log(slot, num_pages, first_page, bitmap.ctypes.data)
        ioctl(self.fd, U.KVM_CLEAR_DIRTY_LOG, c)

    def reset_dirty_rings(self) -> int:
        """Wraps KVM_RESET_DIRTY_RINGS; returns the number of entries reset. Re-arms protection.

        Call with signals blocked (see the module docstring).
        """
        return ioctl(self.fd, U.KVM_RESET_DIRTY_RINGS)

    def set_tss_addr(self, addr: int) -> None:
        """Wraps KVM_SET_TSS_ADDR (passed as an unsigned long: 0xfffbd000 overflows a C int)."""
        ioctl(self.fd, U.KVM_SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        """Wraps KVM_SET_IDENTITY_MAP_ADDR."""
        ioctl(self.fd, U.KVM_SET_IDENTITY_MAP_ADDR, C.c_uint64(addr))

    def create_irqchip(self) -> None:
        """Wraps KVM_CREATE_IRQCHIP (in-kernel PIC, IOAPIC and LAPICs)."""
        ioctl(self.fd, U.KVM_CREATE_IRQCHIP)

    def get_stats_fd(self) -> int:
        """Wraps KVM_GET_STATS_FD (binary stats; debugfs is not readable on our hosts)."""
        return ioctl(self.fd, U.KVM_GET_STATS_FD)

    def create_vcpu(self, vcpu_id: int) -> VcpuFd:
        """Wraps KVM_CREATE_VCPU; maps kvm_run and, if enabled, the vCPU's dirty ring."""
        from .vcpu import VcpuFd
        fd = ioctl(self.fd, U.KVM_CREATE_VCPU, vcpu_id)
        return VcpuFd(fd, self, vcpu_id)

    def close(self) -> None:
        if self.fd >= 0:
            if _DEFERRED is not None and len(_DEFERRED) < MAX_DEFERRED:
                _DEFERRED.append(self.fd)  # closed by the process's exit
            else:
                os.close(self.fd)
            self.fd = -1
