"""Constants and ctypes structs of the KVM userspace ABI (x86-64), spelled as in ``linux/kvm.h``.

Written by hand from Linux 6.18's ``include/uapi/linux/kvm.h`` and
``arch/x86/include/uapi/asm/kvm.h``. ``tests/unit/bindings/test_bindings_uapi.py`` compiles a C
program against the host's ``/usr/include/linux/kvm.h`` (6.1 on our machines) and checks every
size, offset and ioctl number defined there; constants newer than that header are marked
``# >6.1``.

Only this module and its siblings in ``_bindings`` may use ctypes structures.
"""
from __future__ import annotations

import ctypes as C

# --- ioctl number encoding (asm-generic/ioctl.h) -------------------------------------------------
_IOC_NRBITS, _IOC_TYPEBITS, _IOC_SIZEBITS = 8, 8, 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
KVMIO = 0xAE


def _IOC(direction: int, nr: int, size: int) -> int:
    return (direction << _IOC_DIRSHIFT) | (KVMIO << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT) | (
        size << _IOC_SIZESHIFT
    )


def _IO(nr: int) -> int:
    return _IOC(_IOC_NONE, nr, 0)


def _IOR(nr: int, size: int) -> int:
    return _IOC(_IOC_READ, nr, size)


def _IOW(nr: int, size: int) -> int:
    return _IOC(_IOC_WRITE, nr, size)


def _IOWR(nr: int, size: int) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, nr, size)


# --- structs ----------------------------------------------------------------------------------
u8, u16, u32, u64 = C.c_uint8, C.c_uint16, C.c_uint32, C.c_uint64


class kvm_userspace_memory_region(C.Structure):
    _fields_ = [("slot", u32), ("flags", u32), ("guest_phys_addr", u64), ("memory_size", u64),
                ("userspace_addr", u64)]


class kvm_regs(C.Structure):
    _fields_ = [(n, u64) for n in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class kvm_segment(C.Structure):
    _fields_ = [("base", u64), ("limit", u32), ("selector", u16), ("type", u8), ("present", u8),
                ("dpl", u8), ("db", u8), ("s", u8), ("l", u8), ("g", u8), ("avl", u8),
                ("unusable", u8), ("padding", u8)]


class kvm_dtable(C.Structure):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


KVM_NR_INTERRUPTS = 256


class kvm_sregs(C.Structure):
    _fields_ = [("cs", kvm_segment), ("ds", kvm_segment), ("es", kvm_segment), ("fs", kvm_segment),
                ("gs", kvm_segment), ("ss", kvm_segment), ("tr", kvm_segment), ("ldt", kvm_segment),
                ("gdt", kvm_dtable), ("idt", kvm_dtable),
                ("cr0", u64), ("cr2", u64), ("cr3", u64), ("cr4", u64), ("cr8", u64),
                ("efer", u64), ("apic_base", u64),
                ("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64))]


class kvm_fpu(C.Structure):
    _fields_ = [("fpr", (u8 * 16) * 8), ("fcw", u16), ("fsw", u16), ("ftwx", u8), ("pad1", u8),
                ("last_opcode", u16), ("last_ip", u64), ("last_dp", u64), ("xmm", (u8 * 16) * 16),
                ("mxcsr", u32), ("pad2", u32)]


class kvm_xsave(C.Structure):
    _fields_ = [("region", u32 * 1024)]


KVM_MAX_XCRS = 16


class kvm_xcr(C.Structure):
    _fields_ = [("xcr", u32), ("reserved", u32), ("value", u64)]


class kvm_xcrs(C.Structure):
    _fields_ = [("nr_xcrs", u32), ("flags", u32), ("xcrs", kvm_xcr * KVM_MAX_XCRS),
                ("padding", u64 * 16)]


class kvm_device_attr(C.Structure):
    _fields_ = [("flags", u32), ("group", u32), ("attr", u64), ("addr", u64)]


class kvm_msr_entry(C.Structure):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class kvm_msrs(C.Structure):
    """Header only; the entries follow it in memory (see ``msrs_buffer``)."""

    _fields_ = [("nmsrs", u32), ("pad", u32)]


class kvm_msr_list(C.Structure):
    _fields_ = [("nmsrs", u32)]


KVM_APIC_REG_SIZE = 0x400


class kvm_lapic_state(C.Structure):
    _fields_ = [("regs", C.c_char * KVM_APIC_REG_SIZE)]


class _ev_exception(C.Structure):
    _fields_ = [("injected", u8), ("nr", u8), ("has_error_code", u8), ("pending", u8),
                ("error_code", u32)]


class _ev_interrupt(C.Structure):
    _fields_ = [("injected", u8), ("nr", u8), ("soft", u8), ("shadow", u8)]


class _ev_nmi(C.Structure):
    _fields_ = [("injected", u8), ("pending", u8), ("masked", u8), ("pad", u8)]


class _ev_smi(C.Structure):
    _fields_ = [("smm", u8), ("pending", u8), ("smm_inside_nmi", u8), ("latched_init", u8)]


class kvm_vcpu_events(C.Structure):
    _fields_ = [("exception", _ev_exception), ("interrupt", _ev_interrupt), ("nmi", _ev_nmi),
                ("sipi_vector", u32), ("flags", u32), ("smi", _ev_smi),
                ("triple_fault_pending", u8), ("reserved", u8 * 26),
                ("exception_has_payload", u8), ("exception_payload", u64)]


class kvm_signal_mask(C.Structure):
    """Header only; ``len`` bytes of kernel sigset follow (8 on x86-64)."""

    _fields_ = [("len", u32)]


class kvm_mp_state(C.Structure):
    _fields_ = [("mp_state", u32)]


class kvm_enable_cap(C.Structure):
    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]


class kvm_dirty_log(C.Structure):
    _fields_ = [("slot", u32), ("padding1", u32), ("dirty_bitmap", u64)]


class kvm_clear_dirty_log(C.Structure):
    _fields_ = [("slot", u32), ("num_pages", u32), ("first_page", u64), ("dirty_bitmap", u64)]


class kvm_dirty_gfn(C.Structure):
    _fields_ = [("flags", u32), ("slot", u32), ("offset", u64)]


class kvm_cpuid_entry2(C.Structure):
    _fields_ = [("function", u32), ("index", u32), ("flags", u32), ("eax", u32), ("ebx", u32),
                ("ecx", u32), ("edx", u32), ("padding", u32 * 3)]


class kvm_cpuid2(C.Structure):
    """Header only; entries follow (see ``cpuid_buffer``)."""

    _fields_ = [("nent", u32), ("padding", u32)]


# kvm_run: the fixed head and the exit union members we decode.
class _run_io(C.Structure):
    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32), ("data_offset", u64)]


