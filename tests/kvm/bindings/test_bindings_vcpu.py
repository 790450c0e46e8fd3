"""``VcpuFd`` against the real /dev/kvm: run and its exits, get/set round trips of every state
ioctl, negative cases and the dirty-ring mmap rules. The bad-fd tests are in
tests/unit/bindings/test_bindings_errors.py."""
from __future__ import annotations

import ctypes as C
import errno
import mmap
from collections.abc import Callable
from typing import Any

import pytest

from dirtyring._bindings import PAGE_SIZE, Kvm, Mapping, MappingError, VcpuFd, VmFd
from dirtyring._bindings import _uapi as U
from dirtyring.errors import KvmError

RING_OFFSET = U.KVM_DIRTY_LOG_PAGE_OFFSET * PAGE_SIZE
KVM_MP_STATE_HALTED = 3
LAPIC_TPR = 0x80


def expect_errno(err: int, call: Callable[[], Any], ioctl: str | None = None) -> KvmError:
    with pytest.raises(KvmError) as ei:
        call()
    assert ei.value.errno == err, f"expected {errno.errorcode[err]}, got {ei.value}"
    if ioctl is not None:
        assert ei.value.ioctl == ioctl
    return ei.value


@pytest.fixture
def irq_vcpu(vm: VmFd, make_vcpu: Callable[..., VcpuFd]) -> VcpuFd:
    """A vCPU with an in-kernel LAPIC (KVM_CREATE_IRQCHIP before KVM_CREATE_VCPU)."""
    vm.create_irqchip()
    return make_vcpu(vm, 0)


@pytest.fixture
def ring_vcpu(ring_vm: VmFd, make_vcpu: Callable[..., VcpuFd]) -> VcpuFd:
    return make_vcpu(ring_vm, 0)


# --- run ------------------------------------------------------------------------------------------
def test_run_io_exit_then_hlt(vm: VmFd, vcpu: VcpuFd, guest_mem: Any, guest: Any) -> None:
    guest.add_slot(vm, guest_mem, flags=0)
    guest_mem.put(guest.CODE_GPA, guest.writer_code([]))
    guest.start_real_mode(vcpu)
    assert vcpu.run() == U.KVM_EXIT_IO
    io = vcpu.run_struct.u.io
    assert (io.direction, io.size, io.port, io.count) == (U.KVM_EXIT_IO_OUT, 1, guest.DONE_PORT, 1)
    assert 0 < io.data_offset < vcpu._run_map.size
    assert bytes(vcpu.io_data(io.data_offset, io.size)) == b"\x42"
    assert vcpu.run() == U.KVM_EXIT_HLT
    assert vcpu.run_struct.exit_reason == U.KVM_EXIT_HLT
    # rip is past `hlt`: the code is 4 bytes (mov al; out) + 1 (hlt).
    assert vcpu.get_regs().rip == guest.CODE_GPA + 5


def test_run_immediate_exit_returns_intr(vm: VmFd, vcpu: VcpuFd, guest_mem: Any,
                                         guest: Any) -> None:
    guest.add_slot(vm, guest_mem, flags=0)
    guest_mem.put(guest.CODE_GPA, guest.writer_code([]))
    guest.start_real_mode(vcpu)
    vcpu.run_struct.immediate_exit = 1
    try:
        assert vcpu.run() == U.KVM_EXIT_INTR
    finally:
        vcpu.run_struct.immediate_exit = 0
    assert vcpu.get_regs().rip == guest.CODE_GPA  # nothing ran
    assert vcpu.run() == U.KVM_EXIT_IO


def test_io_data_is_inside_the_run_mapping(vcpu: VcpuFd) -> None:
    buf = vcpu.io_data(PAGE_SIZE, 4)
    assert C.addressof(buf) == vcpu._run_map.addr + PAGE_SIZE and len(buf) == 4


# --- registers --------------------------------------------------------------------------------
REG_NAMES = [f[0] for f in U.kvm_regs._fields_]


def test_regs_round_trip(vcpu: VcpuFd) -> None:
    r = vcpu.get_regs()
    assert r.rip == 0xFFF0 and r.rflags == 0x2  # x86 reset state
    for i, name in enumerate(REG_NAMES):
        setattr(r, name, 0x1111_0000_0000_0000 + i * 0x1010)
    r.rflags = 0x202
    vcpu.set_regs(r)
    got = vcpu.get_regs()
    assert {n: getattr(got, n) for n in REG_NAMES} == {n: getattr(r, n) for n in REG_NAMES}


