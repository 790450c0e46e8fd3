"""The one exit dispatch (``machine/exits.py``), without KVM: each exit reason reaches the
right handler and comes back as the right ``Exit``; the stop reasons keep the words the CLI and
the JSON print."""
from __future__ import annotations

import ctypes as C
import errno
import json
from dataclasses import dataclass, field
from typing import Any

import pytest

from dirtyring._bindings import _uapi as U
from dirtyring.errors import KvmError
from dirtyring.machine import exits
from dirtyring.machine.exits import Exit, StopReason, serve


@dataclass
class FakeMachine:
    calls: list[str] = field(default_factory=list)
    says_done: bool = False

    def handle_io(self, r: Any) -> None:
        self.calls.append("io")
        r.finished = self.says_done

    def handle_mmio(self, r: Any) -> None:
        self.calls.append("mmio")

    def on_ring_full(self, r: Any) -> None:
        self.calls.append("ring_full")

    def on_crash(self, r: Any) -> None:
        self.calls.append("crash")


class FakeFd:
    def __init__(self, rip: int | None) -> None:
        self.rip = rip

    def get_regs(self) -> U.kvm_regs:
        if self.rip is None:
            raise KvmError("KVM_GET_REGS", errno.EBADF)
        return U.kvm_regs(rip=self.rip)


@dataclass
class FakeRunner:
    machine: FakeMachine = field(default_factory=FakeMachine)
    fd: FakeFd = field(default_factory=lambda: FakeFd(0x1234))
    index: int = 1
    finished: bool = False
    ring_full: bool = False
    crash: str | None = None
    run_struct: U.kvm_run = field(default_factory=U.kvm_run)


def _serve(r: FakeRunner, reason: int) -> Exit:
    return serve(r, reason)  # type: ignore[arg-type]


@pytest.mark.parametrize("reason, says_done, expect, calls", [
    (U.KVM_EXIT_INTR, False, Exit.SIGNAL, []),
    (U.KVM_EXIT_IO, False, Exit.RUN_ON, ["io"]),
    (U.KVM_EXIT_IO, True, Exit.FINISHED, ["io"]),
    (U.KVM_EXIT_MMIO, False, Exit.RUN_ON, ["mmio"]),
    (U.KVM_EXIT_DIRTY_RING_FULL, False, Exit.RING_FULL, ["ring_full"]),
    (U.KVM_EXIT_SHUTDOWN, False, Exit.CRASHED, ["crash"]),
    (U.KVM_EXIT_HLT, False, Exit.CRASHED, ["crash"]),
    (12345, False, Exit.CRASHED, ["crash"]),
])
def test_each_exit_reaches_its_handler(reason: int, says_done: bool, expect: Exit,
                                       calls: list[str]) -> None:
    r = FakeRunner(machine=FakeMachine(says_done=says_done))
    assert _serve(r, reason) is expect
    assert r.machine.calls == calls
    assert r.ring_full == (expect is Exit.RING_FULL)
    assert (r.crash is not None) == (expect is Exit.CRASHED)


def test_crash_reports_name_the_exit_and_where() -> None:
    r = FakeRunner()
    _serve(r, U.KVM_EXIT_SHUTDOWN)
    assert r.crash == "guest on vCPU 1 triple-faulted (KVM_EXIT_SHUTDOWN) at rip=0x1234"
    r = FakeRunner()
    r.run_struct.u.internal.suberror = 1
    _serve(r, U.KVM_EXIT_INTERNAL_ERROR)
    assert r.crash == "KVM internal error 1 on vCPU 1 at rip=0x1234"
    r = FakeRunner()
    r.run_struct.u.fail_entry.hardware_entry_failure_reason = 0x21
    _serve(r, U.KVM_EXIT_FAIL_ENTRY)
    assert r.crash == "VM entry failed on vCPU 1 (reason 0x21) at rip=0x1234"
    r = FakeRunner(fd=FakeFd(None))  # registers unreadable: no "at rip"
    _serve(r, U.KVM_EXIT_HLT)
    assert r.crash == "unexpected exit HLT on vCPU 1"
    r = FakeRunner(fd=FakeFd(None))
    _serve(r, 999)
    assert r.crash == "unexpected exit 999 on vCPU 1"


def test_every_exit_that_ends_an_inline_run_has_a_stop_reason() -> None:
    ending = {Exit.FINISHED, Exit.RING_FULL, Exit.CRASHED}
    assert set(exits.STOP_OF) == ending
    assert exits.STOP_OF[Exit.RING_FULL] is StopReason.BUDGET
    assert exits.STOP_OF[Exit.FINISHED] is exits.STOP_OF[Exit.CRASHED] is StopReason.STOPPED


def test_stop_reasons_are_the_words_printed_today() -> None:
    assert [s.value for s in StopReason] == ["interval", "budget", "stopped", "exit"]
    for s in StopReason:
        assert s == s.value and str(s) == s.value and f"{s}" == s.value
        assert json.dumps({"reason": s}) == json.dumps({"reason": s.value})
        assert StopReason(s.value) is s


def test_out_value_takes_the_access_size() -> None:
    page = (C.c_uint8 * 8192)()
    run = U.kvm_run.from_buffer(page)
    io = run.u.io
    io.data_offset = 4096
    page[4096:4100] = [0x78, 0x56, 0x34, 0x12]
    addr = C.addressof(page)
    for size, value in ((1, 0x78), (2, 0x5678), (4, 0x12345678)):
        io.size = size
        assert exits.out_value(addr, io) == value
