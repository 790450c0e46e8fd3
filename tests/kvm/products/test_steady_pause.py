"""The steady pause on real KVM: what one native call stages and encodes must be what the
ordinary harvest, gather and capture give, and it must step aside whenever it cannot vouch for
that (a re-arm is due, the VMM wrote a page, staging is busy). Behaviour only, never timing."""
from __future__ import annotations

import numpy as np

from dirtyring._bindings import _uapi as U
from dirtyring._bindings.mapping import memfd
from dirtyring.guests.protocol import GuestParams, Pattern
from dirtyring.machine.config import MachineConfig
from dirtyring.machine.epoch import EpochDriver
from dirtyring.machine.state import MachineState
from dirtyring.machine.vm import Machine
from dirtyring.products.staging import CONSUMED, Staging
from dirtyring.products.steady import SteadyPause
from dirtyring.products.uplink import Uplink
from dirtyring.tracking import HotSetTracker

MiB = 1 << 20


def staging_only_uplink(slots: int = 4, slot_pages: int = 256) -> Uplink:
    """An Uplink's staging side without its process: what ``reserve``/``abandon`` use."""
    up = Uplink.__new__(Uplink)
    up.staging = Staging(memfd("test-staging", Staging.size_for(slots, slot_pages)), slots,
                         slot_pages)
    up.seq, up._parts, up._used = 0, [], {}
    up._addrs = [(int(up.staging.data(i).ctypes.data), int(up.staging.indices(i).ctypes.data))
                 for i in range(slots)]
    return up


def hot_machine(machines: list[Machine]) -> Machine:
    m = Machine(MachineConfig(guest="dirtier", tracker="hotset", data_slots=(MiB,),
                              params=GuestParams(pattern=Pattern.HOT, hot_pages=64)),
                threaded=False)
    machines.append(m)
    return m


def same_state(fast: bytes, m: Machine) -> None:
    """The fast blob equals a capture now in everything but the TSC, which runs on."""
    a, b = MachineState.decode(fast), m.capture_state()
    assert a.config == b.config and a.devices == b.devices
    for x, y in zip(a.vcpus, b.vcpus):
        assert (x.regs, x.sregs, x.events, x.xsave, x.xcrs, x.lapic, x.mp_state) == \
            (y.regs, y.sregs, y.events, y.xsave, y.xcrs, y.lapic, y.mp_state)
        tx, ty = dict(x.msrs), dict(y.msrs)
        assert 0 < tx.pop(U.MSR_IA32_TSC) <= ty.pop(U.MSR_IA32_TSC) and tx == ty


def test_steady_pauses_stage_and_encode_what_the_ordinary_path_gives(
        machines: list[Machine]) -> None:
    m = hot_machine(machines)
    tr = m.tracker
    assert isinstance(tr, HotSetTracker)
    up = staging_only_uplink()
    sp = SteadyPause(m, tr, up)
    drv = EpochDriver(m)
    taken = fallbacks = 0
    for epoch in range(1, 301):
        e = drv.run_epoch(0.0002, harvest=False)
        harvests = tr.statistics().harvests
        got = sp.take(epoch)
        assert tr.statistics().harvests == harvests + 1 or got is None
        if got is None:
            assert up._parts == []  # nothing reserved
            drv.harvest_epoch(e)  # the ordinary way: harvest and capture
            m.encode_state()
            fallbacks += 1
            continue
        taken += 1
        n, state, digest = got
        assert digest == b""
        # The staged pages are the tracker's set, and hold what guest memory holds now.
        steady = tr.steady()  # what the next harvest would report, had nothing changed
        expected = dict(steady[0].items()) if steady is not None else None
        staged: dict[int, np.ndarray] = {}
        for seq, off, slot, k in up._parts:
            idx = np.array(up.staging.indices(seq)[off:off + k])
            assert np.array_equal(up.staging.data(seq)[off:off + k], m.memory.slots[slot].rows[idx])
            staged[slot] = idx
        if expected is not None:  # (None: the next harvest is a re-arm)
            assert staged.keys() == expected.keys()
            assert all(np.array_equal(staged[s], expected[s]) for s in staged)
        assert n == sum(len(v) for v in staged.values())
        assert 64 in {len(v) for v in staged.values()}  # the hot set itself
        same_state(state, m)
        up._parts = []
        up.staging.header[CONSUMED] = up.seq + 1  # the uplink is done with it
    assert sp.taken == taken
    assert taken > 250  # the steady path carries a steady hot set
    assert fallbacks >= 3  # the re-arms (at least at 8, 24 and 56 epochs) go the ordinary way


def steady_again(m: Machine, drv: EpochDriver, epoch: int) -> int:
    """Ordinary epochs until the tracker is steady (no re-arm due); the next epoch's number."""
    tr = m.tracker
    assert isinstance(tr, HotSetTracker)
    for _ in range(40):
        drv.run_epoch(0.0002)
        m.encode_state()
        epoch += 1
        if tr.steady() is not None:
            return epoch
    raise AssertionError("the hot set never became steady")


def test_it_steps_aside_for_vmm_writes_and_busy_staging(machines: list[Machine]) -> None:
    m = hot_machine(machines)
    tr = m.tracker
    assert isinstance(tr, HotSetTracker)
    up = staging_only_uplink(slots=2)
    sp = SteadyPause(m, tr, up)
    drv = EpochDriver(m)
    epoch = steady_again(m, drv, 1)
    drv.run_epoch(0.0002, harvest=False)
    assert m.memory is not None
    m.memory.mark_dirty(1, 200)  # the VMM wrote a page: only the ordinary harvest reports it
    assert sp.take(epoch) is None and up._parts == []
    assert (1, 200) in drv.harvest_paused()[0]
    epoch = steady_again(m, drv, epoch + 1)
    drv.run_epoch(0.0002, harvest=False)
    up.seq, up.staging.header[CONSUMED] = 10, 8  # both staging slots still in the uplink's hands
    assert sp.take(epoch) is None and up._parts == []
    up.staging.header[CONSUMED] = 10
    # Free staging again: a steady pause goes through. (The epoch right after a re-arm may
    # have been too short for the guest to reach its whole set; then the next log differs
    # from that one and the pause steps aside once more, which is what it should do.)
    for _ in range(10):
        if sp.take(epoch) is not None:
            assert up._parts
            break
        assert up._parts == []
        drv.harvest_paused()
        m.encode_state()
        epoch += 1
        drv.run_epoch(0.0002, harvest=False)
    else:
        raise AssertionError("no steady pause in 10 epochs once staging was free")
