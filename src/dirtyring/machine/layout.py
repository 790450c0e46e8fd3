"""Guest physical layout, page tables and segments for a 64-bit guest running at CPL3, IOPL=3.

Why CPL3: on our hosts (kvm_pvm, shadow paging) guest code at CPL0 goes through KVM's instruction
emulator (~1.3 M instr/s) while CPL3 code runs natively; the same guest also runs on hardware KVM.
With IOPL=3, ``in``/``out`` still exit to the VMM as KVM_EXIT_IO. There is no IDT: any guest
exception triple-faults into KVM_EXIT_SHUTDOWN, which the VMM reports as a crash.

Identity mapping, guest virtual == guest physical::

    slot 0 "system", 4 MiB at GPA 0   (first 2 MiB mapped with 4 KiB pages, rest unmapped)
      0x001000 GDT (ro)      0x002000 PML4       0x003000 PDPT       0x004000 PD for GiB 0
      0x005000 PT 0-2 MiB    0x006000 TSS (ro)   0x007000 control page (ro: the VMM writes it)
      0x008000 status page (rw: per-vCPU progress, 256 bytes each)
      0x010000 code (ro, up to 0x70000)          0x080000 guest .bss (rw, to 0xF0000)
      0x0F0000 stacks (rw, 16 KiB per vCPU)      0x100000 device queues (rw, 64 KiB)
      0x200000 page directories of the data slots (not mapped in the guest)
    data slots from GPA 1 GiB, back to back, 2 MiB-aligned, mapped rw with 2 MiB pages

Page-table entries carry preset Accessed (and Dirty on writable leaves) so KVM never writes
A/D bits itself, which would log page-table pages dirty. Code, page tables and the control page
are read-only 4 KiB mappings so that plain reads of them never count as dirty.
"""
from __future__ import annotations

import struct

import numpy as np

from ..errors import ConfigError

PAGE = 4096
SYSTEM_SLOT_SIZE = 4 << 20
GDT_GPA = 0x1000
PML4_GPA = 0x2000
PDPT_GPA = 0x3000
PD0_GPA = 0x4000
PT0_GPA = 0x5000
TSS_GPA = 0x6000
CONTROL_GPA = 0x7000
STATUS_GPA = 0x8000
STATUS_STRIDE = 256
CODE_GPA = 0x10000
CODE_LIMIT = 0x80000
BSS_GPA = 0x80000
BSS_LIMIT = 0xF0000
STACK_BASE = 0xF0000
STACK_SIZE = 0x4000
QUEUE_GPA = 0x100000
QUEUE_SIZE = 0x10000
DATA_PD_GPA = 0x200000
DATA_GPA = 1 << 30
MAX_DATA_BYTES = 511 << 30  # one PDPT: 512 GiB of guest-physical space, GiB 0 is the system slot

IO_BITMAP_OFFSET = 0x68
IO_PORTS = 0x400  # ports the guest may use without exiting with #GP (all go to the VMM)
TSS_LIMIT = IO_BITMAP_OFFSET + IO_PORTS // 8  # includes the trailing 0xFF byte

# Segment selectors (GDT index << 3 | RPL).
SEL_USER_CODE = (3 << 3) | 3
SEL_USER_DATA = (4 << 3) | 3
SEL_TSS = 5 << 3

# Page-table entry bits.
P, RW, US, PWT, PCD, A, D, PS = 1, 2, 4, 8, 16, 32, 64, 128

# Control-register and flag values for long mode at CPL3.
CR0 = 0x80050033  # PG | AM | WP | NE | ET | MP | PE
CR4 = 0x620       # OSXMMEXCPT | OSFXSR | PAE
EFER = 0xD00      # NXE | LMA | LME
RFLAGS = 0x3002   # IOPL=3, reserved bit 1

_rw_4k = [(STATUS_GPA, CODE_GPA), (BSS_GPA, QUEUE_GPA + QUEUE_SIZE)]
_ro_4k = [(GDT_GPA, STATUS_GPA), (CODE_GPA, CODE_LIMIT)]


def stack_top(vcpu_index: int) -> int:
    return STACK_BASE + (vcpu_index + 1) * STACK_SIZE - 16


def status_gpa(vcpu_index: int) -> int:
    return STATUS_GPA + vcpu_index * STATUS_STRIDE