class _run_mmio(C.Structure):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class _run_fail_entry(C.Structure):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class _run_internal(C.Structure):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class _run_exit_union(C.Union):
    _fields_ = [("io", _run_io), ("mmio", _run_mmio), ("fail_entry", _run_fail_entry),
                ("internal", _run_internal), ("padding", C.c_char * 256)]


class kvm_sync_regs(C.Structure):
    _fields_ = [("regs", kvm_regs), ("sregs", kvm_sregs), ("events", kvm_vcpu_events)]


class _run_sync_union(C.Union):
    _fields_ = [("regs", kvm_sync_regs), ("padding", C.c_char * 2048)]


class kvm_run(C.Structure):
    _fields_ = [("request_interrupt_window", u8), ("immediate_exit", u8), ("padding1", u8 * 6),
                ("exit_reason", u32), ("ready_for_interrupt_injection", u8), ("if_flag", u8),
                ("flags", u16), ("cr8", u64), ("apic_base", u64), ("u", _run_exit_union),
                ("kvm_valid_regs", u64), ("kvm_dirty_regs", u64), ("s", _run_sync_union)]


class kvm_stats_header(C.Structure):
    _fields_ = [("flags", u32), ("name_size", u32), ("num_desc", u32), ("id_offset", u32),
                ("desc_offset", u32), ("data_offset", u32)]


# --- constants --------------------------------------------------------------------------------
KVM_API_VERSION = 12

# Capabilities (values of KVM_CAP_*).
KVM_CAP_IRQCHIP = 0
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_SYNC_MMU = 16
KVM_CAP_MP_STATE = 14
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_XSAVE = 55
KVM_CAP_XCRS = 56
KVM_CAP_GET_TSC_KHZ = 61
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_SYNC_REGS = 74
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
KVM_CAP_DIRTY_LOG_RING = 192
KVM_CAP_XSAVE2 = 208
KVM_CAP_BINARY_STATS_FD = 203
KVM_CAP_DIRTY_LOG_RING_ACQ_REL = 223  # >6.1
KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP = 225  # >6.1

KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1

KVM_DIRTY_GFN_F_DIRTY = 1 << 0
KVM_DIRTY_GFN_F_RESET = 1 << 1
KVM_DIRTY_LOG_PAGE_OFFSET = 64  # x86: ring at this page offset of the vCPU fd

# Exit reasons.
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_DIRTY_RING_FULL = 31

KVM_SYNC_X86_REGS = 1 << 0
KVM_SYNC_X86_SREGS = 1 << 1
KVM_SYNC_X86_EVENTS = 1 << 2

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_MP_STATE_RUNNABLE = 0

# MSRs the VMM uses.
MSR_KVM_SYSTEM_TIME_NEW = 0x4B564D01
MSR_KVM_STEAL_TIME = 0x4B564D03
MSR_IA32_TSC = 0x10
MSR_EFER = 0xC0000080
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SYSCALL_MASK = 0xC0000084
MSR_FS_BASE = 0xC0000100
MSR_GS_BASE = 0xC0000101
MSR_KERNEL_GS_BASE = 0xC0000102
MSR_TSC_AUX = 0xC0000103
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_IA32_CR_PAT = 0x277
MSR_IA32_MISC_ENABLE = 0x1A0

