"""A vCPU on its own thread, with a pause protocol that never traps the GIL.

Theory of operation
-------------------
The thread loops on KVM_RUN (which releases the GIL). To pause it, the controller sets
``kvm_run.immediate_exit = 1`` and then sends KICK_SIGNAL to the thread: if the thread is inside
KVM_RUN the signal makes it return EINTR; if it is just about to enter, immediate_exit makes
KVM_RUN return EINTR at once. Either way the thread sees KVM_EXIT_INTR and parks on a Condition.

A vCPU parks only after a KVM_RUN that returned INTR (or after DIRTY_RING_FULL / a crash). That
matters for state capture: after an I/O exit, the instruction completes on the *next* KVM_RUN,
so a vCPU parked straight after an I/O exit would be captured mid-instruction. Re-running with
immediate_exit set completes the I/O and returns without entering the guest.
"""
from __future__ import annotations

import ctypes as C
import os
import signal
import threading
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from .._bindings import VcpuFd
from .._bindings import _uapi as U
from ..errors import DirtyringError, KvmError
from . import native
from .exits import (BATCH_STOPS, CRASHED, FINISHED, INTERVAL, RING_FULL, RUN_ON, SIGNAL,
                    STOP_OF, STOPPED, StopReason, serve)

if TYPE_CHECKING:
    from .vm import Machine

KICK_SIGNAL = signal.SIGUSR1


def _noop(signum: int, frame: object) -> None:
    pass


_ALRM = {signal.SIGALRM}
_SI_TIMER = -2  # siginfo si_code of a POSIX timer's signal (asm-generic/siginfo.h)

#: The kvm_run of the vCPU currently run inline, if any (SIGALRM sets its immediate_exit).
_ARMED: list = [None]


class _sigevent(C.Structure):
    _fields_ = [("sigev_value", C.c_uint64), ("sigev_signo", C.c_int), ("sigev_notify", C.c_int),
                ("sigev_notify_thread_id", C.c_int), ("_pad", C.c_int * 11)]


class _timespec(C.Structure):
    _fields_ = [("tv_sec", C.c_long), ("tv_nsec", C.c_long)]


class _itimerspec(C.Structure):
    _fields_ = [("it_interval", _timespec), ("it_value", _timespec)]


class ThreadTimer:
    """A one-shot POSIX timer whose SIGALRM goes to *this* thread (SIGEV_THREAD_ID).

    setitimer's SIGALRM is process-directed: with other threads about (a sender, a receiver),
    the kernel may hand it to one of them, and the guest thread then stays in KVM_RUN until
    the guest exits on its own (seen here as epochs of ~100 ms instead of 100 µs).
    """

    SIGEV_THREAD_ID = 4

    def __init__(self) -> None:
        libc = C.CDLL(None, use_errno=True)
        self._create = libc.timer_create
        self._create.argtypes = [C.c_int, C.POINTER(_sigevent), C.POINTER(C.c_void_p)]
        self._settime = libc.timer_settime
        self._settime.argtypes = [C.c_void_p, C.c_int, C.POINTER(_itimerspec),
                                  C.POINTER(_itimerspec)]
        self._gettime = libc.timer_gettime
        self._gettime.argtypes = [C.c_void_p, C.POINTER(_itimerspec)]
        self._delete = libc.timer_delete
        self._delete.argtypes = [C.c_void_p]
        ev = _sigevent(sigev_signo=int(signal.SIGALRM), sigev_notify=self.SIGEV_THREAD_ID,
                       sigev_notify_thread_id=threading.get_native_id())
        self._id = C.c_void_p()
        if self._create(1, C.byref(ev), C.byref(self._id)) != 0:  # CLOCK_MONOTONIC
            raise DirtyringError(f"timer_create failed: {os.strerror(C.get_errno())}")
        self.thread_id = threading.get_native_id()
        self._spec = _itimerspec()
        self._zero = _itimerspec()
        self._now = _itimerspec()
        # Arm and disarm are one C call each with prebuilt arguments, keeping the GIL: every
        # epoch and every rollback does both (~2.3 µs per arm right after a guest run here,
        # against ~4 µs building the argument in Python and releasing the GIL).
        fast = C.PyDLL(None, use_errno=True).timer_settime
        fast.argtypes = [C.c_void_p, C.c_int, C.c_void_p, C.c_void_p]
        self._fast_set = fast
        self._tid = self._id.value
        self._spec_ptr = C.addressof(self._spec)
        self._zero_ptr = C.addressof(self._zero)
        self._seconds = -1.0

    def arm(self, seconds: float) -> None:
        if seconds != self._seconds:
            ns = max(int(seconds * 1e9), 1000)
            self._spec.it_value.tv_sec, self._spec.it_value.tv_nsec = divmod(ns, 1_000_000_000)
            self._seconds = seconds
        self._fast_set(self._tid, 0, self._spec_ptr, None)

    @property
    def id(self) -> int:
        """The timer_t, for native code that arms it (``native.EpochBatch``)."""
        return int(self._tid or 0)

    def pending(self) -> bool:
        """True while the timer has not fired yet."""
        self._gettime(self._id, C.byref(self._now))
        return bool(self._now.it_value.tv_sec or self._now.it_value.tv_nsec)

    def disarm(self) -> None:
        self._fast_set(self._tid, 0, self._zero_ptr, None)

    def close(self) -> None:
        if self._id is not None:
            self._delete(self._id)
            self._id = None  # type: ignore[assignment]


