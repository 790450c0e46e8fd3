"""The fast paths of rollback on real KVM, checked against the root state as KVM itself holds it:

* the fast vCPU restore (one copy into kvm_run's sync area + KVM_SET_XSAVE) brings back the
  general and segment registers, pending events and the FPU/SSE state even when they changed
  after the root (changed here through the VMM, since our guests do not use the FPU);
* the inline run ends on the guest's DONE without completing the ``out`` by a second KVM_RUN:
  the vCPU still resumes exactly at the root's RIP, also when the root's RIP is that ``out``
  or the instruction after it (where a pending completion could act);
* a KVM_SET_* after a fast rollback wins over the pending sync-area copy, and the getters
  report the pending copy;
* exits other than DONE (port ticks, a crash) take the general path and are restored too.

What KVM holds is read after a KVM_RUN with ``immediate_exit`` set: it loads the sync area and
returns without entering the guest. Behaviour only, never timing."""
from __future__ import annotations

from typing import Any

import pytest

from dirtyring._bindings import _uapi as U
from dirtyring.guests.protocol import GuestParams, Pattern, Port
from dirtyring.machine import layout
from dirtyring.machine.vm import Machine
from dirtyring.machine.config import MachineConfig
from dirtyring.snapshots.rollback import Rollback
from dirtyring.machine.fingerprint import fingerprint

MiB = 1 << 20
#: The longest a guest run that must finish may take. Generous: a run returns as soon as the
#: guest stops, and a slow or loaded host only takes longer.
DEADLINE = 60.0
XMM0 = 160  # offset of XMM0 in the legacy (FXSAVE) part of the XSAVE area
XSTATE_BV = 512  # offset of the XSAVE header's XSTATE_BV
OUT_DONE = bytes([0xE7, int(Port.DONE)])  # outl %eax, $DONE


def dirtier(machines: list[Machine], tracker: str = "hotset", **params: Any) -> Machine:
    params.setdefault("pattern", Pattern.HOT)
    params.setdefault("hot_pages", 16)
    params.setdefault("max_writes", 16)
    cfg = MachineConfig(guest="dirtier", tracker=tracker, data_slots=(1 * MiB,),
                        params=GuestParams(**params))
    m = Machine(cfg, threaded=False)
    machines.append(m)
    return m


def fpu_state(xsave: bytes) -> bytes:
    """The XSAVE area without XSTATE_BV. KVM_GET_XSAVE shows a component whose XSTATE_BV bit is
    clear with its init values, so the rest of the area is the whole architectural state; the
    bit itself only says "in use" and flips between equal states (seen here: SSE reported in
    use after restoring a root where it was in its init state, about 1 in 1000 times)."""
    return xsave[:XSTATE_BV] + xsave[XSTATE_BV + 8:]


def kvm_state(m: Machine) -> tuple[bytes, bytes, bytes, bytes]:
    """regs, sregs, events and XSAVE as KVM holds them (loading any pending sync-area copy)."""
    r = m.runners[0]
    r.run_struct.immediate_exit = 1
    assert r.fd.run() == U.KVM_EXIT_INTR
    r.run_struct.immediate_exit = 0
    assert r.run_struct.kvm_dirty_regs == 0  # KVM consumed the copy
    fd = r.fd
    return (bytes(fd.get_regs()), bytes(fd.get_sregs()), bytes(fd.get_vcpu_events()),
            fpu_state(bytes(fd.get_xsave())))


def root_state(rb: Rollback) -> tuple[bytes, bytes, bytes, bytes]:
    assert rb.root is not None
    v = rb.root.state.vcpus[0]
    return v.regs, v.sregs, v.events, fpu_state(v.xsave)


def scribble_on_vcpu(m: Machine) -> None:
    """Change what a CPL3 guest could change: registers, a segment, the SSE state."""
    fd = m.runners[0].fd
    regs = fd.get_regs()
    regs.rax, regs.rbx, regs.r15 = 0x1111, 0x2222, 0x3333
    regs.rip += 2
    fd.set_regs(regs)
    sregs = fd.get_sregs()
    sregs.fs.base = 0x7000_0000  # WRFSBASE / a segment load can do this at CPL3
    fd.set_sregs(sregs)
    xs = fd.get_xsave()
    raw = bytearray(bytes(xs))
    raw[XMM0:XMM0 + 16] = bytes(range(1, 17))
    raw[XSTATE_BV] |= 0x2  # SSE state in use
    fd.set_xsave(U.kvm_xsave.from_buffer_copy(bytes(raw)))
    assert bytes(fd.get_xsave())[XMM0:XMM0 + 16] == bytes(range(1, 17))


@pytest.mark.parametrize("tracker", ["ring", "bitmap", "hotset"])
def test_fast_restore_undoes_registers_segments_and_fpu(machines: list[Machine],
                                                        tracker: str) -> None:
    m = dirtier(machines, tracker)
    rb = Rollback(m)
    rb.mark()
    assert not rb.exact
    want = root_state(rb)
    for i in range(20):
        assert rb.run(DEADLINE) == "stopped"
        if i % 2:
            scribble_on_vcpu(m)
        assert kvm_state(m)[0] != want[0]
        rb.rollback()
        fd = m.runners[0].fd
        # Before the next KVM_RUN the getters report the pending copy ...
        assert (bytes(fd.get_regs()), bytes(fd.get_sregs()),
                bytes(fd.get_vcpu_events())) == want[:3]
        # ... and after it, KVM holds exactly the root's state.
        assert kvm_state(m) == want, f"iteration {i}"
        assert fingerprint(m.memory) == rb.root.digest  # type: ignore[arg-type, union-attr]
    assert m.status(0, "progress") == 0


