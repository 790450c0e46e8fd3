"""Layer 0: thin bindings over the KVM ioctl ABI; one class per file-descriptor kind."""
from __future__ import annotations

from .caps import REQUIRED, Cap
from .mapping import PAGE_SIZE, Mapping, MappingError, memfd
from .system import Kvm
from .vcpu import VcpuFd
from .vm import VmFd

__all__ = ["Cap", "REQUIRED", "Kvm", "VmFd", "VcpuFd", "Mapping", "MappingError", "memfd",
           "PAGE_SIZE"]
