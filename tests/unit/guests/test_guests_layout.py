"""The guest-visible memory map: what guest.h and start.S rely on (stacks, status blocks, the
mapped regions) for every vCPU count a MachineConfig accepts."""
from __future__ import annotations

import numpy as np
import pytest

from dirtyring.errors import ConfigError
from dirtyring.guests.protocol import STATUS_FIELDS, Port
from dirtyring.machine import layout
from dirtyring.machine.config import MachineConfig


def _accepted_vcpu_counts() -> list[int]:
    ok = []
    for n in range(1, 130):
        try:
            MachineConfig(vcpus=n)
        except ConfigError:
            continue
        ok.append(n)
    return ok


def _pte(mem: np.ndarray, gpa: int) -> int:
    return int(mem.view(np.uint64)[layout.PT0_GPA // 8 + gpa // layout.PAGE])


@pytest.fixture(scope="module")
def system_slot() -> np.ndarray:
    mem = np.zeros(layout.SYSTEM_SLOT_SIZE, np.uint8)
    layout.build_system_slot(mem, 64 << 20)
    return mem


def test_fixed_regions_are_mapped_as_guest_h_expects(system_slot: np.ndarray) -> None:
    P, RW, US = layout.P, layout.RW, layout.US
    # Control page: present, user, read-only. Status page: writable.
    assert _pte(system_slot, layout.CONTROL_GPA) & (P | RW | US) == P | US
    assert _pte(system_slot, layout.STATUS_GPA) & (P | RW | US) == P | RW | US
    # Code read-only, .bss and the device queues writable.
    for gpa in range(layout.CODE_GPA, layout.CODE_LIMIT, layout.PAGE):
        assert _pte(system_slot, gpa) & (P | RW | US) == P | US
    for gpa in range(layout.BSS_GPA, layout.QUEUE_GPA + layout.QUEUE_SIZE, layout.PAGE):
        assert _pte(system_slot, gpa) & (P | RW | US) == P | RW | US


def test_stacks_and_status_blocks_of_the_vcpus_this_host_runs(system_slot: np.ndarray) -> None:
    for i in range(2):  # NR_VCPUS = 2 on this machine kind
        top = layout.stack_top(i)
        assert layout.STACK_BASE < top < layout.QUEUE_GPA
        assert _pte(system_slot, top) & layout.RW
        assert top % 16 == 0  # SysV: rsp+8 aligned at function entry after `call`
        assert layout.status_gpa(i) + 8 * len(STATUS_FIELDS) <= layout.STATUS_GPA + layout.PAGE


def test_tss_grants_every_guest_port(system_slot: np.ndarray) -> None:
    """kvm_pvm drops RFLAGS.IOPL, so every port in guest.h must be allowed by the TSS I/O
    permission bitmap, and the TSS limit (GDT descriptor) must cover the bitmap."""
    tss = layout.TSS_GPA
    base = int(system_slot[tss + 0x66]) | int(system_slot[tss + 0x67]) << 8
    desc = int(system_slot[layout.GDT_GPA + 5 * 8:layout.GDT_GPA + 6 * 8].view(np.uint64)[0])
    limit = (desc & 0xFFFF) | ((desc >> 48) & 0xF) << 16
    assert (desc >> 40) & 0xFF == 0x89  # present, available 64-bit TSS
    for p in Port:
        byte = base + int(p) // 8
        assert byte + 1 <= limit, f"port {p.name} lies beyond the TSS limit {limit:#x}"
        assert not system_slot[tss + byte] >> (int(p) % 8) & 1, f"port {p.name} is denied"
    assert base + max(int(p) for p in Port) // 8 + 1 <= limit  # the CPU reads 2 bytes
    assert system_slot[tss + limit] == 0xFF  # the terminating byte


def test_every_accepted_vcpu_count_fits_the_layout() -> None:
    from dirtyring.machine.vm import KVMCLOCK_GPA

    n = max(_accepted_vcpu_counts())
    last = n - 1
    stack_lo = layout.stack_top(last) + 16 - layout.STACK_SIZE
    assert stack_lo >= layout.STACK_BASE
    assert layout.stack_top(last) + 16 <= layout.QUEUE_GPA, (
        f"vCPU {last}'s stack [{stack_lo:#x}, {layout.stack_top(last) + 16:#x}) overlaps the "
        f"device queues at {layout.QUEUE_GPA:#x}")
    assert layout.status_gpa(last) + layout.STATUS_STRIDE <= KVMCLOCK_GPA
