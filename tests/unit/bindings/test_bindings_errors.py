"""KvmError and the bad-fd tests (style guide 14, kvm-ioctls ``test_faulty_vm_fd``).

Every ioctl-wrapping method of ``Kvm``, ``VmFd`` and ``VcpuFd`` is called on fd -2 and must
raise :class:`KvmError` with errno EBADF, naming the ioctl. No /dev/kvm is needed: the kernel
rejects fd -2 before any driver is involved, so these run everywhere.
"""
from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from dirtyring._bindings import Cap, Kvm, VcpuFd, VmFd
from dirtyring._bindings import _uapi as U
from dirtyring._bindings._ioctl import ioctl, ioctl_name, ioctl_nocheck
from dirtyring.errors import KvmUnavailable, DirtyringError, KvmError

BUG_IO_NAMES = ("BUG: _uapi.IOCTL_NAMES keeps only values > 0xFFFF, which drops every _IO() "
                "ioctl (0xAE00..0xAEFF), so KvmError says e.g. 'ioctl 0xaec7 failed' instead "
                "of 'KVM_RESET_DIRTY_RINGS failed'")

#: ioctls encoded with _IO(): their numbers are <= 0xFFFF.
IO_IOCTLS = frozenset({
    "KVM_GET_API_VERSION", "KVM_CREATE_VM", "KVM_CHECK_EXTENSION", "KVM_GET_VCPU_MMAP_SIZE",
    "KVM_CREATE_VCPU", "KVM_SET_TSS_ADDR", "KVM_CREATE_IRQCHIP", "KVM_RESET_DIRTY_RINGS",
    "KVM_GET_STATS_FD", "KVM_RUN", "KVM_GET_TSC_KHZ",
})


# --- KvmError ---------------------------------------------------------------------------------------
def test_kvm_error_message_names_ioctl_and_errno() -> None:
    e = KvmError("KVM_ENABLE_CAP", errno.EINVAL)
    assert str(e) == "KVM_ENABLE_CAP failed: EINVAL (Invalid argument)"
    assert e.errno == errno.EINVAL and e.ioctl == "KVM_ENABLE_CAP" and e.hint == ""
    assert isinstance(e, OSError) and isinstance(e, DirtyringError)


def test_kvm_error_hint_is_appended() -> None:
    e = KvmError("KVM_SET_MSRS", errno.EINVAL, "MSR 0x10 refused")
    assert str(e) == "KVM_SET_MSRS failed: EINVAL (Invalid argument): MSR 0x10 refused"


def test_kvm_error_unknown_errno() -> None:
    e = KvmError("KVM_RUN", 4095)
    assert e.errno == 4095 and str(e).startswith("KVM_RUN failed: 4095 (")


def test_ioctl_name_falls_back_to_hex() -> None:
    assert ioctl_name(0x1234) == "ioctl 0x1234"
    assert ioctl_name(U.KVM_ENABLE_CAP) == "KVM_ENABLE_CAP"


def test_ioctl_name_of_io_ioctl() -> None:
    assert ioctl_name(U.KVM_RESET_DIRTY_RINGS) == "KVM_RESET_DIRTY_RINGS"


def test_ioctl_explicit_name_wins() -> None:
    with pytest.raises(KvmError) as ei:
        ioctl(-2, U.KVM_RESET_DIRTY_RINGS, name="KVM_RESET_DIRTY_RINGS")
    assert ei.value.ioctl == "KVM_RESET_DIRTY_RINGS" and ei.value.errno == errno.EBADF


def test_ioctl_nocheck_returns_errno() -> None:
    assert ioctl_nocheck(-2, U.KVM_RUN) == (-1, errno.EBADF)


# --- Kvm.__init__ on something that is not KVM ------------------------------------------------
def _open_fds() -> dict[int, str]:
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except FileNotFoundError:  # the fd listdir itself used, closed by now
            pass
    return out


def _open_dev_null_as_kvm() -> tuple[KvmUnavailable, set[int]]:
    """Kvm('/dev/null') opens fine, then KVM_GET_API_VERSION fails (ENOTTY), reported as "not a
    KVM device". Returns the error and the fds it left open (closed here, so nothing leaks)."""
    before = _open_fds()
    with pytest.raises(KvmUnavailable) as ei:
        Kvm("/dev/null")
    leaked = {fd for fd, t in _open_fds().items() if t == "/dev/null" and before.get(fd) != t}
    for fd in leaked:
        os.close(fd)
    return ei.value, leaked


def test_init_on_non_kvm_device_raises_enotty() -> None:
    err, _ = _open_dev_null_as_kvm()
    assert "not a KVM device" in str(err) and "ENOTTY" in str(err)


