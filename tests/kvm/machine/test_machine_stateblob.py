"""``Machine.encode_state`` (kept pieces) must give exactly ``capture_state().encode()``, on
the fast path and whenever its pieces would be stale."""
from __future__ import annotations

import dataclasses
import time

from dirtyring._bindings import _uapi as U
from dirtyring.guests.protocol import GuestParams, Pattern
from dirtyring.machine.config import MachineConfig
from dirtyring.machine.state import MachineState
from dirtyring.machine.vm import Machine

MiB = 1 << 20


def _without_tsc(blob: bytes) -> tuple[MachineState, list[int]]:
    """The state with each vCPU's TSC zeroed, and the TSCs: the guest's TSC runs on while it
    is paused, so two reads never agree on it."""
    st = MachineState.decode(blob)
    tscs = [dict(v.msrs)[U.MSR_IA32_TSC] for v in st.vcpus]
    vcpus = tuple(dataclasses.replace(v, msrs=tuple((i, 0 if i == U.MSR_IA32_TSC else d)
                                                    for i, d in v.msrs)) for v in st.vcpus)
    return dataclasses.replace(st, vcpus=vcpus), tscs


def _same(m: Machine) -> bytes:
    fast = m.encode_state()
    slow = m.capture_state().encode()
    assert len(fast) == len(slow)
    (a, ta), (b, tb) = _without_tsc(fast), _without_tsc(slow)
    assert a == b
    assert all(0 < x <= y for x, y in zip(ta, tb))
    # Byte for byte, once the slow path's TSCs are put in.
    assert MachineState(config=b.config, vcpus=tuple(
        dataclasses.replace(v, msrs=tuple((i, t if i == U.MSR_IA32_TSC else d)
                                          for i, d in v.msrs))
        for v, t in zip(b.vcpus, ta)), devices=b.devices).encode() == fast
    return fast


def test_inline_epochs_encode_like_the_records(machines: list[Machine]) -> None:
    m = Machine(MachineConfig(guest="dirtier", tracker="none", data_slots=(MiB,),
                              params=GuestParams(pattern=Pattern.HOT, hot_pages=16)),
                threaded=False)
    machines.append(m)
    r = m.runners[0]
    blobs = []
    for _ in range(20):
        r.run_inline(0.0005)
        blobs.append(_same(m))
    # The guest moved on: its registers and TSC differ from one checkpoint to the next.
    assert len(set(blobs)) == len(blobs)
    # A restore re-reads the static state: the next encode must not use the old pieces.
    old = MachineState.decode(blobs[0])
    m.restore_state(old)
    _same(m)
    r.run_inline(0.0005)
    _same(m)


def test_two_vcpus_with_devices_and_registers_set_while_paused(make_machine) -> None:  # type: ignore[no-untyped-def]
    m = make_machine(guest="dirtier", tracker="none", vcpus=2, data_slots=(MiB,),
                     params=GuestParams(pattern=Pattern.SEQUENTIAL))
    time.sleep(0.01)
    m.pause_all()
    _same(m)
    fd = m.runners[1].fd
    regs = fd.get_regs()
    regs.rbx = 0x1234_5678
    fd.set_regs(regs)  # the sync area is no longer current: the slow path must be taken
    blob = _same(m)
    assert MachineState.decode(blob).vcpus[1].regs == bytes(fd.get_regs())
    m.resume_all()
    time.sleep(0.005)
    m.pause_all()
    _same(m)
