"""Ring-specific behaviour: per-vCPU rings, the ring-full path, KVM's own writes, errors."""
from __future__ import annotations

import time

import numpy as np
import pytest

from dirtyring.errors import ConfigError
from dirtyring.guests.protocol import GuestParams, Pattern
from dirtyring.machine import layout
from dirtyring.machine.epoch import EpochDriver
from dirtyring.machine.vm import KVMCLOCK_GPA, STEAL_TIME_GPA


#: Generous: the waits below end as soon as their condition holds; only a stuck guest (or a
#: broken ring) reaches them.
DEADLINE_S = 60.0


def test_each_vcpu_has_its_own_ring(make_machine) -> None:
    m = make_machine(guest="dirtier", tracker="ring", vcpus=2, ring_entries=1024,
                     data_slots=(4 << 20,), params=GuestParams(pattern=Pattern.RANDOM))
    drv = EpochDriver(m)
    half = m.memory.slots[1].info.pages // 2
    seen = [0, 0]
    deadline = time.monotonic() + DEADLINE_S
    while not all(seen):  # until both vCPUs' rings have held data pages
        assert time.monotonic() < deadline, f"data pages seen per vCPU ring: {seen}"
        drv.run_epoch(0.005)
        for idx, (slots, offs) in enumerate(m.tracker.last_per_vcpu):
            data = offs[slots == 1].astype(np.int64)
            seen[idx] += len(data)
            # the dirtier gives vCPU i the i-th half of the data slot: its ring holds only that
            assert ((data // half) == idx).all()


def test_ring_full_exit_resumes_after_harvest(make_machine) -> None:
    # 256 entries: the soft limit is 192, so a sequential writer fills it within microseconds.
    m = make_machine(guest="dirtier", tracker="ring", ring_entries=256,
                     data_slots=(8 << 20,), params=GuestParams(pattern=Pattern.SEQUENTIAL))
    drv = EpochDriver(m)
    budgets = 0
    seen = 0
    for _ in range(50):
        e = drv.run_epoch(1.0)  # a long interval: only the budget can end it quickly
        assert e.reason == "budget", e.reason
        budgets += 1
        seen += len(e.dirty.slot(1))
        assert 0 < len(e.dirty.slot(1)) <= 256 - 64 + 1
    assert m.runners[0].exits[31] >= budgets  # KVM_EXIT_DIRTY_RING_FULL
    progress = m.progress()
    m.resume_all()
    deadline = time.monotonic() + DEADLINE_S
    while m.progress() <= progress:  # wait for the guest's own progress counter to move
        assert time.monotonic() < deadline, "the vCPU did not run again after the ring was reset"
        time.sleep(0.0005)
    m.pause_all()
    m.tracker.harvest()
    assert seen >= 50 * 150


def test_kvm_writes_kvmclock_into_that_vcpus_ring(make_machine) -> None:
    m = make_machine(guest="dirtier", tracker="ring", vcpus=2, kvmclock=True,
                     data_slots=(1 << 20,), params=GuestParams(pattern=Pattern.HOT,
                                                             hot_pages=4))
    drv = EpochDriver(m)
    clock_pages = {KVMCLOCK_GPA // 4096, STEAL_TIME_GPA // 4096}
    found: list[set[int]] = [set(), set()]
    deadline = time.monotonic() + DEADLINE_S
    # KVM writes them when it enters each vCPU: run until both vCPUs have run (under load a
    # vCPU thread may not get a core in one short epoch).
    while not all(m.status(i, "progress") for i in range(2)) or not all(found):
        assert time.monotonic() < deadline, \
            f"kvmclock/steal-time pages missing from a vCPU ring: {found}"
        drv.run_epoch(0.01)
        for idx, (slots, offs) in enumerate(m.tracker.last_per_vcpu):
            found[idx] |= set(offs[slots == 0].tolist()) & clock_pages
    # The guest never writes these pages (they are not in any pattern); only KVM does.
    # and the kvmclock structure really was filled in by KVM (version field is non-zero)
    assert m.memory.read_u64(KVMCLOCK_GPA) != 0


def test_status_and_vmm_writes_are_merged(make_machine) -> None:
    m = make_machine(guest="dirtier", tracker="ring", data_slots=(1 << 20,),
                     params=GuestParams(pattern=Pattern.HOT, hot_pages=4))
    drv = EpochDriver(m)
    drv.run_epoch(0.002)
    m.set_control("iteration", 99)  # a VMM write: never in the ring
    ds, _ = drv.harvest_paused()
    assert (0, layout.CONTROL_GPA // 4096) in ds


@pytest.mark.parametrize("entries", [100, 128, 3000])
def test_bad_ring_sizes_are_config_errors(make_machine, entries: int) -> None:
    with pytest.raises(ConfigError, match="power of two"):
        make_machine(tracker="ring", ring_entries=entries)


def test_ring_larger_than_host_max(make_machine) -> None:
    with pytest.raises(ConfigError, match="larger than this host allows"):
        make_machine(tracker="ring", ring_entries=1 << 20)
