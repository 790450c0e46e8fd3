"""KVM capabilities as an enum, and the capabilities each dirtyring feature needs."""
from __future__ import annotations

import enum

from . import _uapi as U


class Cap(enum.IntEnum):
    IRQCHIP = U.KVM_CAP_IRQCHIP
    USER_MEMORY = U.KVM_CAP_USER_MEMORY
    SET_TSS_ADDR = U.KVM_CAP_SET_TSS_ADDR
    EXT_CPUID = U.KVM_CAP_EXT_CPUID
    NR_VCPUS = U.KVM_CAP_NR_VCPUS
    NR_MEMSLOTS = U.KVM_CAP_NR_MEMSLOTS
    MP_STATE = U.KVM_CAP_MP_STATE
    SYNC_MMU = U.KVM_CAP_SYNC_MMU
    VCPU_EVENTS = U.KVM_CAP_VCPU_EVENTS
    XSAVE = U.KVM_CAP_XSAVE
    XCRS = U.KVM_CAP_XCRS
    GET_TSC_KHZ = U.KVM_CAP_GET_TSC_KHZ
    MAX_VCPUS = U.KVM_CAP_MAX_VCPUS
    SYNC_REGS = U.KVM_CAP_SYNC_REGS
    IMMEDIATE_EXIT = U.KVM_CAP_IMMEDIATE_EXIT
    MANUAL_DIRTY_LOG_PROTECT2 = U.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2
    BINARY_STATS_FD = U.KVM_CAP_BINARY_STATS_FD
    DIRTY_LOG_RING = U.KVM_CAP_DIRTY_LOG_RING
    XSAVE2 = U.KVM_CAP_XSAVE2
    DIRTY_LOG_RING_ACQ_REL = U.KVM_CAP_DIRTY_LOG_RING_ACQ_REL
    DIRTY_LOG_RING_WITH_BITMAP = U.KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP


#: What every machine needs, and what each tracker adds.
REQUIRED: dict[str, tuple[Cap, ...]] = {
    "machine": (Cap.USER_MEMORY, Cap.IMMEDIATE_EXIT, Cap.VCPU_EVENTS, Cap.MP_STATE, Cap.XSAVE,
                Cap.XCRS),
    "ring": (Cap.DIRTY_LOG_RING,),
    "bitmap": (),
    "bitmap-clear": (Cap.MANUAL_DIRTY_LOG_PROTECT2,),
    "hotset": (Cap.MANUAL_DIRTY_LOG_PROTECT2,),
}