def test_sregs_round_trip(vcpu: VcpuFd) -> None:
    s = vcpu.get_sregs()
    assert s.cs.selector == 0xF000 and s.cs.base == 0xFFFF0000  # reset state
    vcpu.set_sregs(s)
    assert bytes(vcpu.get_sregs()) == bytes(s)
    s.cr2 = 0x1234000
    s.cs.base, s.cs.selector = 0x10000, 0x1000
    s.gdt.base, s.gdt.limit = 0x5000, 0xFF
    vcpu.set_sregs(s)
    got = vcpu.get_sregs()
    assert (got.cr2, got.cs.base, got.cs.selector, got.gdt.base, got.gdt.limit) == (
        0x1234000, 0x10000, 0x1000, 0x5000, 0xFF)


@pytest.mark.parametrize(("field", "value"), [("cr0", 0x8000_0000), ("cr4", 1 << 63)],
                         ids=["cr0-PG-without-PE", "cr4-reserved-bit"])
def test_set_sregs_invalid_einval(vcpu: VcpuFd, field: str, value: int) -> None:
    s = vcpu.get_sregs()
    setattr(s, field, value)
    expect_errno(errno.EINVAL, lambda: vcpu.set_sregs(s), "KVM_SET_SREGS")


def test_fpu_round_trip(vcpu: VcpuFd) -> None:
    """KVM_GET/SET_FPU carry x87 and XMM state. (They never transfer mxcsr: the kernel's
    kvm_arch_vcpu_ioctl_{get,set}_fpu skip it, so it is not compared.)"""
    f = vcpu.get_fpu()
    assert f.fcw == 0x37F  # FNINIT state
    f.fcw = 0x27F
    f.fpr[0][:] = list(range(16))
    f.xmm[1][:] = [0xA5] * 16
    f.last_ip = 0x1234
    vcpu.set_fpu(f)
    got = vcpu.get_fpu()
    assert got.fcw == 0x27F and list(got.fpr[0]) == list(range(16))
    assert list(got.xmm[1]) == [0xA5] * 16 and got.last_ip == 0x1234


def test_xsave_round_trip(vcpu: VcpuFd) -> None:
    x = vcpu.get_xsave()
    assert x.region[6] == 0x1F80  # legacy area: MXCSR default
    vcpu.set_xsave(x)
    assert bytes(vcpu.get_xsave()) == bytes(x)
    x.region[0] = (x.region[0] & ~0xFFFF) | 0x27F  # FCW
    x.region[128] |= 1  # XSTATE_BV: x87 state present
    vcpu.set_xsave(x)
    got = vcpu.get_xsave()
    assert got.region[0] & 0xFFFF == 0x27F and got.region[128] & 1
    assert vcpu.get_fpu().fcw == 0x27F


def test_set_xsave_unsupported_feature_einval(vcpu: VcpuFd) -> None:
    x = vcpu.get_xsave()
    x.region[128] = x.region[129] = 0xFFFFFFFF  # XSTATE_BV: every feature, supported or not
    expect_errno(errno.EINVAL, lambda: vcpu.set_xsave(x), "KVM_SET_XSAVE")


def test_xcrs_round_trip(vcpu: VcpuFd) -> None:
    x = vcpu.get_xcrs()
    assert x.nr_xcrs == 1 and x.xcrs[0].xcr == 0 and x.xcrs[0].value & 1  # XCR0.x87
    vcpu.set_xcrs(x)
    got = vcpu.get_xcrs()
    assert (got.nr_xcrs, got.xcrs[0].xcr, got.xcrs[0].value) == (1, 0, x.xcrs[0].value)


@pytest.mark.parametrize("value", [0, 2], ids=["no-x87", "sse-without-x87"])
def test_set_xcrs_invalid_xcr0_einval(vcpu: VcpuFd, value: int) -> None:
    x = vcpu.get_xcrs()
    x.xcrs[0].value = value
    expect_errno(errno.EINVAL, lambda: vcpu.set_xcrs(x), "KVM_SET_XCRS")


# --- MSRs ---------------------------------------------------------------------------------------
def test_msrs_round_trip(vcpu: VcpuFd) -> None:
    values = {U.MSR_IA32_SYSENTER_CS: 0x10, U.MSR_IA32_SYSENTER_ESP: 0x1234_5000,
              U.MSR_IA32_SYSENTER_EIP: 0xFFFF_8000_0000_1000}
    assert vcpu.set_msrs(values) == 3
    assert vcpu.get_msrs(list(values)) == values


