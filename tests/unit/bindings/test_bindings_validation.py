"""Wrapper-level checks that need no /dev/kvm: the ioctl is replaced by a stand-in that does
what the real kernel was measured to do (see each test), so only the Python side is judged."""
from __future__ import annotations

import ctypes as C
import errno
import os
from typing import Any

import pytest

from dirtyring._bindings import PAGE_SIZE, Kvm, Mapping, MappingError, VcpuFd, VmFd
from dirtyring._bindings import _uapi as U
from dirtyring._bindings import vcpu as vcpu_mod
from dirtyring._bindings import vm as vm_mod
from dirtyring.errors import KvmError


def _fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_enable_dirty_log_ring_sends_size_in_args0(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[Any] = []

    def fake_ioctl(fd: int, request: int, arg: Any = None, **kw: Any) -> int:
        sent.append((request, U.kvm_enable_cap.from_buffer_copy(bytes(arg))))
        return 0

    monkeypatch.setattr(vm_mod, "ioctl", fake_ioctl)
    vm = VmFd(-2, Kvm.from_fd(-2))
    vm.enable_dirty_log_ring(64 * 1024)
    (request, cap), = sent
    assert request == U.KVM_ENABLE_CAP
    assert (cap.cap, cap.flags, list(cap.args)) == (U.KVM_CAP_DIRTY_LOG_RING, 0,
                                                    [64 * 1024, 0, 0, 0])
    assert vm.dirty_ring_bytes == 64 * 1024


def test_enable_manual_dirty_log_protect_never_sets_initially_set(
        monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[U.kvm_enable_cap] = []

    def fake_ioctl(fd: int, request: int, arg: Any = None, **kw: Any) -> int:
        sent.append(U.kvm_enable_cap.from_buffer_copy(bytes(arg)))
        return 0

    monkeypatch.setattr(vm_mod, "ioctl", fake_ioctl)
    vm = VmFd(-2, Kvm.from_fd(-2))
    vm.enable_manual_dirty_log_protect()
    assert sent[0].cap == U.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2
    assert sent[0].args[0] == U.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
    assert vm.manual_protect is True


@pytest.mark.parametrize("size", [(1 << 32) + PAGE_SIZE, 1 << 32, 0, -PAGE_SIZE],
                         ids=["2^32+page", "2^32", "zero", "negative"])
def test_enable_dirty_log_ring_precheck_refuses_sizes_outside_u32(
        monkeypatch: pytest.MonkeyPatch, size: int) -> None:
    """The wrapper's own pre-check, before any ioctl: the kernel reads args[0] as a u32, so it
    would take (1 << 32) + 4096 as a one-page ring (measured on /dev/kvm: see
    test_enable_dirty_log_ring_kernel_truncates_size_to_u32 in tests/kvm/bindings/
    test_bindings_vm.py). The pre-check raises the EINVAL the kernel gives a bad size, and no ioctl is made."""
    sent: list[int] = []

    def fake_ioctl(fd: int, request: int, arg: Any = None, **kw: Any) -> int:
        sent.append(request)
        return 0

    monkeypatch.setattr(vm_mod, "ioctl", fake_ioctl)
    vm = VmFd(-2, Kvm.from_fd(-2))
    with pytest.raises(KvmError) as ei:
        vm.enable_dirty_log_ring(size)
    assert (ei.value.errno, ei.value.ioctl) == (errno.EINVAL, "KVM_ENABLE_CAP")
    assert "u32" in str(ei.value)
    assert sent == []
    assert vm.dirty_ring_bytes == 0


def test_vcpu_init_releases_fd_and_run_map_when_ring_mmap_fails(
        monkeypatch: pytest.MonkeyPatch) -> None:
    fd = os.memfd_create("dirtyring-fake-vcpu", os.MFD_CLOEXEC)
    os.ftruncate(fd, PAGE_SIZE)
    made: list[Mapping] = []

    class RecordingMapping(Mapping):
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            made.append(self)

    monkeypatch.setattr(vcpu_mod, "Mapping", RecordingMapping)
    kvm = Kvm.from_fd(-2)
    monkeypatch.setattr(kvm, "get_vcpu_mmap_size", lambda: PAGE_SIZE)
    vm = VmFd(-2, kvm)
    vm.dirty_ring_bytes = 1 << 62  # no address space fits this: mmap fails with ENOMEM
    try:
        with pytest.raises(MappingError):
            VcpuFd(fd, vm, 0)
        assert len(made) == 1
        still_open, still_mapped = _fd_is_open(fd), not made[0].closed
        assert not still_open and not still_mapped
    finally:
        for m in made:
            m.close()
        if _fd_is_open(fd):
            os.close(fd)


def test_vcpu_init_maps_run_struct(monkeypatch: pytest.MonkeyPatch) -> None:
    """kvm_run is read through the mapping: exit_reason at offset 8 of the vCPU fd's page 0."""
    fd = os.memfd_create("dirtyring-fake-vcpu", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, PAGE_SIZE)
        os.pwrite(fd, (31).to_bytes(4, "little"), 8)  # KVM_EXIT_DIRTY_RING_FULL
        kvm = Kvm.from_fd(-2)
        monkeypatch.setattr(kvm, "get_vcpu_mmap_size", lambda: PAGE_SIZE)
        v = VcpuFd(fd, VmFd(-2, kvm), 0)
        try:
            assert v.run_struct.exit_reason == U.KVM_EXIT_DIRTY_RING_FULL
            assert C.addressof(v.run_struct) == v._run_map.addr
        finally:
            v.close()
        assert not _fd_is_open(fd)
    finally:
        if _fd_is_open(fd):
            os.close(fd)