def test_init_on_non_kvm_device_closes_its_fd() -> None:
    _, leaked = _open_dev_null_as_kvm()
    assert not leaked


# --- bad fd: Kvm ------------------------------------------------------------------------------------
KVM_METHODS: list[tuple[str, Callable[[Kvm], Any], str]] = [
    ("get_api_version", lambda k: k.get_api_version(), "KVM_GET_API_VERSION"),
    ("check_extension_int", lambda k: k.check_extension_int(Cap.USER_MEMORY),
     "KVM_CHECK_EXTENSION"),
    ("check_extension", lambda k: k.check_extension(Cap.USER_MEMORY), "KVM_CHECK_EXTENSION"),
    ("get_vcpu_mmap_size", lambda k: k.get_vcpu_mmap_size(), "KVM_GET_VCPU_MMAP_SIZE"),
    ("get_supported_cpuid", lambda k: k.get_supported_cpuid(), "KVM_GET_SUPPORTED_CPUID"),
    ("get_msr_index_list", lambda k: k.get_msr_index_list(), "KVM_GET_MSR_INDEX_LIST"),
    ("create_vm", lambda k: k.create_vm(), "KVM_CREATE_VM"),
]

# --- bad fd: VmFd ------------------------------------------------------------------------------------
_BM = np.zeros(1, np.uint64)
VM_METHODS: list[tuple[str, Callable[[VmFd], Any], str]] = [
    ("check_extension_int", lambda v: v.check_extension_int(Cap.USER_MEMORY),
     "KVM_CHECK_EXTENSION"),
    ("set_user_memory_region", lambda v: v.set_user_memory_region(0, 0, 0, 0),
     "KVM_SET_USER_MEMORY_REGION"),
    ("enable_cap", lambda v: v.enable_cap(Cap.DIRTY_LOG_RING, 4096), "KVM_ENABLE_CAP"),
    ("enable_dirty_log_ring", lambda v: v.enable_dirty_log_ring(4096), "KVM_ENABLE_CAP"),
    ("enable_manual_dirty_log_protect", lambda v: v.enable_manual_dirty_log_protect(),
     "KVM_ENABLE_CAP"),
    ("get_dirty_log", lambda v: v.get_dirty_log(0, _BM), "KVM_GET_DIRTY_LOG"),
    ("clear_dirty_log", lambda v: v.clear_dirty_log(0, 0, 64, _BM), "KVM_CLEAR_DIRTY_LOG"),
    ("reset_dirty_rings", lambda v: v.reset_dirty_rings(), "KVM_RESET_DIRTY_RINGS"),
    ("set_tss_addr", lambda v: v.set_tss_addr(0xFFFBD000), "KVM_SET_TSS_ADDR"),
    ("set_identity_map_addr", lambda v: v.set_identity_map_addr(0xFEFFC000),
     "KVM_SET_IDENTITY_MAP_ADDR"),
    ("create_irqchip", lambda v: v.create_irqchip(), "KVM_CREATE_IRQCHIP"),
    ("get_stats_fd", lambda v: v.get_stats_fd(), "KVM_GET_STATS_FD"),
    ("create_vcpu", lambda v: v.create_vcpu(0), "KVM_CREATE_VCPU"),
]

