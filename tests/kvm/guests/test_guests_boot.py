"""Booting guests: port I/O from the CPL3 guest, building machines for a restore, and how a guest
crash is reported."""
from __future__ import annotations

import dataclasses
import time

import pytest

from dirtyring._bindings import _uapi as U
from dirtyring.errors import GuestCrashed
from dirtyring.guests.protocol import GuestParams, Pattern
from dirtyring.machine import layout
from dirtyring.machine.config import MachineConfig
from dirtyring.machine.vm import Machine

MiB = 1 << 20


def wait_progress(m: Machine, vcpu: int = 0, above: int = 0, timeout: float = 30.0) -> None:
    """Wait until the guest has written (the event, not a sleep that guesses how long it takes)."""
    deadline = time.monotonic() + timeout
    while m.status(vcpu, "progress") <= above and time.monotonic() < deadline:
        m.check()
        time.sleep(0.002)
    assert m.status(vcpu, "progress") > above, f"vCPU {vcpu} made no progress in {timeout} s"


@pytest.mark.parametrize("vcpus", [1, 2])
def test_first_port_io_of_a_freshly_booted_guest_works(
        make_machine, vcpus: int) -> None:  # type: ignore[no-untyped-def]
    """Regression: kvm_pvm drops RFLAGS.IOPL, so port I/O at CPL3 needs the TSS I/O bitmap;
    without it the guest's first in/out #GPs and triple-faults (fixed in bddf74b)."""
    m = make_machine(guest="dirtier", tracker="none", vcpus=vcpus, data_slots=(MiB,),
                     params=GuestParams(pattern=Pattern.SEQUENTIAL, max_writes=100))
    assert m.wait_stopped(30.0)
    assert m.crashed is None, m.crashed
    assert [r.exit_code for r in m.runners] == [0] * vcpus
    for r in m.runners:
        assert r.fd.get_sregs().tr.limit == layout.TSS_LIMIT
        assert r.exits[U.KVM_EXIT_IO] >= 1


def test_restore_state_straight_after_building_a_restore_target(machines: list[Machine]) -> None:
    """Regression: Machine(config, boot=False) used to return before its vCPU threads parked, so
    restore_state() right after it failed 'restore_state needs paused vCPUs' (fixed in bddf74b)."""
    cfg = MachineConfig(guest="dirtier", tracker="none", data_slots=(MiB,),
                        params=GuestParams(pattern=Pattern.SEQUENTIAL))
    src = Machine(cfg)
    machines.append(src)
    wait_progress(src)  # running, not just built
    src.pause_all()
    state = src.capture_state()
    for _ in range(10):
        target = Machine(MachineConfig.from_json(state.config), boot=False)
        machines.append(target)
        assert all(r.parked for r in target.runners)
        target.restore_state(state)
        assert target.crashed is None and not target.finished


@pytest.mark.parametrize("vcpus", [1, 2])
def test_guest_crash_is_reported(make_machine, vcpus: int) -> None:  # type: ignore[no-untyped-def]
    """Point a paused vCPU at an unmapped address: no IDT, so the page fault triple-faults."""
    m = make_machine(guest="dirtier", tracker="none", vcpus=vcpus, data_slots=(MiB,),
                     params=GuestParams(pattern=Pattern.SEQUENTIAL))
    wait_progress(m, vcpus - 1)
    m.pause_all()
    assert m.crashed is None
    assert m.status(vcpus - 1, "progress") > 0
    victim = m.runners[-1]
    regs = victim.fd.get_regs()
    regs.rip = 0x300000  # system slot, but beyond the 2 MiB the guest page tables map
    victim.fd.set_regs(regs)
    m.resume_all()
    assert m.wait_stopped(30.0) is True
    msg = m.crashed
    assert msg is not None
    assert "triple" in msg and "SHUTDOWN" in msg, msg
    assert f"vCPU {victim.index}" in msg and "0x300000" in msg, msg
    assert victim.crash == msg
    assert not victim.finished and victim.exit_code is None
    assert not m.finished
    with pytest.raises(GuestCrashed, match="triple"):
        m.check()
    # A crashed machine can still be paused and closed (by the fixture) without hanging.
    m.pause_all()


def test_crash_of_a_restored_guest_is_reported(machines: list[Machine]) -> None:
    """Restoring a state whose rip points nowhere into a fresh machine crashes it, reported the
    same way."""
    cfg = MachineConfig(guest="dirtier", tracker="none", data_slots=(MiB,),
                        params=GuestParams(pattern=Pattern.SEQUENTIAL))
    src = Machine(cfg)
    machines.append(src)
    wait_progress(src)  # running, not just built
    src.pause_all()
    state = src.capture_state()
    regs = U.kvm_regs.from_buffer_copy(state.vcpus[0].regs)
    assert layout.CODE_GPA <= regs.rip < layout.CODE_LIMIT
    regs.rip = 0x7FFF0000  # nowhere near any mapping
    bad = dataclasses.replace(state, vcpus=(dataclasses.replace(state.vcpus[0],
                                                                regs=bytes(regs)),))
    dst = Machine(cfg, boot=False)
    machines.append(dst)
    assert src.memory is not None and dst.memory is not None
    for a, b in zip(src.memory.slots, dst.memory.slots):
        b.view[:] = a.view
    dst.restore_state(bad)
    dst.resume_all()
    assert dst.wait_stopped(30.0)
    assert dst.crashed is not None and "SHUTDOWN" in dst.crashed
    assert "0x7fff0000" in dst.crashed
    # The good state, restored into another machine, runs on.
    ok = Machine(cfg, boot=False)
    machines.append(ok)
    for a, b in zip(src.memory.slots, ok.memory.slots):  # type: ignore[union-attr]
        b.view[:] = a.view
    ok.restore_state(state)
    before = ok.status(0, "progress")
    ok.resume_all()
    wait_progress(ok, 0, before)
    ok.pause_all()
    assert ok.crashed is None and ok.status(0, "progress") > before


def test_capture_sees_registers_set_while_paused(
        make_machine) -> None:  # type: ignore[no-untyped-def]
    m = make_machine(guest="dirtier", tracker="none", data_slots=(MiB,),
                     params=GuestParams(pattern=Pattern.SEQUENTIAL))
    wait_progress(m)
    m.pause_all()
    fd = m.runners[0].fd
    regs = fd.get_regs()
    regs.rip = 0x7FFF0000
    regs.rbx = 0x1234_5678
    fd.set_regs(regs)
    state = m.capture_state()
    got = U.kvm_regs.from_buffer_copy(state.vcpus[0].regs)
    assert (got.rip, got.rbx) == (0x7FFF0000, 0x1234_5678)
