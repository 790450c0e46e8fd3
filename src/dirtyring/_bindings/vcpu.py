"""``VcpuFd``: a vCPU file descriptor, its kvm_run page and its dirty ring mapping.

KVM_RUN is called through :func:`ioctl_nocheck` so the hot path never builds an exception: an
interrupted run (signal or ``immediate_exit``) comes back as EINTR and is reported to the caller
as the exit reason KVM_EXIT_INTR.
"""
from __future__ import annotations

import ctypes as C
import errno
import mmap as _mmap
import os
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import KvmError
from . import _uapi as U
from ._ioctl import ioctl, ioctl_nocheck
from .mapping import PAGE_SIZE, Mapping

if TYPE_CHECKING:
    from .vm import VmFd

_Sync = TypeVar("_Sync", U.kvm_regs, U.kvm_sregs, U.kvm_vcpu_events)


class VcpuFd:
    """A vCPU made by :meth:`VmFd.create_vcpu`."""

    #: Set by code that writes regs/sregs/events into kvm_run's sync area and sets
    #: ``kvm_dirty_regs`` (a fast rollback): KVM loads them only on the next KVM_RUN, so until
    #: then the getters must return that copy and the setters must clear its dirty bit, or KVM
    #: would load it over theirs. ``kvm_dirty_regs`` itself says what is still pending.
    sync_written = False

    def __init__(self, fd: int, vm: VmFd, vcpu_id: int) -> None:
        self.fd = fd
        self.vm = vm
        self.id = vcpu_id
        size = vm.kvm.get_vcpu_mmap_size()
        self._run_map = Mapping(fd, size)
        # SAFETY: the kvm_run struct sits at offset 0 of a mapping of at least its size.
        self.run_struct = U.kvm_run.from_address(self._run_map.addr)
        #: kvm_run's sync area (regs/sregs/events, KVM_CAP_SYNC_REGS) matches the vCPU: set by
        #: whoever just ran KVM_RUN, cleared by any KVM_SET_REGS/SREGS/VCPU_EVENTS.
        self.sync_valid = False
        self.ring_map: Mapping | None = None
        if vm.dirty_ring_bytes:
            try:
                self.ring_map = Mapping(fd, vm.dirty_ring_bytes,
                                        offset=U.KVM_DIRTY_LOG_PAGE_OFFSET * PAGE_SIZE,
                                        prot=_mmap.PROT_READ | _mmap.PROT_WRITE)
            except BaseException:
                self._run_map.close()
                os.close(fd)
                self.fd = -1
                raise

    # --- running ------------------------------------------------------------------------------
    def run(self) -> int:
        """Wraps KVM_RUN; returns the exit reason (KVM_EXIT_INTR when interrupted by a signal)."""
        ret, err = ioctl_nocheck(self.fd, U.KVM_RUN)
        if ret < 0:
            if err == errno.EINTR:
                return U.KVM_EXIT_INTR
            raise KvmError("KVM_RUN", err)
        return int(self.run_struct.exit_reason)

    def io_data(self, offset: int, size: int) -> C.Array[C.c_char]:
        """The data bytes of a KVM_EXIT_IO, inside the kvm_run mapping."""
        # SAFETY: data_offset is set by KVM and points inside the vCPU mmap area.
        return (C.c_char * size).from_address(self._run_map.addr + offset)

    # --- state ----------------------------------------------------------------------------------
    # Regs/sregs/events written into the sync area with kvm_dirty_regs set (``sync_written``)
    # are what the vCPU will run with: the getters return that copy, the setters supersede it.
    def _pending_sync(self, typ: type[_Sync], field: str) -> _Sync:
        return typ.from_buffer_copy(getattr(self.run_struct.s.regs, field))

    def _drop_sync(self, bit: int) -> None:
        self.sync_valid = False
        if self.sync_written:
            rs = self.run_struct
            if rs.kvm_dirty_regs & bit:
                rs.kvm_dirty_regs &= ~bit

    def get_regs(self) -> U.kvm_regs:
        if self.sync_written and self.run_struct.kvm_dirty_regs & U.KVM_SYNC_X86_REGS:
            return self._pending_sync(U.kvm_regs, "regs")
        r = U.kvm_regs()
        ioctl(self.fd, U.KVM_GET_REGS, r)
        return r

    def set_regs(self, r: U.kvm_regs) -> None:
        self._drop_sync(U.KVM_SYNC_X86_REGS)
        ioctl(self.fd, U.KVM_SET_REGS, r)

    def get_sregs(self) -> U.kvm_sregs:
        if self.sync_written and self.run_struct.kvm_dirty_regs & U.KVM_SYNC_X86_SREGS:
            return self._pending_sync(U.kvm_sregs, "sregs")
        s = U.kvm_sregs()
        ioctl(self.fd, U.KVM_GET_SREGS, s)
        return s

    def set_sregs(self, s: U.kvm_sregs) -> None:
        self._drop_sync(U.KVM_SYNC_X86_SREGS)
        ioctl(self.fd, U.KVM_SET_SREGS, s)

    def get_fpu(self) -> U.kvm_fpu:
        f = U.kvm_fpu()
        ioctl(self.fd, U.KVM_GET_FPU, f)
        return f

    def set_fpu(self, f: U.kvm_fpu) -> None:
        ioctl(self.fd, U.KVM_SET_FPU, f)

    def get_xsave(self, into: U.kvm_xsave | None = None) -> U.kvm_xsave:
        """KVM_GET_XSAVE, into ``into`` if given (a buffer kept by a caller that reads it at
        every checkpoint)."""
        x = U.kvm_xsave() if into is None else into
        ioctl(self.fd, U.KVM_GET_XSAVE, x)
        return x

    def set_xsave(self, x: U.kvm_xsave) -> None:
        ioctl(self.fd, U.KVM_SET_XSAVE, x)

    def get_xcrs(self) -> U.kvm_xcrs:
        x = U.kvm_xcrs()
        ioctl(self.fd, U.KVM_GET_XCRS, x)
        return x

    def set_xcrs(self, x: U.kvm_xcrs) -> None:
        ioctl(self.fd, U.KVM_SET_XCRS, x)

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        """Wraps KVM_GET_MSRS; returns {index: value} for the MSRs KVM could read."""
        buf, entries = U.msrs_buffer(len(indices))
        for e, i in zip(entries, indices):
            e.index = i
        n = ioctl(self.fd, U.KVM_GET_MSRS, buf)
        return {entries[k].index: entries[k].data for k in range(n)}

    _tsc_buf: tuple[Any, Any] | None = None

    def get_tsc(self) -> int:
        """The guest's TSC (KVM_GET_MSRS of that one MSR) with a buffer kept for it: it is read
        at every checkpoint, and building the request each time cost half of the ~12 µs."""
        if ioctl(self.fd, U.KVM_GET_MSRS, self.tsc_request()) != 1:
            raise KvmError("KVM_GET_MSRS", errno.EINVAL, "the TSC MSR could not be read")
        return self.tsc_result()

    def tsc_request(self) -> Any:
        """The kept KVM_GET_MSRS argument ``get_tsc`` uses, for a caller that issues the ioctl
        itself (it must return 1); ``tsc_result()`` then reads the value."""
        if self._tsc_buf is None:
            self._tsc_buf = U.msrs_buffer(1)
            self._tsc_buf[1][0].index = U.MSR_IA32_TSC
        return self._tsc_buf[0]

    def tsc_result(self) -> int:
        assert self._tsc_buf is not None
        return int(self._tsc_buf[1][0].data)

    def tsc_result_address(self) -> int:
        """Where the kept request's answer (8 bytes, little-endian) lands."""
        self.tsc_request()
        assert self._tsc_buf is not None
        return C.addressof(self._tsc_buf[1][0]) + U.kvm_msr_entry.data.offset

    def set_msrs(self, values: dict[int, int]) -> int:
        """Wraps KVM_SET_MSRS; returns how many were set (KVM stops at the first it refuses)."""
        buf, entries = U.msrs_buffer(len(values))
        for e, (i, v) in zip(entries, values.items()):
            e.index, e.data = i, v
        n = ioctl(self.fd, U.KVM_SET_MSRS, buf)
        if n != len(values):
            bad = list(values)[n]
            raise KvmError("KVM_SET_MSRS", errno.EINVAL, f"MSR {bad:#x} refused")
        return n

    def get_lapic(self) -> U.kvm_lapic_state:
        s = U.kvm_lapic_state()
        ioctl(self.fd, U.KVM_GET_LAPIC, s)
        return s

    def set_lapic(self, s: U.kvm_lapic_state) -> None:
        ioctl(self.fd, U.KVM_SET_LAPIC, s)

    def get_vcpu_events(self) -> U.kvm_vcpu_events:
        if self.sync_written and self.run_struct.kvm_dirty_regs & U.KVM_SYNC_X86_EVENTS:
            return self._pending_sync(U.kvm_vcpu_events, "events")
        e = U.kvm_vcpu_events()
        ioctl(self.fd, U.KVM_GET_VCPU_EVENTS, e)
        return e

    def set_vcpu_events(self, e: U.kvm_vcpu_events) -> None:
        self._drop_sync(U.KVM_SYNC_X86_EVENTS)
        ioctl(self.fd, U.KVM_SET_VCPU_EVENTS, e)

    def get_mp_state(self) -> int:
        m = U.kvm_mp_state()
        ioctl(self.fd, U.KVM_GET_MP_STATE, m)
        return int(m.mp_state)

    def set_mp_state(self, state: int) -> None:
        ioctl(self.fd, U.KVM_SET_MP_STATE, U.kvm_mp_state(state))

    def set_signal_mask(self, blocked: set[int]) -> None:
        """Wraps KVM_SET_SIGNAL_MASK: the signal mask in force *while in KVM_RUN*.

        A thread can keep a signal blocked (so it stays pending instead of being consumed by a
        handler at the wrong moment) yet still have it interrupt the guest.
        """
        buf = (C.c_uint8 * (C.sizeof(U.kvm_signal_mask) + 8))()
        U.kvm_signal_mask.from_buffer(buf).len = 8
        mask = 0
        for sig in blocked:
            mask |= 1 << (int(sig) - 1)
        buf[4:12] = list(mask.to_bytes(8, "little"))
        ioctl(self.fd, U.KVM_SET_SIGNAL_MASK, buf)

    def set_cpuid2(self, cpuid_buf: C.Array[C.c_uint8]) -> None:
        ioctl(self.fd, U.KVM_SET_CPUID2, cpuid_buf)

    def tsc_offset(self) -> int | None:
        """The vCPU's TSC offset (guest TSC = host TSC + offset where KVM does not scale it),
        KVM_GET_DEVICE_ATTR of KVM_VCPU_TSC_OFFSET; None where KVM lacks that (before 5.16)."""
        value = C.c_int64()
        attr = U.kvm_device_attr(group=U.KVM_VCPU_TSC_CTRL, attr=U.KVM_VCPU_TSC_OFFSET,
                                 addr=C.addressof(value))
        try:
            ioctl(self.fd, U.KVM_GET_DEVICE_ATTR, attr)
        except KvmError as e:
            if e.errno in (errno.ENXIO, errno.EINVAL, errno.ENOTTY):
                return None
            raise
        return value.value

    def get_tsc_khz(self) -> int:
        return ioctl(self.fd, U.KVM_GET_TSC_KHZ)

    def close(self) -> None:
        if self.ring_map is not None:
            self.ring_map.close()
        self._run_map.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