# --- bad fd: VcpuFd ----------------------------------------------------------------------------------
VCPU_METHODS: list[tuple[str, Callable[[VcpuFd], Any], str]] = [
    ("run", lambda v: v.run(), "KVM_RUN"),
    ("get_regs", lambda v: v.get_regs(), "KVM_GET_REGS"),
    ("set_regs", lambda v: v.set_regs(U.kvm_regs()), "KVM_SET_REGS"),
    ("get_sregs", lambda v: v.get_sregs(), "KVM_GET_SREGS"),
    ("set_sregs", lambda v: v.set_sregs(U.kvm_sregs()), "KVM_SET_SREGS"),
    ("get_fpu", lambda v: v.get_fpu(), "KVM_GET_FPU"),
    ("set_fpu", lambda v: v.set_fpu(U.kvm_fpu()), "KVM_SET_FPU"),
    ("get_xsave", lambda v: v.get_xsave(), "KVM_GET_XSAVE"),
    ("set_xsave", lambda v: v.set_xsave(U.kvm_xsave()), "KVM_SET_XSAVE"),
    ("get_xcrs", lambda v: v.get_xcrs(), "KVM_GET_XCRS"),
    ("set_xcrs", lambda v: v.set_xcrs(U.kvm_xcrs()), "KVM_SET_XCRS"),
    ("get_msrs", lambda v: v.get_msrs([U.MSR_IA32_TSC]), "KVM_GET_MSRS"),
    ("get_tsc", lambda v: v.get_tsc(), "KVM_GET_MSRS"),
    ("set_msrs", lambda v: v.set_msrs({U.MSR_IA32_TSC: 0}), "KVM_SET_MSRS"),
    ("get_lapic", lambda v: v.get_lapic(), "KVM_GET_LAPIC"),
    ("set_lapic", lambda v: v.set_lapic(U.kvm_lapic_state()), "KVM_SET_LAPIC"),
    ("get_vcpu_events", lambda v: v.get_vcpu_events(), "KVM_GET_VCPU_EVENTS"),
    ("set_vcpu_events", lambda v: v.set_vcpu_events(U.kvm_vcpu_events()),
     "KVM_SET_VCPU_EVENTS"),
    ("get_mp_state", lambda v: v.get_mp_state(), "KVM_GET_MP_STATE"),
    ("set_mp_state", lambda v: v.set_mp_state(0), "KVM_SET_MP_STATE"),
    ("set_cpuid2", lambda v: v.set_cpuid2(U.cpuid_buffer(1)[0]), "KVM_SET_CPUID2"),
    ("set_signal_mask", lambda v: v.set_signal_mask(set()), "KVM_SET_SIGNAL_MASK"),
    ("get_tsc_khz", lambda v: v.get_tsc_khz(), "KVM_GET_TSC_KHZ"),
    ("tsc_offset", lambda v: v.tsc_offset(), "KVM_GET_DEVICE_ATTR"),
]


def _bad_kvm() -> Kvm:
    return Kvm.from_fd(-2)


def _bad_vm() -> VmFd:
    return VmFd(-2, _bad_kvm())


def _bad_vcpu() -> VcpuFd:
    """VcpuFd's constructor mmaps the fd, so build one by hand around fd -2."""
    v = object.__new__(VcpuFd)
    v.fd = -2
    v.vm = _bad_vm()
    v.id = 0
    return v


CASES: list[tuple[str, Callable[[], Any], Callable[[Any], Any], str]] = (
    [(f"Kvm.{i}", _bad_kvm, c, n) for i, c, n in KVM_METHODS]
    + [(f"VmFd.{i}", _bad_vm, c, n) for i, c, n in VM_METHODS]
    + [(f"VcpuFd.{i}", _bad_vcpu, c, n) for i, c, n in VCPU_METHODS]
)


@pytest.mark.parametrize(("make", "call"), [pytest.param(m, c, id=i) for i, m, c, _ in CASES])
def test_bad_fd_every_method_raises_ebadf(make: Callable[[], Any],
                                          call: Callable[[Any], Any]) -> None:
    obj = make()
    with pytest.raises(KvmError) as ei:
        call(obj)
    assert ei.value.errno == errno.EBADF
    assert "EBADF" in str(ei.value)
    if isinstance(obj, VmFd):  # state is updated only after the ioctl succeeded
        assert obj.dirty_ring_bytes == 0 and obj.manual_protect is False


@pytest.mark.parametrize(
    ("make", "call", "name"),
    [pytest.param(m, c, n, id=i) for i, m, c, n in CASES])
def test_bad_fd_error_names_the_ioctl(make: Callable[[], Any], call: Callable[[Any], Any],
                                      name: str) -> None:
    with pytest.raises(KvmError) as ei:
        call(make())
    assert ei.value.ioctl == name
    assert str(ei.value) == f"{name} failed: EBADF (Bad file descriptor)"


@pytest.mark.parametrize(("cls", "table", "not_ioctls"), [
    (Kvm, KVM_METHODS, {"close", "from_fd"}),
    # (the *_request / tsc_result helpers only build or read kept ioctl arguments)
    (VmFd, VM_METHODS, {"close", "dirty_log_request"}),
    (VcpuFd, VCPU_METHODS, {"close", "io_data", "tsc_request", "tsc_result",
                            "tsc_result_address"}),
], ids=["Kvm", "VmFd", "VcpuFd"])
def test_every_public_method_is_in_the_bad_fd_table(cls: type, table: list[Any],
                                                    not_ioctls: set[str]) -> None:
    public = {n for n, v in vars(cls).items()
              if not n.startswith("_") and (callable(v) or isinstance(v, classmethod))}
    assert public - {m[0] for m in table} == not_ioctls


def test_close_on_bad_fd_objects_is_harmless() -> None:
    _bad_kvm().close()
    _bad_vm().close()