def build_system_slot(mem: np.ndarray, data_bytes: int) -> None:
    """Write GDT, TSS and page tables into the system slot ``mem`` (uint8 view of slot 0).

    ``data_bytes`` is the total size of the data slots mapped from DATA_GPA with 2 MiB pages.
    """
    if data_bytes > MAX_DATA_BYTES:
        raise ConfigError(f"data memory above {MAX_DATA_BYTES >> 30} GiB is not supported")
    q = mem.view(np.uint64)
    # PML4[0] -> PDPT; PDPT[0] -> PD0 (first GiB); PDPT[1+i] -> data PD i.
    q[PML4_GPA // 8] = PDPT_GPA | P | RW | US | A
    q[PDPT_GPA // 8] = PD0_GPA | P | RW | US | A
    q[PD0_GPA // 8] = PT0_GPA | P | RW | US | A
    pt = PT0_GPA // 8
    for lo, hi in _ro_4k:
        for gpa in range(lo, hi, PAGE):
            q[pt + gpa // PAGE] = gpa | P | US | A
    for lo, hi in _rw_4k:
        for gpa in range(lo, hi, PAGE):
            q[pt + gpa // PAGE] = gpa | P | RW | US | A | D
    n2m = (data_bytes + (2 << 20) - 1) >> 21
    n_pd = (n2m + 511) // 512
    for i in range(n_pd):
        q[PDPT_GPA // 8 + 1 + i] = (DATA_PD_GPA + i * PAGE) | P | RW | US | A
    if n2m:
        gpas = DATA_GPA + (np.arange(n2m, dtype=np.uint64) << np.uint64(21))
        q[DATA_PD_GPA // 8: DATA_PD_GPA // 8 + n2m] = gpas | np.uint64(P | RW | US | A | D | PS)
    # GDT: null, kernel code, kernel data, user code 64, user data, TSS (16 bytes), then user
    # data and user code 64 again where `sysretq` looks for them (SYSRET_BASE + 8 and + 16): a
    # Linux program's syscall entry returns with it on hardware KVM (linux/guest/entry.S).
    gdt = [0, KERNEL_CODE64, KERNEL_DATA, USER_CODE64, USER_DATA]
    tss_limit = TSS_LIMIT
    tss_lo = (tss_limit & 0xFFFF) | ((TSS_GPA & 0xFFFFFF) << 16) | (0x89 << 40) \
        | (((TSS_GPA >> 24) & 0xFF) << 56)
    gdt += [tss_lo, TSS_GPA >> 32, USER_DATA, USER_CODE64]
    mem[GDT_GPA:GDT_GPA + 8 * len(gdt)] = np.frombuffer(struct.pack(f"<{len(gdt)}Q", *gdt),
                                                         np.uint8)
    # TSS with an all-zero I/O permission bitmap for ports 0..IO_PORTS-1 (then the 0xFF byte
    # the CPU may read past the end). We also set IOPL=3, but kvm_pvm does not keep IOPL for
    # the guest (rflags reads back without it after KVM_RUN), so at CPL3 every in/out is
    # checked against this bitmap; without it the first in/out #GPs and triple-faults.
    mem[TSS_GPA + 0x66:TSS_GPA + 0x68] = np.frombuffer(struct.pack("<H", IO_BITMAP_OFFSET),
                                                         np.uint8)
    mem[TSS_GPA + IO_BITMAP_OFFSET:TSS_GPA + IO_BITMAP_OFFSET + IO_PORTS // 8] = 0
    mem[TSS_GPA + IO_BITMAP_OFFSET + IO_PORTS // 8] = 0xFF


GDT_LIMIT = 9 * 8 - 1
#: Segment descriptors: 64-bit code (L=1) and data, at DPL 0 and 3.
KERNEL_CODE64, KERNEL_DATA = 0x00AF9A000000FFFF, 0x00CF92000000FFFF
USER_CODE64, USER_DATA = 0x00AFFA000000FFFF, 0x00CFF2000000FFFF
#: STAR[63:48] for `sysretq`: it loads SS = this + 8 and CS = this + 16 (RPL 3), GDT entries 7
#: and 8 (entries 5 and 6 are the TSS's 16 bytes).
SYSRET_BASE = 6 << 3