@pytest.mark.parametrize("after_out", [False, True])
def test_root_on_the_done_instruction_resumes_at_the_root(machines: list[Machine],
                                                         after_out: bool) -> None:
    """Roots whose RIP is the guest's final ``out`` or the instruction after it: the run's
    own ``out`` is left uncompleted, and its completion must not move the restored RIP."""
    m = dirtier(machines)
    r = m.runners[0]
    assert r.run_inline(DEADLINE) == "stopped"  # completes the out: RIP is after it
    after = r.fd.get_regs().rip
    assert m.memory is not None and m.memory.read(after - 2, 2) == OUT_DONE
    regs = r.fd.get_regs()
    regs.rip = after if after_out else after - 2
    r.fd.set_regs(regs)
    r.finished = False
    rb = Rollback(m)
    rb.mark()
    want = root_state(rb)
    exits = sum(r.exits.values())
    for i in range(30):
        assert rb.run(DEADLINE) == "stopped" and r.finished and r.exit_code == 0
        rb.rollback()
        assert not r.finished
        assert kvm_state(m) == want, f"iteration {i}"
    # One guest entry per run (the out); whether the completion was needed depends on where
    # this host's KVM leaves RIP at the exit, but it is the same every time.
    assert sum(r.exits.values()) - exits == 30
    assert rb.statistics().io_completions in (0, 30)


def test_set_after_fast_rollback_wins_over_the_pending_copy(machines: list[Machine]) -> None:
    m = dirtier(machines)
    rb = Rollback(m)
    rb.mark()
    other = m.capture_state()
    assert rb.run(DEADLINE) == "stopped"
    mid = m.capture_state()  # finished, RIP on the DONE loop
    rb.rollback()
    fd = m.runners[0].fd
    regs = fd.get_regs()  # the pending root copy
    regs.rbx = 0xABCDEF
    fd.set_regs(regs)
    assert fd.run_struct.kvm_dirty_regs & U.KVM_SYNC_X86_REGS == 0
    got = kvm_state(m)
    assert U.kvm_regs.from_buffer_copy(got[0]).rbx == 0xABCDEF
    assert got[1:3] == root_state(rb)[1:3]  # sregs and events still from the rollback
    # An exact restore after a fast rollback (no run in between) lands on its own state.
    assert rb.run(DEADLINE) == "stopped"
    rb.rollback()
    m.restore_state(mid)
    assert kvm_state(m)[:3] == (mid.vcpus[0].regs, mid.vcpus[0].sregs, mid.vcpus[0].events)
    m.restore_state(other)
    assert rb.run(DEADLINE) == "stopped"  # and the guest runs normally from there


def test_port_exits_before_done_take_the_general_path(machines: list[Machine]) -> None:
    """A TICK every 8 writes: the first exit is not DONE; device state (tick count) and memory
    come back to the root's, and the run still ends on DONE."""
    m = dirtier(machines, exit_every=8, hot_pages=64, max_writes=64)
    rb = Rollback(m)
    root = rb.mark()
    ticks = m.control.ticks
    for _ in range(50):
        assert rb.run(DEADLINE) == "stopped"
        assert m.control.ticks == ticks + 8
        rb.rollback()
        assert m.control.ticks == ticks
        assert fingerprint(m.memory) == root.digest  # type: ignore[arg-type]
        assert kvm_state(m) == root_state(rb)


def test_a_crashing_root_is_restored_exactly_every_time(machines: list[Machine]) -> None:
    """A root whose next instruction faults (no IDT at CPL3: triple fault). Each run crashes;
    each rollback clears the crash and restores the root exactly."""
    m = dirtier(machines)
    r = m.runners[0]
    regs = r.fd.get_regs()
    regs.rip = layout.DATA_GPA  # a data page: not executable (NX) or not code
    r.fd.set_regs(regs)
    rb = Rollback(m)
    root = rb.mark()
    for _ in range(5):
        assert rb.run(DEADLINE) == "stopped"
        assert m.crashed is not None and "triple-faulted" in m.crashed
        rb.rollback()
        assert m.crashed is None and not m.stopped_event.is_set()
        assert fingerprint(m.memory) == root.digest  # type: ignore[arg-type]
        assert kvm_state(m)[:3] == root_state(rb)[:3]


def test_exact_restore_undoes_an_msr_the_fast_one_leaves_alone(machines: list[Machine]) -> None:
    """MSRs other than the TSC need WRMSR (CPL0): the fast restore does not touch them; the
    exact restore brings back one the VMM changed."""
    m = dirtier(machines)
    rb = Rollback(m, exact=True)
    rb.mark()
    fd = m.runners[0].fd
    before = fd.get_msrs([U.MSR_KERNEL_GS_BASE])[U.MSR_KERNEL_GS_BASE]
    assert rb.run(DEADLINE) == "stopped"
    fd.set_msrs({U.MSR_KERNEL_GS_BASE: before ^ 0x1000})
    rb.rollback()
    assert fd.get_msrs([U.MSR_KERNEL_GS_BASE])[U.MSR_KERNEL_GS_BASE] == before
