"""``Kvm`` (system ioctls on /dev/kvm) against the real device: one test per method and
negative cases. The bad-fd tests (no device needed) are in
tests/unit/bindings/test_bindings_errors.py."""
from __future__ import annotations

import ctypes as C
import errno

import pytest

from dirtyring._bindings import PAGE_SIZE, Cap, Kvm, VmFd
from dirtyring._bindings import _uapi as U
from dirtyring.errors import KvmError, KvmUnavailable

#: KVM_DIRTY_RING_MAX_ENTRIES (65536) * sizeof(struct kvm_dirty_gfn): what the capability reports.
RING_MAX_BYTES = 65536 * 16


def test_init_opens_dev_kvm(kvm: Kvm) -> None:
    assert kvm.fd >= 0 and kvm.path == "/dev/kvm"


def test_init_missing_path_raises_kvm_unavailable() -> None:
    with pytest.raises(KvmUnavailable, match="does not exist"):
        Kvm("/nonexistent/kvm")


def test_get_api_version(kvm: Kvm) -> None:
    assert kvm.get_api_version() == U.KVM_API_VERSION == 12


def test_check_extension_int_user_memory(kvm: Kvm) -> None:
    assert kvm.check_extension_int(Cap.USER_MEMORY) == 1


def test_check_extension_int_dirty_log_ring_is_max_bytes(kvm: Kvm) -> None:
    """The ring capabilities report the maximum ring size in bytes, not 1."""
    assert kvm.check_extension_int(Cap.DIRTY_LOG_RING) == RING_MAX_BYTES
    assert kvm.check_extension_int(Cap.DIRTY_LOG_RING_ACQ_REL) == RING_MAX_BYTES


def test_check_extension_int_ring_with_bitmap_is_zero_on_x86(kvm: Kvm) -> None:
    assert kvm.check_extension_int(Cap.DIRTY_LOG_RING_WITH_BITMAP) == 0


def test_check_extension_int_manual_protect_flags(kvm: Kvm) -> None:
    assert kvm.check_extension_int(Cap.MANUAL_DIRTY_LOG_PROTECT2) == (
        U.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | U.KVM_DIRTY_LOG_INITIALLY_SET)


def test_check_extension_int_accepts_plain_int(kvm: Kvm) -> None:
    assert kvm.check_extension_int(int(Cap.IMMEDIATE_EXIT)) == 1


def test_check_extension_unknown_cap_is_zero_not_error(kvm: Kvm) -> None:
    assert kvm.check_extension_int(100_000) == 0
    assert kvm.check_extension(100_000) is False


def test_check_extension(kvm: Kvm) -> None:
    assert kvm.check_extension(Cap.DIRTY_LOG_RING) is True
    assert kvm.check_extension(Cap.DIRTY_LOG_RING_WITH_BITMAP) is False


def test_get_vcpu_mmap_size(kvm: Kvm) -> None:
    """x86: the kvm_run page, the PIO data page and the coalesced-MMIO ring page."""
    size = kvm.get_vcpu_mmap_size()
    assert size == 3 * PAGE_SIZE
    assert size >= C.sizeof(U.kvm_run)


def test_get_supported_cpuid(kvm: Kvm) -> None:
    buf = kvm.get_supported_cpuid()
    nent = U.kvm_cpuid2.from_buffer(buf).nent
    assert 0 < nent <= 256
    entries = (U.kvm_cpuid_entry2 * nent).from_buffer(buf, C.sizeof(U.kvm_cpuid2))
    by_leaf = {(e.function, e.index): e for e in entries}
    assert (0, 0) in by_leaf
    sig = by_leaf[(0x40000000, 0)]
    assert b"".join(r.to_bytes(4, "little") for r in (sig.ebx, sig.ecx, sig.edx)) == (
        b"KVMKVMKVM\0\0\0")


def test_get_supported_cpuid_too_small_raises_e2big(kvm: Kvm) -> None:
    with pytest.raises(KvmError) as ei:
        kvm.get_supported_cpuid(max_entries=1)
    assert ei.value.errno == errno.E2BIG
    assert ei.value.ioctl == "KVM_GET_SUPPORTED_CPUID"


def test_get_msr_index_list(kvm: Kvm) -> None:
    msrs = kvm.get_msr_index_list()
    assert len(msrs) == len(set(msrs)) > 0
    assert {U.MSR_IA32_TSC, U.MSR_IA32_SYSENTER_CS, U.MSR_STAR, U.MSR_LSTAR,
            U.MSR_KVM_SYSTEM_TIME_NEW, U.MSR_KVM_STEAL_TIME} <= set(msrs)


def test_create_vm(kvm: Kvm) -> None:
    vm = kvm.create_vm()
    try:
        assert isinstance(vm, VmFd)
        assert vm.fd >= 0 and vm.fd != kvm.fd
        assert vm.kvm is kvm
        assert vm.dirty_ring_bytes == 0 and vm.manual_protect is False
    finally:
        vm.close()


def test_create_two_vms_coexist(kvm: Kvm) -> None:
    """Two VMs from one /dev/kvm fd are separate: each takes a vCPU 0 (a second one in the
    same VM is EEXIST), and closing one leaves the other working."""
    a = kvm.create_vm()
    try:
        b = kvm.create_vm()
        try:
            va, vb = a.create_vcpu(0), b.create_vcpu(0)
            va.close()
            vb.close()
        finally:
            b.close()
        with pytest.raises(KvmError) as ei:
            a.create_vcpu(0).close()  # a vCPU lives as long as its VM: closing its fd keeps id 0
        assert ei.value.errno == errno.EEXIST
        a.create_vcpu(1).close()
    finally:
        a.close()


def test_close_is_idempotent() -> None:
    k = Kvm()
    k.close()
    assert k.fd == -1
    k.close()


def test_context_manager_closes() -> None:
    with Kvm() as k:
        assert k.get_api_version() == 12
    assert k.fd == -1
