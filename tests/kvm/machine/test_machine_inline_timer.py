"""Inline epochs end on their own timer only: a SIGALRM from anyone else, or one left over from
an earlier run, must not cut the next run short (the guest would get no time at all)."""
from __future__ import annotations

import signal
import threading

from dirtyring.guests.protocol import GuestParams, Pattern
from dirtyring.machine.config import MachineConfig
from dirtyring.machine.vcpu import thread_timer
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


def test_a_foreign_sigalrm_does_not_end_the_run(machines: list[Machine]) -> None:
    m = _inline(machines)
    r = m.runners[0]
    signal.pthread_kill(threading.get_ident(), signal.SIGALRM)  # blocked here: stays pending
    assert _pending_alarm()
    before = m.progress()
    assert r.run_inline(0.02) == "interval"
    assert m.progress() > before  # the guest ran: the foreign signal was only swallowed
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
    m = _inline(machines)
    r = m.runners[0]
    for _ in range(200):
        before = m.progress()
        assert r.run_inline(0.0003) == "interval"
        assert m.progress() > before
