"""Fixtures for the binding tests: every Kvm, VmFd, VcpuFd, memfd and mapping is closed.

The guest used here is a few real-mode instructions. Real mode runs in KVM's instruction
emulator on this host (docs/platform.md: CPL0 is emulated), which is fine for a handful of
instructions and also works on hardware KVM. Its writes are logged like any guest write.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pytest

from dirtyring._bindings import PAGE_SIZE, Kvm, Mapping, VcpuFd, VmFd, memfd
from dirtyring._bindings import _uapi as U

#: Guest memory of the test slot: 64 pages, so its dirty bitmap is exactly one uint64.
SLOT = 0
SLOT_PAGES = 64
SLOT_BYTES = SLOT_PAGES * PAGE_SIZE
CODE_GPA = 0x1000          # page 1
DONE_PORT = 0x10           # the guest says "done" with `out DONE_PORT, al` (al = 0x42)
RING_BYTES = 16 * 1024     # 1024 entries: small, a valid power of two >= one page


def open_fds() -> dict[int, str]:
    """{fd: target} of this process. The directory fd listdir itself used is closed by the
    time we readlink it, so it drops out; the same number reused later is seen correctly."""
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except FileNotFoundError:
            pass
    return out


@pytest.fixture(autouse=True)
def no_fd_leak() -> Iterator[None]:
    """Every test must close what it opens (KVM fds, memfds, stats fds)."""
    before = open_fds()
    yield
    leaked = {fd: t for fd, t in open_fds().items() if before.get(fd) != t}
    assert not leaked, f"test leaked file descriptors: {leaked}"


@pytest.fixture
def kvm() -> Iterator[Kvm]:
    k = Kvm()
    try:
        yield k
    finally:
        k.close()


@pytest.fixture
def vm(kvm: Kvm) -> Iterator[VmFd]:
    v = kvm.create_vm()
    try:
        yield v
    finally:
        v.close()


@pytest.fixture
def ring_vm(kvm: Kvm) -> Iterator[VmFd]:
    """A VM with a RING_BYTES dirty ring enabled (no vCPU yet)."""
    v = kvm.create_vm()
    try:
        v.enable_dirty_log_ring(RING_BYTES)
        yield v
    finally:
        v.close()


@dataclass
class GuestMemory:
    fd: int
    map: Mapping

    def put(self, gpa: int, data: bytes) -> None:
        self.map.array()[gpa:gpa + len(data)] = np.frombuffer(data, np.uint8)


@pytest.fixture
def guest_mem() -> Iterator[GuestMemory]:
    fd = memfd("dirtyring-test-bindings", SLOT_BYTES)
    try:
        m = Mapping(fd, SLOT_BYTES)
        try:
            yield GuestMemory(fd, m)
        finally:
            m.close()
    finally:
        os.close(fd)


@pytest.fixture
def make_vcpu() -> Iterator[Callable[[VmFd, int], VcpuFd]]:
    made: list[VcpuFd] = []

    def make(vm: VmFd, vcpu_id: int = 0) -> VcpuFd:
        v = vm.create_vcpu(vcpu_id)
        made.append(v)
        return v

    try:
        yield make
    finally:
        for v in reversed(made):
            v.close()


@pytest.fixture
def vcpu(vm: VmFd, make_vcpu: Callable[[VmFd, int], VcpuFd]) -> VcpuFd:
    return make_vcpu(vm, 0)


class Guest:
    """Helpers and constants for tests (test modules cannot import conftest: importlib mode)."""

    SLOT = SLOT
    SLOT_PAGES = SLOT_PAGES
    SLOT_BYTES = SLOT_BYTES
    CODE_GPA = CODE_GPA
    DONE_PORT = DONE_PORT
    RING_BYTES = RING_BYTES

    @staticmethod
    def add_slot(vm: VmFd, mem: GuestMemory, flags: int = U.KVM_MEM_LOG_DIRTY_PAGES) -> None:
        vm.set_user_memory_region(SLOT, 0, SLOT_BYTES, mem.map.addr, flags)

    @staticmethod
    def writer_code(pages: list[int]) -> bytes:
        """Real-mode code: `mov byte [page*4096], 1` per page, `mov al, 0x42`,
        `out DONE_PORT, al`, then `hlt`. Pages lie below 64 KiB (DS base 0, 16-bit addresses)."""
        code = b""
        for p in pages:
            addr = p * PAGE_SIZE
            assert addr < 0x10000 and p != CODE_GPA // PAGE_SIZE
            code += b"\xc6\x06" + addr.to_bytes(2, "little") + b"\x01"  # mov byte [addr], 1
        code += bytes([0xB0, 0x42])                                 # mov al, 0x42
        code += bytes([0xE6, DONE_PORT])                            # out DONE_PORT, al
        code += bytes([0xF4])                                       # hlt
        return code

    @staticmethod
    def start_real_mode(vcpu: VcpuFd, rip: int = CODE_GPA) -> None:
        s = vcpu.get_sregs()
        s.cs.base, s.cs.selector = 0, 0
        s.ds.base, s.ds.selector = 0, 0
        vcpu.set_sregs(s)
        r = vcpu.get_regs()
        r.rip, r.rflags = rip, 0x2
        vcpu.set_regs(r)

    @staticmethod
    def run_writer(vcpu: VcpuFd, mem: GuestMemory, pages: list[int]) -> None:
        """Load and run the writer guest to its `hlt`, asserting the exits on the way."""
        mem.put(CODE_GPA, Guest.writer_code(pages))
        Guest.start_real_mode(vcpu)
        assert vcpu.run() == U.KVM_EXIT_IO
        assert vcpu.run_struct.u.io.port == DONE_PORT
        assert vcpu.run() == U.KVM_EXIT_HLT

    @staticmethod
    def bitmap_pages(bitmap: np.ndarray) -> list[int]:
        return [i for i in range(SLOT_PAGES) if int(bitmap[i // 64]) >> (i % 64) & 1]


@pytest.fixture
def guest() -> type[Guest]:
    return Guest
