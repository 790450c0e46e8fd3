"""Signals and a Linux program: sending it one from outside, and reporting one that killed it.

Sending (``send_signal``, ``interrupt``): ``dirtyring run --exec`` (and ``restore`` of a
program) forwards the SIGHUP, SIGINT, SIGQUIT and SIGTERM it gets to its program, as a shell's foreground job gets them (Ctrl-C runs
the program's handler, or ends it with status 130). With the program paused, the VMM sets the
signal's bit in the library OS's ``ext_signals`` area. If the program is running its own code,
the VMM also saves its registers there and points its RIP at the library OS's async entry,
which delivers the signal as a kernel does after an interrupt (libos.h, proc.c). If the library
OS is serving a syscall, it takes the signal when that call returns, or cuts a sleep or a wait
for stdin short with EINTR. Waits that only a signal could end (pause, sigsuspend, a futex or
sigtimedwait without a timeout) are still reported rather than waited out, and an interrupted
read of stdin returns EINTR even under SA_RESTART.

Reporting: the library OS ends a killed program with DONE carrying ``(sig << 8) | (128 + sig)``
(libos.h ``DONE_KILLED``): the low byte is the status a shell shows for a killed process, so
every path that takes ``exit_code & 0xFF`` already exits like the program would; the byte above
names the signal. The value comes from the guest, which the program can scribble on: anything
but an exit status or a consistent pair is refused (``killed_by`` raises ValueError).
"""
from __future__ import annotations

import signal as _signal
import struct
from collections import deque
from typing import TYPE_CHECKING

from ..guests.protocol import EXT_SIGNALS_OFFSET
from ..machine import layout

if TYPE_CHECKING:
    from ..machine.vm import Machine

#: The signals ``run --exec`` passes on to its program (SIGUSR1 and SIGUSR2 are dirtyring's
#: own: they kick vCPUs and dump its threads' stacks).
FORWARDED = (_signal.SIGHUP, _signal.SIGINT, _signal.SIGQUIT, _signal.SIGTERM)
_BASE = layout.QUEUE_GPA + EXT_SIGNALS_OFFSET
_CTX = struct.Struct("<18Q")

#: Linux's x86-64 signal names (32 and 33 are glibc's internal ones; 34..64 are SIGRTMIN+n).
NAMES = {1: "SIGHUP", 2: "SIGINT", 3: "SIGQUIT", 4: "SIGILL", 5: "SIGTRAP", 6: "SIGABRT",
         7: "SIGBUS", 8: "SIGFPE", 9: "SIGKILL", 10: "SIGUSR1", 11: "SIGSEGV", 12: "SIGUSR2",
         13: "SIGPIPE", 14: "SIGALRM", 15: "SIGTERM", 16: "SIGSTKFLT", 17: "SIGCHLD",
         18: "SIGCONT", 19: "SIGSTOP", 20: "SIGTSTP", 21: "SIGTTIN", 22: "SIGTTOU", 23: "SIGURG",
         24: "SIGXCPU", 25: "SIGXFSZ", 26: "SIGVTALRM", 27: "SIGPROF", 28: "SIGWINCH",
         29: "SIGIO", 30: "SIGPWR", 31: "SIGSYS"}
NSIG = 64


def signal_name(sig: int) -> str:
    """``SIGABRT``; real-time signals as ``SIGRT32`` ... ``SIGRT64`` (their kernel numbers)."""
    return NAMES.get(sig, f"SIGRT{sig}")


def killed_by(done: int | None) -> int | None:
    """The signal that killed the program, from DONE's value; None if it exited by itself.
    Raises ValueError for a value the library OS never sends."""
    if done is None or 0 <= done <= 0xFF:
        return None
    sig = done >> 8
    if done < 0 or not 1 <= sig <= NSIG or done & 0xFF != 128 + sig:
        raise ValueError(f"the program ended with DONE value {done:#x}, which is neither an "
                         "exit status nor a signal's")
    return sig


def killed_line(sig: int) -> str:
    """The report for a program a signal killed (its status is 128 + sig, as a shell's)."""
    return f"the program was killed by signal {sig} ({signal_name(sig)})"


def end_report(done: int | None) -> str | None:
    """The line to print when a program ended with DONE's value ``done``: a killing signal, a
    value that cannot be right, or None for an ordinary exit."""
    try:
        sig = killed_by(done)
    except ValueError as e:
        return str(e)
    return None if sig is None else killed_line(sig)


class OutsideSignals:
    """Signals for a program from outside: ``put`` them from anywhere (a signal handler), and
    the run loop ``deliver``s them at each pause of its machine."""

    def __init__(self) -> None:
        self.queue: deque[int] = deque()
        self._waiting = False  # sent, not yet taken by the library OS

    def put(self, sig: int) -> None:
        self.queue.append(sig)

    @property
    def busy(self) -> bool:
        """Is there a signal to send, or one sent and not taken yet (the next pause must
        deliver or retry)?"""
        return bool(self.queue) or self._waiting

    def deliver(self, m: Machine) -> None:
        """At a pause: send what came since the last one; for a signal sent but not taken
        yet, try again to interrupt the program. Only for signals sent here: bits a program
        scribbled into the area do not make the VMM move it."""
        while self.queue:
            send_signal(m, self.queue.popleft())
            self._waiting = True
        if self._waiting and (interrupt(m) or not _pending(m)):
            self._waiting = False


def _pending(m: Machine) -> int:
    assert m.memory is not None
    return m.memory.read_u64(_BASE)


def send_signal(m: Machine, sig: int) -> bool:
    """Send signal ``sig`` (1..64) to the program of ``m`` from outside; its vCPU must be
    paused. True if it was interrupted in its own code to take it now; otherwise the library
    OS takes it on its way back to the program (``interrupt`` tries again at later pauses)."""
    if not 1 <= sig <= NSIG:
        raise ValueError(f"no signal {sig}")
    assert m.memory is not None
    m.memory.write_u64(_BASE, m.memory.read_u64(_BASE) | 1 << (sig - 1))
    return interrupt(m)


def interrupt(m: Machine) -> bool:
    """If a signal from outside waits for the paused program and it is running its own code,
    send it to the library OS's async entry now (True). The entry is read from guest memory,
    which the program can scribble on: one outside the library OS's code is not used (the
    signal then waits for the next syscall), so nothing the program writes there can make the
    VMM run it anywhere else."""
    mem = m.memory
    if mem is None or not m.runners or m.finished or not mem.read_u64(_BASE):
        return False
    entry = mem.read_u64(_BASE + 8)
    if not layout.CODE_GPA <= entry < layout.CODE_LIMIT:
        return False
    fd = m.runners[0].fd
    r = fd.get_regs()
    if layout.CODE_GPA <= r.rip < layout.CODE_LIMIT:
        return False  # the library OS is running: it takes the signal itself
    mem.write(_BASE + 24, _CTX.pack(r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15, r.rdi,
                                    r.rsi, r.rbp, r.rbx, r.rdx, r.rax, r.rcx, r.rsp, r.rip,
                                    r.rflags))
    r.rip = entry
    fd.set_regs(r)
    return True


def set_forwarding(m: Machine, on: bool) -> None:
    """Tell the library OS whether signals from outside can come (the VMM forwards them): then
    a wait only a signal can end (pause, sigsuspend, sigwait, a futex without a timeout) waits
    for one, as natively; otherwise it is reported, as nothing could ever end it."""
    assert m.memory is not None
    m.memory.write_u64(_BASE + 16, 1 if on else 0)
