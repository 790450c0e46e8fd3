"""``VmFd`` against the real /dev/kvm: one test per method, the dirty-ring enable rules and
errors the kernel documents (virt/kvm/kvm_main.c ``kvm_vm_ioctl_enable_dirty_log_ring``) and the
ring/bitmap exclusivity. The bad-fd tests are in tests/unit/bindings/test_bindings_errors.py."""
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
from dirtyring.errors import KvmError

RING_MAX_BYTES = 65536 * 16


def expect_errno(err: int, call: Callable[[], Any], ioctl: str | None = None) -> KvmError:
    with pytest.raises(KvmError) as ei:
        call()
    assert ei.value.errno == err, f"expected {errno.errorcode[err]}, got {ei.value}"
    if ioctl is not None:
        assert ei.value.ioctl == ioctl
    return ei.value


# --- check_extension_int ------------------------------------------------------------------------
def test_check_extension_int_per_vm(vm: VmFd, kvm: Kvm) -> None:
    assert vm.check_extension_int(Cap.NR_VCPUS) >= 1
    assert vm.check_extension_int(Cap.MAX_VCPUS) >= vm.check_extension_int(Cap.NR_VCPUS)
    assert vm.check_extension_int(Cap.XSAVE2) >= 4096
    assert vm.check_extension_int(Cap.DIRTY_LOG_RING) == RING_MAX_BYTES
    assert vm.check_extension_int(100_000) == 0


# --- memory slots -------------------------------------------------------------------------------
def test_set_user_memory_region(vm: VmFd, guest_mem: Any, guest: Any) -> None:
    vm.set_user_memory_region(0, 0, guest.SLOT_BYTES, guest_mem.map.addr)
    # Changing only the flags of an existing slot is allowed (turn dirty logging on).
    vm.set_user_memory_region(0, 0, guest.SLOT_BYTES, guest_mem.map.addr,
                              U.KVM_MEM_LOG_DIRTY_PAGES)
    # memory_size 0 deletes the slot; a new one may then take its place.
    vm.set_user_memory_region(0, 0, 0, 0)
    vm.set_user_memory_region(0, 0x100000, guest.SLOT_BYTES, guest_mem.map.addr)


def test_set_user_memory_region_second_slot(vm: VmFd, guest_mem: Any, guest: Any) -> None:
    half = guest.SLOT_BYTES // 2
    vm.set_user_memory_region(0, 0, half, guest_mem.map.addr)
    vm.set_user_memory_region(1, half, half, guest_mem.map.addr + half)


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
def test_enable_cap(vm: VmFd) -> None:
    vm.enable_cap(Cap.MANUAL_DIRTY_LOG_PROTECT2, U.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)


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
def test_enable_dirty_log_ring(vm: VmFd, size: int) -> None:
    vm.enable_dirty_log_ring(size)
    assert vm.dirty_ring_bytes == size


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
def test_enable_dirty_log_ring_bad_size_einval(vm: VmFd, size: int) -> None:
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


def test_enable_dirty_log_ring_kernel_truncates_size_to_u32(vm: VmFd) -> None:
    """The kernel reads args[0] as u32: 1 << 32 arrives as 0 (EINVAL, not E2BIG). The wrapper
    does not guard against this (see tests/unit/bindings/test_bindings_validation.py)."""
    expect_errno(errno.EINVAL, lambda: vm.enable_dirty_log_ring(1 << 32), "KVM_ENABLE_CAP")
    assert vm.dirty_ring_bytes == 0


# --- manual protect ---------------------------------------------------------------------------
def test_enable_manual_dirty_log_protect(vm: VmFd) -> None:
    vm.enable_manual_dirty_log_protect()
    assert vm.manual_protect is True


def test_enable_manual_dirty_log_protect_after_ring_is_allowed(ring_vm: VmFd) -> None:
    """The kernel accepts the cap; the bitmap ioctls stay refused (see exclusivity)."""
    ring_vm.enable_manual_dirty_log_protect()


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


def test_bitmap_still_works_on_another_vm(ring_vm: VmFd, vm: VmFd, guest_mem: Any,
                                          guest: Any) -> None:
    guest.add_slot(vm, guest_mem)
    bitmap = np.zeros(1, np.uint64)
    vm.get_dirty_log(guest.SLOT, bitmap)


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
def test_set_tss_addr_above_c_int(vm: VmFd) -> None:
    """0xfffbd000 overflows a C int: the binding must pass it as unsigned long."""
    vm.set_tss_addr(0xFFFBD000)


def test_set_identity_map_addr(vm: VmFd) -> None:
    vm.set_identity_map_addr(0xFEFFC000)


def test_set_identity_map_addr_after_vcpu_einval(vm: VmFd, vcpu: VcpuFd) -> None:
    expect_errno(errno.EINVAL, lambda: vm.set_identity_map_addr(0xFEFFC000),
                 "KVM_SET_IDENTITY_MAP_ADDR")


def test_create_irqchip(vm: VmFd) -> None:
    vm.create_irqchip()


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
