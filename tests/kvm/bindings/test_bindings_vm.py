"""``VmFd`` against the real /dev/kvm: one test per method, the dirty-ring enable rules and
errors the kernel documents (virt/kvm/kvm_main.c ``kvm_vm_ioctl_enable_dirty_log_ring``) and the
ring/bitmap exclusivity. The bad-fd tests are in tests/unit/bindings/test_bindings_errors.py.

Every test checks an effect KVM itself shows (a guest write landing in our memory and in the
dirty log or ring, an errno only the kernel produces, a register only an in-kernel LAPIC has),
not only that no exception was raised. Where the binding checks an argument in Python before
the ioctl, the kernel's own answer is reached through ``VmFd.enable_cap`` (the raw call) and the
Python pre-check is tested on its own in tests/unit/bindings/test_bindings_validation.py."""
from __future__ import annotations

import ctypes as C
import errno
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from dirtyring._bindings import PAGE_SIZE, Cap, Kvm, VcpuFd, VmFd
from dirtyring._bindings import _uapi as U
from dirtyring._bindings._ioctl import ioctl
from dirtyring.errors import KvmError

RING_MAX_BYTES = 65536 * 16


def expect_errno(err: int, call: Callable[[], Any], ioctl: str | None = None) -> KvmError:
    with pytest.raises(KvmError) as ei:
        call()
    assert ei.value.errno == err, f"expected {errno.errorcode[err]}, got {ei.value}"
    if ioctl is not None:
        assert ei.value.ioctl == ioctl
    return ei.value


def run_writer_at(vcpu: VcpuFd, mem: Any, guest: Any, pages: list[int], *, cs_base: int = 0,
                  ds_base: int = 0) -> None:
    """The conftest's writer guest (``mov byte [DS:page*4096], 1`` per page, then ``out``,
    ``hlt``), run with its code and data segments based where the test says: a real-mode base
    set through KVM_SET_SREGS reaches a slot placed anywhere below 4 GiB. The code goes to
    offset CODE_GPA of ``mem``, which must be guest-physical ``cs_base + CODE_GPA``."""
    mem.put(guest.CODE_GPA, guest.writer_code(pages))
    s = vcpu.get_sregs()
    s.cs.base, s.cs.selector = cs_base, 0
    s.ds.base, s.ds.selector = ds_base, 0
    vcpu.set_sregs(s)
    r = vcpu.get_regs()
    r.rip, r.rflags = guest.CODE_GPA, 0x2
    vcpu.set_regs(r)
    assert vcpu.run() == U.KVM_EXIT_IO
    assert vcpu.run_struct.u.io.port == guest.DONE_PORT
    assert vcpu.run() == U.KVM_EXIT_HLT


def written_pages(mem: Any, guest: Any, first: int = 0, count: int | None = None) -> list[int]:
    """Pages of ``mem`` (from page ``first``) whose first byte the writer set to 1."""
    a = mem.map.array()
    n = guest.SLOT_PAGES - first if count is None else count
    return [p for p in range(n) if a[(first + p) * PAGE_SIZE] == 1]


def slot_log(vm: VmFd, guest: Any, slot: int) -> list[int]:
    """The pages KVM_GET_DIRTY_LOG reports for ``slot`` (at most 64 pages)."""
    bitmap = np.zeros(1, np.uint64)
    vm.get_dirty_log(slot, bitmap)
    return list(guest.bitmap_pages(bitmap))


