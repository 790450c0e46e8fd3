"""Fast rollback on real KVM: thousands of run/rollback iterations, and after every rollback guest
memory is exactly the root's (fingerprint), for the ring, bitmap and hot-set trackers; the
guest then replays identically, which it only does if its registers were restored too."""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

from dirtyring.guests.protocol import GuestParams, Pattern, hash_chain
from dirtyring.machine.config import MachineConfig
from dirtyring.machine.vm import Machine
from dirtyring.snapshots.rollback import Rollback
from dirtyring.machine.fingerprint import fingerprint

MiB = 1 << 20
TRACKERS = ["ring", "bitmap", "hotset"]
#: The longest a guest run that must finish may take, and how long a test may drive runs
#: towards what it needs before it fails. Generous: a slow or loaded host only takes longer
#: (a run that finishes returns at once).
DEADLINE = 60.0


def dirtier(machines: list[Machine], tracker: str, *, threaded: bool = False,
            **params: Any) -> Machine:
    params.setdefault("pattern", Pattern.RANDOM)
    cfg = MachineConfig(guest="dirtier", tracker=tracker, data_slots=(1 * MiB,),
                        params=GuestParams(**params))
    m = Machine(cfg, threaded=threaded)
    machines.append(m)
    return m


def loop(m: Machine, rb: Rollback, root_digest: bytes, n: int, seed: int) -> list[int]:
    """n iterations with a new input each (the dirtier's seed and write count, put in the
    control page by the VMM, like a fuzzer's input); returns the pages restored each time."""
    rng = np.random.default_rng(seed)
    restored = []
    # The root's write count: 0 for an inline machine marked before it ran; a threaded machine
    # may have run a little before mark() (its vCPU thread starts at once).
    base = m.status(0, "progress")
    for i in range(n):
        writes = int(rng.integers(1, 300))
        m.set_control("seed", int(rng.integers(1, 1 << 62)))
        m.set_control("max_writes", base + writes)
        assert rb.run(DEADLINE) == "stopped", f"iteration {i}: the guest did not finish"
        m.check()
        assert m.status(0, "progress") == base + writes  # counted from the root
        restored.append(rb.rollback())
        assert fingerprint(m.memory) == root_digest, f"memory differs from root after rollback {i}"  # type: ignore[arg-type]
    return restored


@pytest.mark.parametrize("tracker", TRACKERS)
def test_thousands_of_rollbacks_restore_the_root_exactly(machines: list[Machine],
                                                         tracker: str) -> None:
    m = dirtier(machines, tracker)
    rb = Rollback(m)
    root = rb.mark()
    assert root.digest == fingerprint(m.memory)  # type: ignore[arg-type]
    restored = loop(m, rb, root.digest, 2000, seed=TRACKERS.index(tracker))
    st = rb.statistics()
    assert st.rollbacks == 2000 and st.full_restores == 0
    assert min(restored) >= 2  # a data page, the status page (and the control page we wrote)
    assert m.progress() == 0 and not m.finished


@pytest.mark.parametrize("tracker,exact", [("ring", False), ("hotset", False), ("ring", True)])
def test_same_input_replays_identically(machines: list[Machine], tracker: str,
                                        exact: bool) -> None:
    """Same input after every rollback: the guest writes the same pages with the same values
    (its PRNG and counters run from the root's registers), so memory after each run is equal."""
    m = dirtier(machines, tracker, max_writes=150, seed=77)
    rb = Rollback(m, exact=exact)
    root = rb.mark()
    after = set()
    for _ in range(300):
        assert rb.run(DEADLINE) == "stopped"
        after.add(fingerprint(m.memory))  # type: ignore[arg-type]
        rb.rollback()
    assert len(after) == 1 and root.digest not in after
    assert fingerprint(m.memory) == root.digest  # type: ignore[arg-type]


