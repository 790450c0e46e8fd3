"""The protected primary's epoch loop must never wedge: whatever the interval, epochs keep being
committed and `protect --seconds N` returns on time.

Regression test: the single-vCPU inline driver used to lose its epoch timer when SIGALRM fired
after the last bytecode boundary and before the KVM_RUN syscall (the Python-level handler that
sets immediate_exit never ran in time), leaving a never-exiting guest in KVM_RUN for good: no
more checkpoints, heartbeats still flowing, --seconds and SIGTERM ignored. At a 20 us interval
that happened in every run; fixed by f6b5dce (SIGALRM blocked outside KVM_RUN,
KVM_SET_SIGNAL_MASK)."""
from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # repl_helpers sits beside the tests; works in any import mode
    sys.path.insert(0, _HERE)
from repl_helpers import HB_CALM, PATIENCE, Spawner, control, free_port, spawn  # noqa: E402

__all__ = ["spawn"]  # the fixture, imported so pytest finds it


#: Epochs committed at the tiny interval, in all, before the test is done (the wedge showed
#: within a few dozen).
EPOCHS = 50


def test_tiny_interval_primary_keeps_committing_and_stops_on_time(spawn: Spawner) -> None:
    """`protect --seconds 2` sessions, one after another against the same standby, until it has
    committed EPOCHS epochs in all (one session does on a quick host; a slow one runs fewer
    epochs per session, not wedged ones). Each session must end by itself, having said goodbye,
    and the standby must have committed every epoch the primary sent."""
    sport, cport = free_port(), free_port()
    sb = spawn.standby(sport, control=cport, hb_timeout=HB_CALM)
    st = control(cport)
    sessions = 0
    while st["epochs"] < EPOCHS:
        mark = sb.mark()
        pr = spawn.primary("dirtier", sport, "--pattern", "hot", "--interval", "20us",
                           "--seconds", "2", hb_timeout=HB_CALM)
        rc = pr.wait_exit(PATIENCE)
        st = control(cport)
        assert rc == 0, (f"`protect --seconds 2` still running after {PATIENCE:g} s; "
                         f"standby {st}; {pr.describe()}")
        sessions += 1
        lost = sb.wait_event("primary_lost", PATIENCE, start=mark)
        assert lost is not None and "goodbye" in lost["reason"], (lost, sb.describe())
        done = pr.of("done")[-1]
        st = control(cport)
        assert done["sent_epoch"] > 0 and st["committed_epoch"] == done["sent_epoch"], (st, done)
    print(f"{st['epochs']} epochs committed in {sessions} session(s) at a 20 us interval")


def _children(pid: int) -> list[int]:
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            out += [int(c) for c in f.read().split()]
    return out


def test_uplink_runs_below_the_epoch_loop_priority(spawn: Spawner) -> None:
    """The uplink is background work: it must not take CPU from the loop that holds the guest
    paused (uplink_process.NICE; the figures that motivate it are in its main())."""
    from dirtyring.replication.uplink_process import NICE
    sport = free_port()
    spawn.standby(sport, hb_timeout=HB_CALM)
    pr = spawn.primary("dirtier", sport, "--pattern", "hot", "--seconds", "20",
                       hb_timeout=HB_CALM)
    pr.need_event("protected", PATIENCE)
    uplinks = [c for c in _children(pr.pid)
               if b"uplink_process" in open(f"/proc/{c}/cmdline", "rb").read()]
    assert len(uplinks) == 1, f"children of the primary: {_children(pr.pid)}"
    base = os.getpriority(os.PRIO_PROCESS, pr.pid)
    assert os.getpriority(os.PRIO_PROCESS, uplinks[0]) == min(19, base + NICE)