# --- ioctl numbers --------------------------------------------------------------------------------
# /dev/kvm
KVM_GET_API_VERSION = _IO(0x00)
KVM_CREATE_VM = _IO(0x01)
KVM_GET_MSR_INDEX_LIST = _IOWR(0x02, C.sizeof(kvm_msr_list))
KVM_CHECK_EXTENSION = _IO(0x03)
KVM_GET_VCPU_MMAP_SIZE = _IO(0x04)
KVM_GET_SUPPORTED_CPUID = _IOWR(0x05, C.sizeof(kvm_cpuid2))
# VM fd
KVM_CREATE_VCPU = _IO(0x41)
KVM_GET_DIRTY_LOG = _IOW(0x42, C.sizeof(kvm_dirty_log))
KVM_SET_USER_MEMORY_REGION = _IOW(0x46, C.sizeof(kvm_userspace_memory_region))
KVM_SET_TSS_ADDR = _IO(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _IOW(0x48, 8)
KVM_CREATE_IRQCHIP = _IO(0x60)
KVM_ENABLE_CAP = _IOW(0xA3, C.sizeof(kvm_enable_cap))
KVM_CLEAR_DIRTY_LOG = _IOWR(0xC0, C.sizeof(kvm_clear_dirty_log))
KVM_RESET_DIRTY_RINGS = _IO(0xC7)
KVM_GET_STATS_FD = _IO(0xCE)
# vCPU fd
KVM_RUN = _IO(0x80)
KVM_GET_REGS = _IOR(0x81, C.sizeof(kvm_regs))
KVM_SET_REGS = _IOW(0x82, C.sizeof(kvm_regs))
KVM_GET_SREGS = _IOR(0x83, C.sizeof(kvm_sregs))
KVM_SET_SREGS = _IOW(0x84, C.sizeof(kvm_sregs))
KVM_GET_MSRS = _IOWR(0x88, C.sizeof(kvm_msrs))
KVM_SET_MSRS = _IOW(0x89, C.sizeof(kvm_msrs))
KVM_SET_CPUID2 = _IOW(0x90, C.sizeof(kvm_cpuid2))
KVM_SET_SIGNAL_MASK = _IOW(0x8B, C.sizeof(kvm_signal_mask))
KVM_GET_FPU = _IOR(0x8C, C.sizeof(kvm_fpu))
KVM_SET_FPU = _IOW(0x8D, C.sizeof(kvm_fpu))
KVM_GET_LAPIC = _IOR(0x8E, C.sizeof(kvm_lapic_state))
KVM_SET_LAPIC = _IOW(0x8F, C.sizeof(kvm_lapic_state))
KVM_GET_MP_STATE = _IOR(0x98, C.sizeof(kvm_mp_state))
KVM_SET_MP_STATE = _IOW(0x99, C.sizeof(kvm_mp_state))
KVM_GET_VCPU_EVENTS = _IOR(0x9F, C.sizeof(kvm_vcpu_events))
KVM_SET_VCPU_EVENTS = _IOW(0xA0, C.sizeof(kvm_vcpu_events))
KVM_GET_TSC_KHZ = _IO(0xA3)
KVM_GET_XSAVE = _IOR(0xA4, C.sizeof(kvm_xsave))
KVM_SET_XSAVE = _IOW(0xA5, C.sizeof(kvm_xsave))
KVM_GET_XCRS = _IOR(0xA6, C.sizeof(kvm_xcrs))
KVM_SET_XCRS = _IOW(0xA7, C.sizeof(kvm_xcrs))
KVM_GET_DEVICE_ATTR = _IOW(0xE2, C.sizeof(kvm_device_attr))
#: vCPU device attributes (asm/kvm.h): the TSC control group and its offset attribute.
KVM_VCPU_TSC_CTRL = 0
KVM_VCPU_TSC_OFFSET = 0

#: Every ioctl number by kernel name (used for error messages and the header check).
IOCTL_NAMES: dict[int, str] = {
    v: k for k, v in list(globals().items())
    if k.startswith("KVM_") and isinstance(v, int) and (v >> _IOC_TYPESHIFT) & 0xFF == KVMIO
}


def msrs_buffer(n: int) -> tuple[C.Array[C.c_uint8], C.Array[kvm_msr_entry]]:
    """A kvm_msrs header followed by ``n`` entries in one buffer; returns (buffer, entries view)."""
    buf = (C.c_uint8 * (C.sizeof(kvm_msrs) + n * C.sizeof(kvm_msr_entry)))()
    kvm_msrs.from_buffer(buf).nmsrs = n
    entries = (kvm_msr_entry * n).from_buffer(buf, C.sizeof(kvm_msrs))
    return buf, entries


def cpuid_buffer(n: int) -> tuple[C.Array[C.c_uint8], C.Array[kvm_cpuid_entry2]]:
    """A kvm_cpuid2 header followed by ``n`` entries in one buffer; returns (buffer, entries view)."""
    buf = (C.c_uint8 * (C.sizeof(kvm_cpuid2) + n * C.sizeof(kvm_cpuid_entry2)))()
    kvm_cpuid2.from_buffer(buf).nent = n
    entries = (kvm_cpuid_entry2 * n).from_buffer(buf, C.sizeof(kvm_cpuid2))
    return buf, entries