def test_root_in_the_middle_of_a_computation(machines: list[Machine]) -> None:
    """A root taken while the compute guest is mid-chain: every run from it reports the same
    (correct) hash chain values, so the registers holding the chain were restored. The runs
    are long enough for a report (they get longer until one comes, however fast the host)."""
    cfg = MachineConfig(guest="compute", tracker="hotset", data_slots=(1 * MiB,),
                        params=GuestParams(report_every=5000, seed=3))
    m = Machine(cfg, threaded=False)
    machines.append(m)
    end = time.monotonic() + DEADLINE
    while m.status(0, "step") == 0:  # mid-chain
        assert time.monotonic() < end, "the compute guest made no step"
        m.runners[0].run_inline(0.005)
    rb = Rollback(m)
    root = rb.mark()
    step0 = m.status(0, "step")
    runs: list[list[Any]] = []
    length = 0.003
    while len([r for r in runs if r]) < 10:  # runs that reported
        assert time.monotonic() < end, (len(runs), length)
        n0 = len(m.outputs)
        assert rb.run(length) == "interval"
        runs.append([p for k, p in m.outputs[n0:] if k == "report"])
        if not runs[-1]:
            length *= 2
        rb.rollback()
        assert m.status(0, "step") == step0
        assert fingerprint(m.memory) == root.digest  # type: ignore[arg-type]
    reps = [r for r in runs if r]
    common = min(len(r) for r in reps)
    assert common and all(r[:common] == reps[0][:common] for r in reps)
    _, i, h = reps[0][0]
    assert h == hash_chain(3, i)


def test_threaded_machine_rolls_back_too(machines: list[Machine]) -> None:
    m = dirtier(machines, "ring", threaded=True)
    rb = Rollback(m)
    root = rb.mark()
    loop(m, rb, root.digest, 100, seed=11)


def test_untracked_machine_restores_all_memory(machines: list[Machine]) -> None:
    m = dirtier(machines, "none")
    assert m.memory is not None
    rb = Rollback(m)
    root = rb.mark()
    for _ in range(5):
        m.set_control("max_writes", 50)
        assert rb.run(DEADLINE) == "stopped"
        assert rb.rollback() == sum(s.info.pages for s in m.memory.slots)
        assert fingerprint(m.memory) == root.digest


def test_ring_full_during_a_run_is_carried_into_the_rollback(machines: list[Machine]) -> None:
    """More dirty pages than the ring holds: the run harvests on each ring-full exit and the
    rollback restores those pages too."""
    cfg = MachineConfig(guest="dirtier", tracker="ring", ring_entries=256,
                        data_slots=(4 * MiB,),
                        params=GuestParams(pattern=Pattern.SEQUENTIAL, max_writes=900))
    m = Machine(cfg, threaded=False)
    machines.append(m)
    rb = Rollback(m)
    root = rb.mark()
    for _ in range(20):
        assert rb.run(DEADLINE) == "stopped"
        assert rb.rollback() >= 900
        assert fingerprint(m.memory) == root.digest  # type: ignore[arg-type]


def test_rollback_before_mark_is_an_error(machines: list[Machine]) -> None:
    from dirtyring.errors import ConfigError
    m = dirtier(machines, "ring")
    with pytest.raises(ConfigError, match="mark"):
        Rollback(m).rollback()


def test_fast_path_is_taken(machines: list[Machine]) -> None:
    """Not a benchmark (see ``dirtyring bench rollback``): only that the fast path is taken:
    the fast vCPU restore, one guest entry per run (DONE is not completed by a second
    KVM_RUN), and only the hot pages plus status and stack restored."""
    m = dirtier(machines, "hotset", pattern=Pattern.HOT, hot_pages=64, max_writes=64)
    rb = Rollback(m)
    root = rb.mark()
    assert not rb.exact
    r = m.runners[0]
    exits = sum(r.exits.values())
    pages = [0] * 500
    for i in range(500):
        assert rb.run(DEADLINE) == "stopped"
        pages[i] = rb.rollback()
    assert sum(r.exits.values()) - exits == 500
    assert 64 <= min(pages) and max(pages) <= 64 + 4
    assert rb.statistics().full_restores == 0
    assert fingerprint(m.memory) == root.digest  # type: ignore[arg-type]
