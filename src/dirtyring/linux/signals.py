"""How a Linux program a signal killed is reported.

The library OS ends such a program with DONE carrying ``(sig << 8) | (128 + sig)``
(libos.h ``DONE_KILLED``): the low byte is the status a shell shows for a killed process, so
every path that takes ``exit_code & 0xFF`` already exits like the program would; the byte above
names the signal. The value comes from the guest, which the program can scribble on: anything
but an exit status or a consistent pair is refused (``killed_by`` raises ValueError).
"""
from __future__ import annotations

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