def test_get_tsc_is_the_tsc_msr(vcpu: VcpuFd) -> None:
    a = vcpu.get_msrs([U.MSR_IA32_TSC])[U.MSR_IA32_TSC]
    b = vcpu.get_tsc()
    c = vcpu.get_tsc()  # the kept buffer is read afresh each time
    d = vcpu.get_msrs([U.MSR_IA32_TSC])[U.MSR_IA32_TSC]
    assert a <= b <= c <= d
    assert d - a < 1 << 36  # the same clock, not some other MSR


def test_get_msrs_stops_at_first_unknown(vcpu: VcpuFd) -> None:
    vcpu.set_msrs({U.MSR_IA32_SYSENTER_CS: 0x10})
    assert vcpu.get_msrs([U.MSR_IA32_SYSENTER_CS, 0xDEADBEEF, U.MSR_IA32_SYSENTER_ESP]) == {
        U.MSR_IA32_SYSENTER_CS: 0x10}
    assert vcpu.get_msrs([0xDEADBEEF]) == {}


def test_set_msrs_unknown_raises_with_the_msr(vcpu: VcpuFd) -> None:
    e = expect_errno(errno.EINVAL, lambda: vcpu.set_msrs({U.MSR_IA32_SYSENTER_CS: 1,
                                                          0xDEADBEEF: 1}), "KVM_SET_MSRS")
    assert "0xdeadbeef" in str(e) and "EINVAL" in str(e)


# --- LAPIC -------------------------------------------------------------------------------------
def test_lapic_round_trip(irq_vcpu: VcpuFd) -> None:
    """Read the state as bytes: ``regs`` is ``char[1024]`` and ctypes returns a c_char array
    field as bytes cut at the first NUL, so ``s.regs`` is not the register page."""
    s = irq_vcpu.get_lapic()
    raw = bytearray(bytes(s))
    assert len(raw) == U.KVM_APIC_REG_SIZE
    assert raw[0x30] == 0x14  # APIC version register: integrated APIC, version 0x14
    raw[LAPIC_TPR] = 0x20
    irq_vcpu.set_lapic(U.kvm_lapic_state.from_buffer_copy(raw))
    assert bytes(irq_vcpu.get_lapic())[LAPIC_TPR] == 0x20


def test_lapic_without_irqchip_einval(vcpu: VcpuFd) -> None:
    expect_errno(errno.EINVAL, vcpu.get_lapic, "KVM_GET_LAPIC")
    expect_errno(errno.EINVAL, lambda: vcpu.set_lapic(U.kvm_lapic_state()), "KVM_SET_LAPIC")


# --- events, mp state, cpuid, tsc ----------------------------------------------------------------
def test_vcpu_events_round_trip(vcpu: VcpuFd) -> None:
    e = vcpu.get_vcpu_events()
    vcpu.set_vcpu_events(e)
    assert bytes(vcpu.get_vcpu_events()) == bytes(e)
    e.nmi.masked = 1
    vcpu.set_vcpu_events(e)
    assert vcpu.get_vcpu_events().nmi.masked == 1


def test_set_vcpu_events_unknown_flag_einval(vcpu: VcpuFd) -> None:
    e = vcpu.get_vcpu_events()
    e.flags = 0x8000_0000
    expect_errno(errno.EINVAL, lambda: vcpu.set_vcpu_events(e), "KVM_SET_VCPU_EVENTS")


def test_mp_state_round_trip(irq_vcpu: VcpuFd) -> None:
    assert irq_vcpu.get_mp_state() == U.KVM_MP_STATE_RUNNABLE
    irq_vcpu.set_mp_state(KVM_MP_STATE_HALTED)
    assert irq_vcpu.get_mp_state() == KVM_MP_STATE_HALTED
    irq_vcpu.set_mp_state(U.KVM_MP_STATE_RUNNABLE)
    assert irq_vcpu.get_mp_state() == U.KVM_MP_STATE_RUNNABLE


def test_set_mp_state_invalid_einval(irq_vcpu: VcpuFd) -> None:
    expect_errno(errno.EINVAL, lambda: irq_vcpu.set_mp_state(100), "KVM_SET_MP_STATE")


def test_set_mp_state_halted_without_irqchip_einval(vcpu: VcpuFd) -> None:
    assert vcpu.get_mp_state() == U.KVM_MP_STATE_RUNNABLE
    expect_errno(errno.EINVAL, lambda: vcpu.set_mp_state(KVM_MP_STATE_HALTED))


