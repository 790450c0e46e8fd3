"""``Kvm``: the /dev/kvm file descriptor (system ioctls)."""
from __future__ import annotations

import ctypes as C
import errno
import os
from typing import TYPE_CHECKING

from ..errors import KvmError, KvmUnavailable
from . import _uapi as U
from ._ioctl import ioctl
from .caps import Cap

if TYPE_CHECKING:
    from .vm import VmFd


class Kvm:
    """An open /dev/kvm. Makes :class:`VmFd` objects; answers capability queries."""

    def __init__(self, path: str | None = None) -> None:
        # $DIRTYRING_KVM_DEVICE points the whole tool at another device node (tests use it to
        # show what a host without KVM gets).
        path = path or os.environ.get("DIRTYRING_KVM_DEVICE", "/dev/kvm")
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailable(f"{path} does not exist: this host has no KVM (load kvm "
                                 "modules, or run on a machine with virtualization)") from None
        except PermissionError:
            raise KvmUnavailable(f"no permission to open {path}: run as root or add your "
                                 "user to the 'kvm' group") from None
        except OSError as e:
            raise KvmUnavailable(f"cannot open {path}: {e.strerror}") from None
        self.path = path
        try:
            version = self.get_api_version()
        except KvmError as e:
            os.close(self.fd)
            raise KvmUnavailable(f"{path} is not a KVM device ({e})") from None
        if version != U.KVM_API_VERSION:
            os.close(self.fd)
            raise KvmUnavailable(f"{path} speaks KVM API {version}, expected {U.KVM_API_VERSION}")

    @classmethod
    def from_fd(cls, fd: int) -> Kvm:
        """Wrap an existing fd without checks (tests build one around a bad fd)."""
        obj = cls.__new__(cls)
        obj.fd = fd
        obj.path = "<fd>"
        return obj

    def get_api_version(self) -> int:
        """Wraps KVM_GET_API_VERSION."""
        return ioctl(self.fd, U.KVM_GET_API_VERSION)

    def check_extension_int(self, cap: Cap | int) -> int:
        """Wraps KVM_CHECK_EXTENSION; the raw integer (the ring's maximum size in bytes, say)."""
        return ioctl(self.fd, U.KVM_CHECK_EXTENSION, int(cap))

    def check_extension(self, cap: Cap | int) -> bool:
        return self.check_extension_int(cap) > 0

    def get_vcpu_mmap_size(self) -> int:
        """Wraps KVM_GET_VCPU_MMAP_SIZE: bytes of the kvm_run area to map from each vCPU fd."""
        return ioctl(self.fd, U.KVM_GET_VCPU_MMAP_SIZE)

    def get_supported_cpuid(self, max_entries: int = 256) -> C.Array[C.c_uint8]:
        """Wraps KVM_GET_SUPPORTED_CPUID; returns a kvm_cpuid2 buffer ready for KVM_SET_CPUID2."""
        buf, _ = U.cpuid_buffer(max_entries)
        ioctl(self.fd, U.KVM_GET_SUPPORTED_CPUID, buf)
        return buf

    def get_msr_index_list(self) -> list[int]:
        """Wraps KVM_GET_MSR_INDEX_LIST: the MSRs KVM saves and restores."""
        hdr = U.kvm_msr_list(0)
        try:
            ioctl(self.fd, U.KVM_GET_MSR_INDEX_LIST, hdr)
        except KvmError as e:
            if e.errno != errno.E2BIG:
                raise
        n = hdr.nmsrs
        buf = (C.c_uint32 * (n + 1))()
        buf[0] = n
        ioctl(self.fd, U.KVM_GET_MSR_INDEX_LIST, buf)
        return list(buf[1:n + 1])

    def create_vm(self) -> VmFd:
        """Wraps KVM_CREATE_VM. Retries EINTR a few times, as QEMU and Firecracker do
        (the kernel can return it while tearing down a previous VM's MMU notifier)."""
        from .vm import VmFd
        for attempt in range(5):
            try:
                return VmFd(ioctl(self.fd, U.KVM_CREATE_VM, 0), self)
            except KvmError as e:
                if e.errno != errno.EINTR or attempt == 4:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Kvm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