def ring_pages(v: VcpuFd, guest: Any, ring_bytes: int) -> list[tuple[int, int]]:
    """The (slot, page) entries KVM pushed to ``v``'s dirty ring, without harvesting them."""
    assert v.ring_map is not None and v.ring_map.size == ring_bytes
    # SAFETY: the ring mapping is live (v is open) and holds ring_bytes of kvm_dirty_gfn.
    ring = (U.kvm_dirty_gfn * (ring_bytes // C.sizeof(U.kvm_dirty_gfn))).from_address(
        v.ring_map.addr)
    out = []
    i = 0
    while i < len(ring) and ring[i].flags & U.KVM_DIRTY_GFN_F_DIRTY:
        out.append((int(ring[i].slot), int(ring[i].offset)))
        i += 1
    return sorted(set(out))


# --- check_extension_int ------------------------------------------------------------------------
def test_check_extension_int_per_vm(vm: VmFd, kvm: Kvm) -> None:
    assert vm.check_extension_int(Cap.NR_VCPUS) >= 1
    assert vm.check_extension_int(Cap.MAX_VCPUS) >= vm.check_extension_int(Cap.NR_VCPUS)
    assert vm.check_extension_int(Cap.XSAVE2) >= 4096
    assert vm.check_extension_int(Cap.DIRTY_LOG_RING) == RING_MAX_BYTES
    assert vm.check_extension_int(100_000) == 0


# --- memory slots -------------------------------------------------------------------------------
def test_set_user_memory_region(vm: VmFd, vcpu: VcpuFd, guest_mem: Any, guest: Any) -> None:
    vm.set_user_memory_region(0, 0, guest.SLOT_BYTES, guest_mem.map.addr)
    # The guest runs from that memory and its writes land in our mapping.
    run_writer_at(vcpu, guest_mem, guest, [3, 7])
    assert written_pages(guest_mem, guest) == [3, 7]
    # No dirty logging asked for: the kernel has no log for the slot.
    expect_errno(errno.ENOENT, lambda: slot_log(vm, guest, 0), "KVM_GET_DIRTY_LOG")
    # Changing only the flags of an existing slot is allowed (turn dirty logging on): from
    # then on the kernel logs the guest's writes.
    vm.set_user_memory_region(0, 0, guest.SLOT_BYTES, guest_mem.map.addr,
                              U.KVM_MEM_LOG_DIRTY_PAGES)
    assert slot_log(vm, guest, 0) == []
    run_writer_at(vcpu, guest_mem, guest, [5])
    assert slot_log(vm, guest, 0) == [5]
    # memory_size 0 deletes the slot: the kernel no longer knows it.
    vm.set_user_memory_region(0, 0, 0, 0)
    expect_errno(errno.ENOENT, lambda: slot_log(vm, guest, 0), "KVM_GET_DIRTY_LOG")
    # A new one may then take its place, elsewhere: the guest reaches the same memory at 1 MiB.
    guest_mem.map.array()[:] = 0
    vm.set_user_memory_region(0, 0x100000, guest.SLOT_BYTES, guest_mem.map.addr,
                              U.KVM_MEM_LOG_DIRTY_PAGES)
    run_writer_at(vcpu, guest_mem, guest, [2, 9], cs_base=0x100000, ds_base=0x100000)
    assert written_pages(guest_mem, guest) == [2, 9]
    assert slot_log(vm, guest, 0) == [2, 9]  # pages relative to the slot's own start


def test_set_user_memory_region_second_slot(vm: VmFd, vcpu: VcpuFd, guest_mem: Any,
                                            guest: Any) -> None:
    """Two slots side by side: a guest write lands in the slot that holds its address, and
    each slot has its own dirty log, counted from its own first page."""
    half = guest.SLOT_BYTES // 2
    vm.set_user_memory_region(0, 0, half, guest_mem.map.addr, U.KVM_MEM_LOG_DIRTY_PAGES)
    vm.set_user_memory_region(1, half, half, guest_mem.map.addr + half,
                              U.KVM_MEM_LOG_DIRTY_PAGES)
    run_writer_at(vcpu, guest_mem, guest, [4])                  # slot 0 (code runs there too)
    run_writer_at(vcpu, guest_mem, guest, [6, 11], ds_base=half)  # slot 1
    first = half // PAGE_SIZE
    assert written_pages(guest_mem, guest) == [4, first + 6, first + 11]
    assert slot_log(vm, guest, 0) == [4]
    assert slot_log(vm, guest, 1) == [6, 11]


@pytest.mark.parametrize(("gpa", "size", "hva_off", "flags"), [
    pytest.param(0x800, PAGE_SIZE, 0, 0, id="gpa-unaligned"),
    pytest.param(0, PAGE_SIZE + 1, 0, 0, id="size-unaligned"),
    pytest.param(0, PAGE_SIZE, 8, 0, id="hva-unaligned"),
    pytest.param(0, PAGE_SIZE, 0, 0x80, id="unknown-flag"),
])
def test_set_user_memory_region_invalid_einval(vm: VmFd, guest_mem: Any, gpa: int, size: int,
                                               hva_off: int, flags: int) -> None:
    expect_errno(errno.EINVAL, lambda: vm.set_user_memory_region(
        0, gpa, size, guest_mem.map.addr + hva_off, flags), "KVM_SET_USER_MEMORY_REGION")


def test_set_user_memory_region_slot_id_out_of_range(vm: VmFd, guest_mem: Any) -> None:
    nr = vm.check_extension_int(Cap.NR_MEMSLOTS)
    expect_errno(errno.EINVAL,
                 lambda: vm.set_user_memory_region(nr, 0, PAGE_SIZE, guest_mem.map.addr))


def test_set_user_memory_region_overlap_eexist(vm: VmFd, guest_mem: Any, guest: Any) -> None:
    vm.set_user_memory_region(0, 0, guest.SLOT_BYTES, guest_mem.map.addr)
    expect_errno(errno.EEXIST, lambda: vm.set_user_memory_region(
        1, PAGE_SIZE, PAGE_SIZE, guest_mem.map.addr))


# --- enable_cap -------------------------------------------------------------------------------
def test_enable_cap(vm: VmFd, vcpu: VcpuFd, guest_mem: Any, guest: Any) -> None:
    """The raw call reaches the kernel: with manual protect on, KVM_GET_DIRTY_LOG no longer
    clears the log (compare test_get_dirty_log_records_guest_writes, where it does)."""
    vm.enable_cap(Cap.MANUAL_DIRTY_LOG_PROTECT2, U.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
    guest.add_slot(vm, guest_mem)
    guest.run_writer(vcpu, guest_mem, [3, 8])
    assert slot_log(vm, guest, guest.SLOT) == [3, 8]
    assert slot_log(vm, guest, guest.SLOT) == [3, 8]


def test_enable_cap_unknown_einval_message(vm: VmFd) -> None:
    """The message carries the ioctl name and the errno name."""
    e = expect_errno(errno.EINVAL, lambda: vm.enable_cap(100_000), "KVM_ENABLE_CAP")
    assert "KVM_ENABLE_CAP" in str(e) and "EINVAL" in str(e)
    assert str(e) == "KVM_ENABLE_CAP failed: EINVAL (Invalid argument)"
    assert isinstance(e, OSError)


def test_enable_cap_unknown_arg_bit_einval(vm: VmFd) -> None:
    """MANUAL_DIRTY_LOG_PROTECT2 accepts only the bits CHECK_EXTENSION reported (1|2)."""
    expect_errno(errno.EINVAL, lambda: vm.enable_cap(Cap.MANUAL_DIRTY_LOG_PROTECT2, 4))
    assert vm.manual_protect is False


# --- enable_dirty_log_ring ---------------------------------------------------------------------
@pytest.mark.parametrize("size", [PAGE_SIZE, 16 * 1024, RING_MAX_BYTES],
                         ids=["one-page", "16KiB", "max"])
def test_enable_dirty_log_ring(vm: VmFd, size: int, make_vcpu: Callable[..., VcpuFd],
                               guest_mem: Any, guest: Any) -> None:
    """The kernel takes the ring: a new vCPU maps a ring of that size, the guest's writes show up
    in it, and the bitmap log is refused on this VM from then on."""
    vm.enable_dirty_log_ring(size)
    assert vm.dirty_ring_bytes == size
    guest.add_slot(vm, guest_mem)
    v = make_vcpu(vm, 0)
    guest.run_writer(v, guest_mem, [3, 7])
    assert ring_pages(v, guest, size) == [(guest.SLOT, 3), (guest.SLOT, 7)]
    expect_errno(errno.ENXIO, lambda: slot_log(vm, guest, guest.SLOT), "KVM_GET_DIRTY_LOG")


def test_enable_dirty_log_ring_maps_ring_in_new_vcpus(
        ring_vm: VmFd, make_vcpu: Callable[..., VcpuFd], guest: Any) -> None:
    v = make_vcpu(ring_vm, 0)
    assert v.ring_map is not None and v.ring_map.size == guest.RING_BYTES
    entries = v.ring_map.array(np.uint32).reshape(-1, 4)
    assert entries.shape[0] == guest.RING_BYTES // C.sizeof(U.kvm_dirty_gfn)
    assert not entries.any()


def test_enable_dirty_log_ring_after_vcpu_einval(
        vm: VmFd, make_vcpu: Callable[..., VcpuFd]) -> None:
    make_vcpu(vm, 0)
    e = expect_errno(errno.EINVAL, lambda: vm.enable_dirty_log_ring(16 * 1024), "KVM_ENABLE_CAP")
    assert "KVM_ENABLE_CAP" in str(e) and "EINVAL" in str(e)
    assert vm.dirty_ring_bytes == 0


def test_enable_dirty_log_ring_twice_einval(ring_vm: VmFd, guest: Any) -> None:
    expect_errno(errno.EINVAL, lambda: ring_vm.enable_dirty_log_ring(guest.RING_BYTES))
    expect_errno(errno.EINVAL, lambda: ring_vm.enable_dirty_log_ring(2 * guest.RING_BYTES))
    assert ring_vm.dirty_ring_bytes == guest.RING_BYTES


@pytest.mark.parametrize("size", [0, 16, PAGE_SIZE // 2, PAGE_SIZE + 16, 3 * PAGE_SIZE],
                         ids=["zero", "16B", "half-page", "not-pow2", "3-pages"])
def test_enable_dirty_log_ring_bad_size_einval(vm: VmFd, size: int, guest_mem: Any,
                                               guest: Any) -> None:
    """The kernel's answer, through the raw KVM_ENABLE_CAP (the wrapper refuses 0 itself before
    any ioctl: that pre-check is tested in tests/unit/bindings/test_bindings_validation.py).
    The refused VM has no ring: its bitmap log still works, and a valid ring is then taken."""
    expect_errno(errno.EINVAL, lambda: vm.enable_cap(Cap.DIRTY_LOG_RING, size), "KVM_ENABLE_CAP")
    guest.add_slot(vm, guest_mem)
    assert slot_log(vm, guest, guest.SLOT) == []
    vm.enable_dirty_log_ring(guest.RING_BYTES)  # once only: it would be EINVAL had one been on
    expect_errno(errno.ENXIO, lambda: slot_log(vm, guest, guest.SLOT), "KVM_GET_DIRTY_LOG")


@pytest.mark.parametrize("size", [16, PAGE_SIZE // 2, PAGE_SIZE + 16, 3 * PAGE_SIZE],
                         ids=["16B", "half-page", "not-pow2", "3-pages"])
def test_enable_dirty_log_ring_wrapper_passes_the_kernels_einval_on(vm: VmFd, size: int) -> None:
    """Sizes the pre-check lets through reach the kernel, whose EINVAL the wrapper raises."""
    expect_errno(errno.EINVAL, lambda: vm.enable_dirty_log_ring(size), "KVM_ENABLE_CAP")
    assert vm.dirty_ring_bytes == 0


@pytest.mark.parametrize("size", [2 * RING_MAX_BYTES, 1 << 31], ids=["2MiB", "2GiB"])
def test_enable_dirty_log_ring_above_max_e2big(vm: VmFd, size: int) -> None:
    """Power of two above KVM_DIRTY_RING_MAX_ENTRIES * 16: E2BIG (the size check comes after
    the power-of-two and minimum checks, so a bad size above the max is still EINVAL)."""
    e = expect_errno(errno.E2BIG, lambda: vm.enable_dirty_log_ring(size), "KVM_ENABLE_CAP")
    assert "E2BIG" in str(e)
    expect_errno(errno.EINVAL, lambda: vm.enable_dirty_log_ring(2 * RING_MAX_BYTES + PAGE_SIZE))
    assert vm.dirty_ring_bytes == 0


def test_enable_dirty_log_ring_kernel_truncates_size_to_u32(
        kvm: Kvm, make_vcpu: Callable[..., VcpuFd], guest_mem: Any, guest: Any) -> None:
    """The kernel reads args[0] as u32 (why the wrapper refuses sizes >= 2^32 itself; that
    pre-check is tested in tests/unit/bindings/test_bindings_validation.py). Through the raw
    KVM_ENABLE_CAP: 1 << 32 arrives as 0 (EINVAL, not E2BIG), and (1 << 32) + 16 KiB, not a
    power of two as a u64, arrives as 16 KiB and is taken: the ring is on, 16 KiB of it."""
    vm = kvm.create_vm()
    try:
        expect_errno(errno.EINVAL, lambda: vm.enable_cap(Cap.DIRTY_LOG_RING, 1 << 32),
                     "KVM_ENABLE_CAP")
        vm.enable_cap(Cap.DIRTY_LOG_RING, (1 << 32) + guest.RING_BYTES)
        guest.add_slot(vm, guest_mem)
        expect_errno(errno.ENXIO, lambda: slot_log(vm, guest, guest.SLOT), "KVM_GET_DIRTY_LOG")
        vm.dirty_ring_bytes = guest.RING_BYTES  # what the kernel took; the vCPU maps that much
        v = make_vcpu(vm, 0)
        guest.run_writer(v, guest_mem, [6])
        assert ring_pages(v, guest, guest.RING_BYTES) == [(guest.SLOT, 6)]
    finally:
        vm.close()


# --- manual protect ---------------------------------------------------------------------------
def test_enable_manual_dirty_log_protect(vm: VmFd, vcpu: VcpuFd, guest_mem: Any,
                                         guest: Any) -> None:
    """After it, GET no longer clears and re-protects: CLEAR does, page by page."""
    vm.enable_manual_dirty_log_protect()
    assert vm.manual_protect is True
    guest.add_slot(vm, guest_mem)
    guest.run_writer(vcpu, guest_mem, [4])
    assert slot_log(vm, guest, guest.SLOT) == [4]
    assert slot_log(vm, guest, guest.SLOT) == [4]
    vm.clear_dirty_log(guest.SLOT, 0, guest.SLOT_PAGES, np.array([1 << 4], np.uint64))
    assert slot_log(vm, guest, guest.SLOT) == []


def test_enable_manual_dirty_log_protect_after_ring_is_allowed(
        ring_vm: VmFd, make_vcpu: Callable[..., VcpuFd], guest_mem: Any, guest: Any) -> None:
    """The kernel accepts the cap (the ioctl returns 0), and the ring keeps working: guest
    writes still reach it, and the bitmap ioctls stay refused (see exclusivity)."""
    ring_vm.enable_manual_dirty_log_protect()
    assert ring_vm.manual_protect is True
    guest.add_slot(ring_vm, guest_mem)
    v = make_vcpu(ring_vm, 0)
    guest.run_writer(v, guest_mem, [9])
    assert ring_pages(v, guest, guest.RING_BYTES) == [(guest.SLOT, 9)]
    expect_errno(errno.ENXIO, lambda: slot_log(ring_vm, guest, guest.SLOT), "KVM_GET_DIRTY_LOG")


# --- bitmap log ---------------------------------------------------------------------------------
def test_get_dirty_log_records_guest_writes(vm: VmFd, vcpu: VcpuFd, guest_mem: Any,
                                            guest: Any) -> None:
    guest.add_slot(vm, guest_mem)
    bitmap = np.zeros(guest.SLOT_PAGES // 64, np.uint64)
    vm.get_dirty_log(guest.SLOT, bitmap)
    assert guest.bitmap_pages(bitmap) == []
    guest.run_writer(vcpu, guest_mem, [3, 7, 12])
    vm.get_dirty_log(guest.SLOT, bitmap)
    assert guest.bitmap_pages(bitmap) == [3, 7, 12]
    # Without manual protect, GET cleared the log atomically.
    vm.get_dirty_log(guest.SLOT, bitmap)
    assert guest.bitmap_pages(bitmap) == []


def test_get_dirty_log_unknown_slot_enoent(vm: VmFd) -> None:
    bitmap = np.zeros(1, np.uint64)
    expect_errno(errno.ENOENT, lambda: vm.get_dirty_log(5, bitmap), "KVM_GET_DIRTY_LOG")


def test_get_dirty_log_slot_without_logging_enoent(vm: VmFd, guest_mem: Any,
                                                   guest: Any) -> None:
    guest.add_slot(vm, guest_mem, flags=0)
    bitmap = np.zeros(1, np.uint64)
    expect_errno(errno.ENOENT, lambda: vm.get_dirty_log(guest.SLOT, bitmap))


def test_clear_dirty_log_rearms_with_manual_protect(vm: VmFd, vcpu: VcpuFd, guest_mem: Any,
                                                    guest: Any) -> None:
    vm.enable_manual_dirty_log_protect()
    guest.add_slot(vm, guest_mem)
    bitmap = np.zeros(1, np.uint64)
    guest.run_writer(vcpu, guest_mem, [2, 9])
    vm.get_dirty_log(guest.SLOT, bitmap)
    assert guest.bitmap_pages(bitmap) == [2, 9]
    # Manual protect: GET no longer clears.
    vm.get_dirty_log(guest.SLOT, bitmap)
    assert guest.bitmap_pages(bitmap) == [2, 9]
    clear = np.array([1 << 2], np.uint64)
    vm.clear_dirty_log(guest.SLOT, 0, guest.SLOT_PAGES, clear)
    vm.get_dirty_log(guest.SLOT, bitmap)
    assert guest.bitmap_pages(bitmap) == [9]
    vm.clear_dirty_log(guest.SLOT, 0, guest.SLOT_PAGES, np.array([1 << 9], np.uint64))
    vm.get_dirty_log(guest.SLOT, bitmap)
    assert guest.bitmap_pages(bitmap) == []


@pytest.mark.parametrize(("first", "num"), [(1, 16), (0, 128)],
                         ids=["first-not-64-aligned", "past-slot-end"])
def test_clear_dirty_log_bad_range_einval(vm: VmFd, guest_mem: Any, guest: Any,
                                          first: int, num: int) -> None:
    vm.enable_manual_dirty_log_protect()
    guest.add_slot(vm, guest_mem)
    bitmap = np.zeros(2, np.uint64)
    expect_errno(errno.EINVAL, lambda: vm.clear_dirty_log(guest.SLOT, first, num, bitmap),
                 "KVM_CLEAR_DIRTY_LOG")


def test_clear_dirty_log_unknown_slot_enoent(vm: VmFd) -> None:
    vm.enable_manual_dirty_log_protect()
    expect_errno(errno.ENOENT, lambda: vm.clear_dirty_log(5, 0, 64, np.zeros(1, np.uint64)))


# --- exclusivity ----------------------------------------------------------------------------------
def test_get_dirty_log_refused_once_ring_is_on(ring_vm: VmFd, guest_mem: Any,
                                               guest: Any) -> None:
    guest.add_slot(ring_vm, guest_mem)
    e = expect_errno(errno.ENXIO, lambda: ring_vm.get_dirty_log(guest.SLOT, np.zeros(1, np.uint64)),
                     "KVM_GET_DIRTY_LOG")
    assert "KVM_GET_DIRTY_LOG" in str(e) and "ENXIO" in str(e)


def test_clear_dirty_log_refused_once_ring_is_on(ring_vm: VmFd, guest_mem: Any,
                                                 guest: Any) -> None:
    ring_vm.enable_manual_dirty_log_protect()
    guest.add_slot(ring_vm, guest_mem)
    expect_errno(errno.ENXIO, lambda: ring_vm.clear_dirty_log(
        guest.SLOT, 0, guest.SLOT_PAGES, np.zeros(1, np.uint64)), "KVM_CLEAR_DIRTY_LOG")


def test_bitmap_still_works_on_another_vm(ring_vm: VmFd, vm: VmFd, vcpu: VcpuFd,
                                          guest_mem: Any, guest: Any) -> None:
    """One VM's ring does not switch the bitmap off on another: there it logs guest writes."""
    guest.add_slot(ring_vm, guest_mem)
    expect_errno(errno.ENXIO, lambda: slot_log(ring_vm, guest, guest.SLOT))
    guest.add_slot(vm, guest_mem)
    assert slot_log(vm, guest, guest.SLOT) == []
    guest.run_writer(vcpu, guest_mem, [5, 12])
    assert slot_log(vm, guest, guest.SLOT) == [5, 12]


# --- reset_dirty_rings ----------------------------------------------------------------------------
def test_reset_dirty_rings_idle_returns_zero(ring_vm: VmFd, make_vcpu: Callable[..., VcpuFd],
                                             guest_mem: Any, guest: Any) -> None:
    guest.add_slot(ring_vm, guest_mem)
    assert ring_vm.reset_dirty_rings() == 0
    make_vcpu(ring_vm, 0)
    make_vcpu(ring_vm, 1)
    assert ring_vm.reset_dirty_rings() == 0


def test_reset_dirty_rings_counts_harvested_entries(
        ring_vm: VmFd, make_vcpu: Callable[..., VcpuFd], guest_mem: Any, guest: Any) -> None:
    guest.add_slot(ring_vm, guest_mem)
    v = make_vcpu(ring_vm, 0)
    pages = [4, 5, 11]
    guest.run_writer(v, guest_mem, pages)
    assert v.ring_map is not None
    # SAFETY: the ring mapping is live (v is open) and holds RING_BYTES of kvm_dirty_gfn.
    ring = (U.kvm_dirty_gfn * (guest.RING_BYTES // 16)).from_address(v.ring_map.addr)
    harvested = []
    i = 0
    while ring[i].flags & U.KVM_DIRTY_GFN_F_DIRTY:
        assert ring[i].slot == guest.SLOT
        harvested.append(ring[i].offset)
        ring[i].flags = U.KVM_DIRTY_GFN_F_RESET
        i += 1
    assert sorted(set(harvested)) == pages
    assert ring_vm.reset_dirty_rings() == len(harvested)
    assert ring_vm.reset_dirty_rings() == 0


def test_reset_dirty_rings_without_ring_einval(vm: VmFd) -> None:
    expect_errno(errno.EINVAL, vm.reset_dirty_rings)


# --- other VM ioctls -----------------------------------------------------------------------------
# x86's kvm_vm_ioctl_set_tss_addr refuses any address above (unsigned int)(-3 * PAGE_SIZE): the
# three TSS pages must end below 4 GiB.
TSS_LIMIT = (1 << 32) - 3 * PAGE_SIZE


def test_set_tss_addr_above_c_int(kvm: Kvm, vm: VmFd) -> None:
    """0xfffbd000 overflows a C int: the binding must pass it as unsigned long. The kernel
    checks the value it receives: it takes 0xfffbd000, refuses one page past its limit, and
    refuses the value a sign-extended C int would have made of 0xfffbd000."""
    vm.set_tss_addr(0xFFFBD000)
    others = [kvm.create_vm(), kvm.create_vm()]  # the address is taken once per VM
    try:
        expect_errno(errno.EINVAL, lambda: others[0].set_tss_addr(TSS_LIMIT + PAGE_SIZE),
                     "KVM_SET_TSS_ADDR")
        others[0].set_tss_addr(TSS_LIMIT)  # the last address it takes
        sign_extended = 0xFFFBD000 - (1 << 32) + (1 << 64)
        expect_errno(errno.EINVAL, lambda: ioctl(others[1].fd, U.KVM_SET_TSS_ADDR, sign_extended),
                     "KVM_SET_TSS_ADDR")
    finally:
        for o in others:
            o.close()


def test_set_identity_map_addr(vm: VmFd) -> None:
    """The kernel reads the address through a pointer to a u64 (a raw call passing a bad
    pointer gets EFAULT); the binding's call is taken. The address itself is kept for EPT
    without unrestricted guest and cannot be read back; it is refused once a vCPU exists
    (next test)."""
    expect_errno(errno.EFAULT, lambda: ioctl(vm.fd, U.KVM_SET_IDENTITY_MAP_ADDR, 0),
                 "KVM_SET_IDENTITY_MAP_ADDR")
    vm.set_identity_map_addr(0xFEFFC000)


def test_set_identity_map_addr_after_vcpu_einval(vm: VmFd, vcpu: VcpuFd) -> None:
    expect_errno(errno.EINVAL, lambda: vm.set_identity_map_addr(0xFEFFC000),
                 "KVM_SET_IDENTITY_MAP_ADDR")


def test_create_irqchip(kvm: Kvm, vm: VmFd, make_vcpu: Callable[..., VcpuFd]) -> None:
    """With the in-kernel irqchip, a new vCPU has a LAPIC the kernel emulates: KVM_GET_LAPIC
    returns it, with the vCPU's id in the APIC ID register (0x20, bits 24-31). Without it
    the kernel has no LAPIC for the vCPU (EINVAL)."""
    vm.create_irqchip()
    v = make_vcpu(vm, 3)
    regs = bytes(v.get_lapic())
    assert int.from_bytes(regs[0x20:0x24], "little") >> 24 == 3
    plain = kvm.create_vm()
    try:
        expect_errno(errno.EINVAL, make_vcpu(plain, 3).get_lapic, "KVM_GET_LAPIC")
    finally:
        plain.close()


def test_create_irqchip_twice_eexist(vm: VmFd) -> None:
    vm.create_irqchip()
    expect_errno(errno.EEXIST, vm.create_irqchip)


def test_get_stats_fd(vm: VmFd) -> None:
    fd = vm.get_stats_fd()
    try:
        raw = os.pread(fd, C.sizeof(U.kvm_stats_header), 0)
        hdr = U.kvm_stats_header.from_buffer_copy(raw)
        assert hdr.num_desc > 0 and hdr.name_size > 0
        ident = os.pread(fd, hdr.name_size, hdr.id_offset).split(b"\0")[0]
        assert ident.startswith(b"kvm-")
    finally:
        os.close(fd)


def test_create_vcpu(vm: VmFd, make_vcpu: Callable[..., VcpuFd], kvm: Kvm) -> None:
    v = make_vcpu(vm, 0)
    assert isinstance(v, VcpuFd)
    assert v.fd >= 0 and v.vm is vm and v.id == 0
    assert v.ring_map is None
    assert v._run_map.size == kvm.get_vcpu_mmap_size()


def test_create_vcpu_duplicate_id_eexist(vm: VmFd, make_vcpu: Callable[..., VcpuFd]) -> None:
    make_vcpu(vm, 0)
    expect_errno(errno.EEXIST, lambda: make_vcpu(vm, 0))


def test_create_vcpu_id_out_of_range_einval(vm: VmFd, make_vcpu: Callable[..., VcpuFd]) -> None:
    max_id = vm.check_extension_int(Cap.MAX_VCPUS)
    expect_errno(errno.EINVAL, lambda: make_vcpu(vm, max_id * 4 + 100))


def test_close_is_idempotent(kvm: Kvm) -> None:
    vm = kvm.create_vm()
    vm.close()
    assert vm.fd == -1
    vm.close()