def test_set_cpuid2(kvm: Kvm, vm: VmFd, vcpu: VcpuFd, guest_mem: Any, guest: Any) -> None:
    """The guest's CPUID answers from the table we set: leaf 0 with its vendor's first four
    bytes replaced reads back, in the guest, as we wrote it."""
    buf = kvm.get_supported_cpuid()
    hdr = U.kvm_cpuid2.from_buffer(buf)
    # SAFETY: buf holds the header then hdr.nent entries (U.cpuid_buffer's layout).
    entries = (U.kvm_cpuid_entry2 * hdr.nent).from_address(C.addressof(buf) + C.sizeof(hdr))
    leaf0 = next(e for e in entries if e.function == 0)
    leaf0.ebx = int.from_bytes(b"Dirt", "little")
    vcpu.set_cpuid2(buf)
    guest.add_slot(vm, guest_mem, flags=0)
    # xor eax, eax (32-bit operand); cpuid; out DONE_PORT, al; hlt
    guest_mem.put(guest.CODE_GPA, bytes([0x66, 0x31, 0xC0, 0x0F, 0xA2, 0xE6, guest.DONE_PORT,
                                         0xF4]))
    guest.start_real_mode(vcpu)
    assert vcpu.run() == U.KVM_EXIT_IO
    r = vcpu.get_regs()
    assert (r.rax & 0xFFFFFFFF, r.rbx & 0xFFFFFFFF, r.rcx & 0xFFFFFFFF, r.rdx & 0xFFFFFFFF) == \
        (leaf0.eax, int.from_bytes(b"Dirt", "little"), leaf0.ecx, leaf0.edx)


def test_set_cpuid2_too_many_entries_e2big(vcpu: VcpuFd) -> None:
    buf, _ = U.cpuid_buffer(300)  # KVM_MAX_CPUID_ENTRIES is 256
    expect_errno(errno.E2BIG, lambda: vcpu.set_cpuid2(buf), "KVM_SET_CPUID2")


def test_get_tsc_khz(vcpu: VcpuFd) -> None:
    assert 100_000 < vcpu.get_tsc_khz() < 10_000_000  # 100 MHz .. 10 GHz


# --- the dirty ring mapping ------------------------------------------------------------------------
def test_ring_mapping_shared_rw_works(ring_vcpu: VcpuFd, guest: Any) -> None:
    assert ring_vcpu.ring_map is not None
    m = mmap.mmap(ring_vcpu.fd, guest.RING_BYTES, flags=mmap.MAP_SHARED,
                  prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=RING_OFFSET)
    try:
        assert m[:16] == bytes(16)
        assert len(ring_vcpu.ring_map.array()) == guest.RING_BYTES
    finally:
        m.close()


@pytest.mark.parametrize("prot", [mmap.PROT_READ | mmap.PROT_WRITE, mmap.PROT_READ],
                         ids=["rw", "ro"])
def test_ring_mapping_private_refused_einval(ring_vcpu: VcpuFd, prot: int) -> None:
    with pytest.raises(OSError) as ei:
        mmap.mmap(ring_vcpu.fd, PAGE_SIZE, flags=mmap.MAP_PRIVATE, prot=prot,
                  offset=RING_OFFSET).close()
    assert ei.value.errno == errno.EINVAL


def test_run_page_private_mapping_is_allowed(ring_vcpu: VcpuFd) -> None:
    """Contrast: the private refusal above is KVM's ring rule, not a blanket one: a private
    mapping of the vCPU's kvm_run page is made, and reads KVM's page."""
    m = mmap.mmap(ring_vcpu.fd, PAGE_SIZE, flags=mmap.MAP_PRIVATE,
                  prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
    try:
        assert m[:PAGE_SIZE] == C.string_at(ring_vcpu._run_map.addr, PAGE_SIZE)
    finally:
        m.close()


def test_ring_mapping_exec_refused(ring_vcpu: VcpuFd, guest: Any) -> None:
    """PROT_EXEC is refused. On this 6.18 host the VFS already refuses it with EPERM (the KVM
    fds are anon inodes on a noexec mount), before KVM's own check (EINVAL) is reached."""
    rwx = mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC
    with pytest.raises(MappingError, match=r"offset 0x40000 failed: Operation not permitted"):
        Mapping(ring_vcpu.fd, guest.RING_BYTES, offset=RING_OFFSET, prot=rwx)
    with pytest.raises(OSError) as ei:
        mmap.mmap(ring_vcpu.fd, PAGE_SIZE, flags=mmap.MAP_SHARED, prot=rwx,
                  offset=RING_OFFSET).close()
    assert ei.value.errno in (errno.EPERM, errno.EINVAL)
    assert ei.value.errno == errno.EPERM  # measured here; EINVAL where the VFS allows exec


def test_close_is_idempotent_and_unmaps(ring_vm: VmFd) -> None:
    v = ring_vm.create_vcpu(0)
    assert v.ring_map is not None
    v.close()
    assert v.fd == -1 and v.ring_map.closed and v._run_map.closed
    v.close()