_TIMERS: dict[int, ThreadTimer] = {}


def disarm(timer: ThreadTimer) -> None:
    """Stop ``timer`` and drop its signal if it fired after the last KVM_RUN: a stale SIGALRM
    would end the next run at once (it stays pending, blocked, outside KVM_RUN)."""
    timer.disarm()
    signal.sigtimedwait(_ALRM, 0)


def thread_timer() -> ThreadTimer:
    tid = threading.get_native_id()
    t = _TIMERS.get(tid)
    if t is None:
        t = _TIMERS[tid] = ThreadTimer()
    return t


def _alarm(signum: int, frame: object) -> None:
    rs = _ARMED[0]
    if rs is not None:
        rs.immediate_exit = 1


def install_kick_handler() -> None:
    """KVM_RUN is only interrupted by a signal that has a handler (an ignored one is dropped)."""
    if signal.getsignal(KICK_SIGNAL) is _noop:
        return
    if threading.current_thread() is not threading.main_thread():
        raise DirtyringError("the first machine must be created from the main thread "
                             "(it installs the vCPU kick signal handler)")
    signal.signal(KICK_SIGNAL, _noop)


def install_alarm_handler() -> None:
    """SIGALRM ends inline epochs. It stays *blocked* in the thread that runs the vCPU (and in
    every thread it starts later) and is unblocked only inside KVM_RUN (KVM_SET_SIGNAL_MASK):
    a handler could otherwise consume it in the instant between releasing the GIL and entering
    KVM_RUN, and the guest would run on until it exits by itself (seen: epochs that never end).
    A pending SIGALRM makes KVM_RUN return at once; we then consume it with sigtimedwait."""
    if signal.getsignal(signal.SIGALRM) is not _alarm:
        signal.signal(signal.SIGALRM, _alarm)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})


