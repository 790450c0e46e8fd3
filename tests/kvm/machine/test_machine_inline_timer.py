"""Inline epochs end on their own timer only: a SIGALRM from anyone else, or one left over from
an earlier run, must not cut the next run short (the guest would get no time at all)."""
from __future__ import annotations

import signal
import threading
import time

from dirtyring.guests.protocol import GuestParams, Pattern
from dirtyring.machine.config import MachineConfig
from dirtyring.machine.vcpu import VcpuRunner, thread_timer
from dirtyring.machine.vm import Machine

MiB = 1 << 20


def _inline(machines: list[Machine]) -> Machine:
    m = Machine(MachineConfig(guest="dirtier", tracker="none", data_slots=(MiB,),
                              params=GuestParams(pattern=Pattern.HOT, hot_pages=16)),
                threaded=False)
    machines.append(m)
    m.runners[0].run_inline(0.002)
    return m


def _pending_alarm() -> bool:
    return signal.SIGALRM in signal.sigpending()


def _timed_run(r: VcpuRunner, seconds: float) -> tuple[str, int]:
    """Run inline for ``seconds``; returns why it stopped and how long it took (ns, monotonic).

    The run's timer is a CLOCK_MONOTONIC one-shot armed inside the call, so a run ended by its
    own timer cannot return before ``seconds`` have passed on any host, however fast or loaded;
    a run cut short by a stale or foreign SIGALRM returns long before. That is the defect these
    tests guard against, checked without assuming how much the guest gets done in the time.
    """
    t0 = time.monotonic_ns()
    why = r.run_inline(seconds)
    return why, time.monotonic_ns() - t0


def _interval_ns(seconds: float) -> int:
    """The timer's own rounding of ``seconds`` (see ThreadTimer.arm): the least a full run lasts."""
    return max(int(seconds * 1e9), 1000)


def test_a_foreign_sigalrm_does_not_end_the_run(machines: list[Machine]) -> None:
    m = _inline(machines)
    r = m.runners[0]
    signal.pthread_kill(threading.get_ident(), signal.SIGALRM)  # blocked here: stays pending
    assert _pending_alarm()
    before = m.progress()
    why, took = _timed_run(r, 0.02)
    assert why == "interval"
    assert took >= _interval_ns(0.02)  # the foreign signal was only swallowed: a full interval
    assert m.progress() > before  # and the guest ran in it
    assert not _pending_alarm()


def test_runs_leave_no_signal_behind(machines: list[Machine]) -> None:
    m = _inline(machines)
    r = m.runners[0]
    for seconds in (0.0001, 0.0005, 0.001) * 20:
        r.run_inline(seconds)
        assert not _pending_alarm()
        # Even a run cut short by something else disarms its timer: nothing fires later.
    timer = thread_timer()
    assert not timer.pending()


def test_every_inline_run_lets_the_guest_run(machines: list[Machine]) -> None:
    """Every short run lasts its whole interval (none is cut short by the previous run's
    signal), and the guest runs in them. How much it gets done in 300 µs depends on the host
    and its load (a descheduled thread can spend a whole interval off the CPU), so progress is
    checked over the runs, and the per-run check is the one that does not depend on speed."""
    m = _inline(machines)
    r = m.runners[0]
    start = m.progress()
    for _ in range(200):
        why, took = _timed_run(r, 0.0003)
        assert why == "interval"
        assert took >= _interval_ns(0.0003)
        assert not _pending_alarm()
    assert m.progress() > start
