"""The compute guest: every report is the hash chain h(i+1) = splitmix64(h(i) ^ i), h(0) = seed,
and the chain survives pause / capture / restore into another machine."""
from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import numpy as np
import pytest

from dirtyring.guests.protocol import GuestParams, hash_chain
from dirtyring.machine import layout
from dirtyring.machine.config import MachineConfig
from dirtyring.machine.epoch import EpochDriver
from dirtyring.machine.vm import Machine

MiB = 1 << 20
EVERY = 10_000
SEED = 0xC0FFEE_1234


def boot(machines: list[Machine], cfg: MachineConfig) -> Machine:
    m = Machine(cfg)
    machines.append(m)
    return m


def restore_into(machines: list[Machine], state: Any, memory: list[np.ndarray]) -> Machine:
    """A fresh machine of the captured config, filled with ``memory`` and ``state`` (paused)."""
    m = Machine(MachineConfig.from_json(state.config), boot=False)
    machines.append(m)
    assert m.memory is not None
    assert [s.view.size for s in m.memory.slots] == [a.size for a in memory]
    for s, a in zip(m.memory.slots, memory):
        s.view[:] = a
    m.restore_state(state)  # straight away: a boot=False machine returns with parked vCPUs
    return m


def run_for(m: Machine, seconds: float, driver: EpochDriver | None = None, *,
            min_reports: int = 3, limit: float = 60.0) -> None:
    """Let the guest run at least ``seconds`` and until every vCPU made ``min_reports`` more
    reports (at most ``limit`` s, so a loaded host does not fail the test); leave it paused."""
    start = {v: len(r) for v, r in reports_by_vcpu(m.outputs).items()}

    def enough() -> bool:
        now = reports_by_vcpu(list(m.outputs))
        return all(len(now.get(v, ())) - start.get(v, 0) >= min_reports
                   for v in range(len(m.runners)))

    t0 = time.monotonic()
    if driver is None:
        m.resume_all()
        time.sleep(seconds)
        while not enough() and time.monotonic() - t0 < limit:
            time.sleep(0.005)
        m.pause_all()
    else:
        while True:
            driver.run_epoch(0.005)
            t = time.monotonic() - t0
            if (t >= seconds and enough()) or t >= limit:
                break
    m.check()


# --- chain verification ---------------------------------------------------------------------------
_C0 = np.uint64(0x9E3779B97F4A7C15)
_C1 = np.uint64(0xBF58476D1CE4E5B9)
_C2 = np.uint64(0x94D049BB133111EB)


def chain_many(i0: np.ndarray, h0: np.ndarray, steps: int) -> np.ndarray:
    """hash_chain for many (step, hash) starts at once, each advanced by ``steps`` steps."""
    h = h0.astype(np.uint64).copy()
    i = i0.astype(np.uint64).copy()
    one = np.uint64(1)
    with np.errstate(over="ignore"):
        for _ in range(steps):
            x = (h ^ i) + _C0
            x = (x ^ (x >> np.uint64(30))) * _C1
            x = (x ^ (x >> np.uint64(27))) * _C2
            h = x ^ (x >> np.uint64(31))
            i += one
    return h


def verify_chain(seed: int, reports: list[tuple[int, int]]) -> None:
    """Every (i, h) equals hash_chain(seed, i). Checks each report from the one before it (by
    induction that is the whole chain from the seed), vectorised over equal-length segments."""
    pairs = sorted(set(reports))
    assert len({i for i, _ in pairs}) == len(pairs), "two different hashes for one step"
    prev = [(0, seed)] + pairs[:-1]
    by_len: dict[int, list[int]] = defaultdict(list)
    for k, ((i0, _), (i1, _)) in enumerate(zip(prev, pairs)):
        assert i1 > i0
        by_len[i1 - i0].append(k)
    for n, ks in by_len.items():
        got = chain_many(np.array([prev[k][0] for k in ks], np.uint64),
                         np.array([prev[k][1] for k in ks], np.uint64), n)
        want = np.array([pairs[k][1] for k in ks], np.uint64)
        bad = np.flatnonzero(got != want)
        assert not len(bad), f"report at step {pairs[ks[bad[0]]][0]} is off the hash chain"
    # And the first reports straight from the reference implementation.
    for i, h in pairs[:2]:
        assert h == hash_chain(seed, i)


def reports_by_vcpu(outputs: list[tuple[str, Any]]) -> dict[int, list[tuple[int, int]]]:
    out: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for kind, payload in outputs:
        if kind == "report":
            v, i, h = payload
            out[v].append((i, h))
    return out


def check_status(m: Machine, vcpu: int, seed: int, last: tuple[int, int]) -> None:
    """The paused guest's status block is a point of the chain at or after its last report."""
    step = m.status(vcpu, "step")
    # compute.c stores step, then progress (volatile: in that order): paused between the two,
    # progress is still one behind.
    assert m.status(vcpu, "progress") in (step - 1, step)
    assert m.status(vcpu, "report_i") == last[0]
    assert m.status(vcpu, "report_h") == last[1]
    assert last[0] <= step < last[0] + EVERY
    here = hash_chain(seed, step, start=last)
    # Paused between "hash = h" and "step = i + 1" the hash is one step ahead.
    assert m.status(vcpu, "hash") in (here, hash_chain(seed, step + 1, start=(step, here)))