class VcpuRunner:
    """One vCPU and the thread that runs it."""

    def __init__(self, machine: Machine, fd: VcpuFd, index: int) -> None:
        self.machine = machine
        self.fd = fd
        self.index = index
        self.run_struct = fd.run_struct
        #: The kvm_run mapping's address (``exits.out_value``).
        self.run_address = C.addressof(self.run_struct)
        self.exits: Counter[int] = Counter()
        self.pause_requested = False
        self.parked = False
        self.finished = False
        self.exit_code: int | None = None
        self.ring_full = False
        self.crash: str | None = None
        self.quit = False
        self.thread: threading.Thread | None = None
        #: KVM copies regs, sregs and events into kvm_run on every exit (KVM_CAP_SYNC_REGS), so a
        #: capture after a run needs no ioctl for them (fd.sync_valid says whether it is current).
        self.static_state: dict[str, object] | None = None
        self._inline_ready = False
        #: The inline run's timer signal was taken (the timer is spent: nothing to disarm).
        self._timer_spent = False
        #: When an inline epoch ends (time.monotonic()); devices that block (the key-value
        #: doorbell) never wait past it. 0 when not running inline.
        self.deadline = 0.0
        if machine.kvm.check_extension_int(U.KVM_CAP_SYNC_REGS) & 7 == 7:
            self.run_struct.kvm_valid_regs = (U.KVM_SYNC_X86_REGS | U.KVM_SYNC_X86_SREGS
                                              | U.KVM_SYNC_X86_EVENTS)

    # --- controller side ----------------------------------------------------------------------
    def start(self) -> None:
        self.thread = threading.Thread(target=self._main, name=f"vcpu{self.index}", daemon=True)
        self.thread.start()

    def kick(self) -> None:
        """Make the thread leave KVM_RUN soon (call with pause_requested or quit set)."""
        self.run_struct.immediate_exit = 1
        t = self.thread
        if t is not None and t.ident is not None and t.is_alive() and not self.parked:
            try:
                signal.pthread_kill(t.ident, KICK_SIGNAL)
            except ProcessLookupError:
                pass

    @property
    def runnable(self) -> bool:
        return not (self.finished or self.crash or self.quit)

    # --- thread side ----------------------------------------------------------------------------
    def _must_park(self) -> bool:
        return self.pause_requested or self.finished or self.ring_full or self.crash is not None \
            or self.quit

    def _park(self) -> None:
        cv = self.machine.cv
        with cv:
            self.parked = True
            cv.notify_all()
            while self._must_park() and not self.quit:
                cv.wait()
            self.parked = False
        self.run_struct.immediate_exit = 0 if not self._must_park() else 1

    def _main(self) -> None:
        m = self.machine
        run = self.fd.run
        try:
            while not self.quit:
                if self.pause_requested or self.finished:
                    # Not yet proven clean: re-run with immediate_exit to complete pending I/O
                    # (a FINISHED guest's ``out`` too: the next run's INTR then parks it).
                    self.run_struct.immediate_exit = 1
                reason = run()
                self.fd.sync_valid = True
                self.exits[reason] += 1
                x = serve(self, reason)
                if x is SIGNAL:
                    if self._must_park():
                        self._park()
                elif x is RING_FULL or x is CRASHED:
                    self._park()
        except KvmError as e:
            self.crash = str(e)
            m.on_crash(self)
            with m.cv:
                self.parked = True
                m.cv.notify_all()
        except BaseException as e:  # a device handler bug must not hang the controller
            self.crash = f"VMM error on vCPU {self.index}: {type(e).__name__}: {e}{_where(e)}"
            m.on_crash(self)
            with m.cv:
                self.parked = True
                m.cv.notify_all()
        with m.cv:
            self.parked = True
            m.cv.notify_all()

    # --- inline: the vCPU runs in the calling (main) thread ----------------------------------------
    def run_inline(self, seconds: float, *, first_exit: int | None = None) -> StopReason:
        """Run the guest in this thread for up to ``seconds``; returns why it stopped:
        ``INTERVAL``, ``BUDGET`` (ring full), ``STOPPED`` (finished or crashed).

        ``first_exit``: go on with an epoch a batch (``run_batch``) left at that exit, with
        the timer still armed for it.

        The single-threaded epoch driver: a one-shot timer aimed at this thread, armed right
        before entering the guest, interrupts KVM_RUN.
        If the timer fires while we are in Python between two exits, its handler sets
        immediate_exit so the next KVM_RUN returns at once: no expiry is ever lost. This beat a
        kicker thread on our hosts (``time.sleep`` overshot each epoch by 100-140 µs).
        """
        if self.finished or self.crash:
            return STOPPED
        timer = self._enter_inline(seconds, armed=first_exit is not None)
        try:
            return self._inline_loop(timer, first_exit)
        finally:
            self._leave_inline(timer)

    def _enter_inline(self, seconds: float, *, armed: bool) -> ThreadTimer:
        """Set up an inline run of ``seconds`` and arm its timer, unless a batch left it
        ``armed``; returns this thread's timer."""
        self._prepare_inline()
        rs = self.run_struct
        self.parked = False
        _ARMED[0] = rs
        timer = thread_timer()
        self.deadline = time.monotonic() + seconds
        self._timer_spent = False
        if not armed:
            rs.immediate_exit = 0
            timer.arm(seconds)
        return timer

    def _inline_loop(self, timer: ThreadTimer, first_exit: int | None) -> StopReason:
        """KVM_RUN and serve each exit (``inline_exit``) until one ends the run."""
        run = self.fd.run
        fd = self.fd
        exits = self.exits
        reason = run() if first_exit is None else first_exit
        while True:
            fd.sync_valid = True
            exits[reason] += 1
            why = self.inline_exit(reason, timer)
            if why is not None:
                return why
            reason = run()

    def inline_exit(self, reason: int, timer: ThreadTimer) -> StopReason | None:
        """Serve one exit of an inline run (``exits.serve``): None, the guest runs on; else
        why the run stops. A finished guest's ``out`` is completed first (``complete_io``).
        Also what the rollback's fast path does with an exit it does not shortcut."""
        x = serve(self, reason)
        if x is RUN_ON:
            return None
        if x is SIGNAL:
            return self._timer_check(timer)
        if x is FINISHED:
            self.complete_io()
        return STOP_OF[x]

    def _timer_check(self, timer: ThreadTimer) -> StopReason | None:
        """After a KVM_EXIT_INTR: did the epoch end? Eats the (blocked, pending) timer signal.
        One our timer sent means it fired (a run drains its own stale one; another sender's is
        not ours); a signal that is not ours leaves the run going on."""
        info = signal.sigtimedwait(_ALRM, 0)
        self._timer_spent = fired = info is not None and info.si_code == _SI_TIMER
        if fired or self.run_struct.immediate_exit or not timer.pending():
            # The caller re-runs once with immediate_exit set, so a pending I/O completes
            # before the state can be captured.
            return STOPPED if self.quit else INTERVAL
        return None

    def complete_io(self) -> None:
        """A KVM_RUN with ``immediate_exit`` set: it completes a pending I/O instruction and
        returns without entering the guest."""
        self.run_struct.immediate_exit = 1
        self.fd.run()

    def _leave_inline(self, timer: ThreadTimer) -> None:
        """Undo ``_enter_inline``: the timer disarmed (unless its signal was taken), the vCPU
        parked."""
        if not self._timer_spent:
            disarm(timer)
        self.deadline = 0.0
        _ARMED[0] = None
        self.run_struct.immediate_exit = 0
        self.ring_full = False
        self.parked = True

    def _prepare_inline(self) -> None:
        if not self._inline_ready:
            install_alarm_handler()
            self.fd.set_signal_mask(set())  # in KVM_RUN, every signal interrupts the guest
            self._inline_ready = True

    def epoch_batch(self) -> native.EpochBatch:
        """A batch for this vCPU, to be run from this thread (it arms this thread's timer)."""
        return native.EpochBatch(self.fd.fd, C.addressof(self.run_struct), thread_timer().id)

    def run_batch(self, batch: native.EpochBatch, interval: float,
                  programs: list[native.PauseProgram], watch: Any = None,
                  watch_value: int = 0, tsc_offset: int = 0) -> StopReason:
        """Up to ``len(programs)`` epochs of ``interval`` in one native call, each followed by
        its pause program (``EpochBatch``); ``batch.done`` of them are complete. Returns what
        ``run_inline`` would for the epoch that ended the batch (``exits.BATCH_STOPS``):
        ``INTERVAL`` (the batch ran out, or that epoch's program found a changed log: it is
        paused, its program not done), ``STOPPED``, or ``EXIT``: an exit the batch does not
        handle (I/O) stopped the epoch in progress; ``run_inline(interval,
        first_exit=batch.detail)`` handles it and runs that epoch on to its end (once the
        caller has dealt with the epochs completed before it)."""
        if self.finished or self.crash:
            return STOPPED
        self._prepare_inline()
        self.parked = False
        try:
            batch.run(interval, programs, watch, watch_value, tsc_offset)
        finally:
            self.parked = True
        self.fd.sync_valid = True
        if batch.intr:
            self.exits[U.KVM_EXIT_INTR] += batch.intr
        stop = BATCH_STOPS[batch.why]
        if stop is None:
            if batch.why == native.RUN_FAILED:
                raise KvmError("KVM_RUN", batch.err)
            raise native.program_error(batch.detail, batch.err)
        return STOPPED if stop is INTERVAL and self.quit else stop


def _where(e: BaseException) -> str:
    """`` (in file.py:LINE func)``: where in the VMM an error on a vCPU thread was raised, so a
    bug report names it (the thread has no one to print a traceback to)."""
    tb = e.__traceback__
    if tb is None:
        return ""
    while tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code
    return f" (in {code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno} {code.co_name})"