def test_chain_helper_matches_reference() -> None:
    starts = [(0, 1), (5, 123456789), (1000, (1 << 64) - 1)]
    got = chain_many(np.array([s[0] for s in starts], np.uint64),
                     np.array([s[1] for s in starts], np.uint64), 250)
    for (i, h), g in zip(starts, got):
        assert int(g) == hash_chain(0, i + 250, start=(i, h))
    verify_chain(9, [(k, hash_chain(9, k)) for k in (3, 10, 17, 30)])
    with pytest.raises(AssertionError):
        verify_chain(9, [(10, hash_chain(9, 10)), (20, hash_chain(9, 20) ^ 1)])


# --- tests ----------------------------------------------------------------------------------------
def compute_config(**kw: Any) -> MachineConfig:
    kw.setdefault("data_slots", (2 * MiB,))
    return MachineConfig(guest="compute", params=GuestParams(report_every=EVERY, seed=SEED), **kw)


def test_reports_follow_the_hash_chain(machines: list[Machine]) -> None:
    m = boot(machines, compute_config(tracker="none"))
    run_for(m, 0.08, min_reports=5)
    reps = reports_by_vcpu(m.outputs)
    assert set(reps) == {0}
    r0 = reps[0]
    assert len(r0) >= 5
    assert [i for i, _ in r0] == [EVERY * (k + 1) for k in range(len(r0))]
    verify_chain(SEED, r0)
    assert m.control.reports == len(r0)
    check_status(m, 0, SEED, r0[-1])
    assert m.crashed is None and not m.finished


def test_reports_with_the_ring_tracker_and_epochs(machines: list[Machine]) -> None:
    m = boot(machines, compute_config(tracker="ring"))
    m.pause_all()
    driver = EpochDriver(m)
    status_page = (0, layout.STATUS_GPA // layout.PAGE)
    t0 = time.monotonic()
    progressed = 0
    while True:
        before = m.status(0, "progress")
        e = driver.run_epoch(0.005)
        assert not e.resync
        assert e.reason == "interval"
        if m.status(0, "progress") != before:
            progressed += 1
            assert status_page in e.dirty  # the chain state is written every step
        if (progressed >= 12 and len(m.outputs) >= 5) or time.monotonic() - t0 > 60:
            break
    m.check()
    reps = reports_by_vcpu(m.outputs)[0]
    assert len(reps) >= 5
    assert [i for i, _ in reps] == [EVERY * (k + 1) for k in range(len(reps))]
    verify_chain(SEED, reps)
    check_status(m, 0, SEED, reps[-1])


def test_two_vcpus_each_report_their_own_chain(machines: list[Machine]) -> None:
    m = boot(machines, compute_config(tracker="none", vcpus=2))
    run_for(m, 0.1)
    reps = reports_by_vcpu(m.outputs)
    assert set(reps) == {0, 1}
    for v in (0, 1):
        r = reps[v]
        assert len(r) >= 3, f"vCPU {v} reported {len(r)} times"
        assert [i for i, _ in r] == [EVERY * (k + 1) for k in range(len(r))]
        verify_chain(SEED, r)
        check_status(m, v, SEED, r[-1])
    # Each vCPU keeps its own status block and chain position.
    assert m.status(0, "step") != 0 and m.status(1, "step") != 0


@pytest.mark.parametrize("tracker,vcpus", [("none", 1), ("ring", 1), ("none", 2)])
def test_chain_continues_after_restore(machines: list[Machine], tracker: str, vcpus: int) -> None:
    cfg = compute_config(tracker=tracker, vcpus=vcpus)
    m1 = boot(machines, cfg)
    m1.pause_all()
    d1 = EpochDriver(m1) if tracker == "ring" else None
    run_for(m1, 0.05, d1)

    # Capture: device and vCPU state plus a copy of all guest memory, all while paused.
    state = m1.capture_state()
    assert MachineConfig.from_json(state.config) == cfg
    assert m1.memory is not None
    memory = [s.view.copy() for s in m1.memory.slots]
    captured = {v: m1.status(v, "step") for v in range(vcpus)}
    before = reports_by_vcpu(m1.outputs)
    for v in range(vcpus):
        assert before[v], f"vCPU {v} made no report before the capture"

    # The original goes on: its later reports are the reference for the restored machine.
    run_for(m1, 0.05, d1)
    later = reports_by_vcpu(m1.outputs[sum(len(r) for r in before.values()):])

    m2 = restore_into(machines, state, memory)
    assert m2.control.reports == m1.control.reports - sum(len(r) for r in later.values())
    for v in range(vcpus):
        assert m2.status(v, "step") == captured[v]
    d2 = EpochDriver(m2) if tracker == "ring" else None
    run_for(m2, 0.05, d2)
    after = reports_by_vcpu(m2.outputs)
    for v in range(vcpus):
        got = after[v]
        assert got, f"restored vCPU {v} made no report"
        last_before = before[v][-1][0]
        assert all(i > last_before for i, _ in got)
        assert all(i >= captured[v] for i, _ in got)
        assert got[-1][0] > captured[v]
        # The restored guest picks up at the next multiple of EVERY: no gap, no repeat.
        assert [i for i, _ in got] == [last_before + EVERY * (k + 1) for k in range(len(got))]
        verify_chain(SEED, before[v] + got)
        # Same machine state, same chain: where both ran, both reported the same hashes.
        ref = dict(later.get(v, []))
        common = [(i, h) for i, h in got if i in ref]
        assert common, "the original and the restored machine overlap in no step"
        assert all(ref[i] == h for i, h in common)
        check_status(m2, v, SEED, got[-1])
    assert m2.crashed is None and m1.crashed is None
