"""Run a Linux program to its end under dirty tracking, as ``dirtyring run --exec`` does: its
output passes through, and the result carries its exit status.

The program runs in epochs like every other guest: each epoch the machine is paused, the
tracker harvests what changed (the program's pages and the library OS's alike), and the stdio
queue is drained, so output leaves tagged with the epoch that produced it (what output commit
needs). With ``verify_every``, a shadow copy of guest memory is compared with the real one,
so a page the tracker missed is reported, as ``dirtyring run`` does for built-in guests.
"""
from __future__ import annotations

from collections.abc import Callable
import os
import posixpath
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._bindings import _uapi as U
from ..errors import ConfigError, DirtyringError, ProgramError
from ..machine import layout
from ..machine.epoch import EpochDriver
from ..machine.verify import ShadowCheck
from ..machine.vm import Machine
from .program import LinuxProgram
from .signals import OutsideSignals, killed_by, set_forwarding
from .strace import format_call
from .syscall_names import name as syscall_name

#: What a program that crashed exits with, as a shell reports a SIGSEGV.
CRASH_STATUS = 128 + 11


@dataclass(slots=True)
class ProgramResult:
    """How a program ended. ``status`` is its exit status (or CRASH_STATUS); ``crash`` says
    why it was stopped, if it was; ``signal``, the signal that killed it (then ``status`` is
    128 + signal, as a shell reports it; ``signals.killed_line`` says it in words).

    Example::

        res = dirtyring.run_program(prog, write=lambda stream, data: None)
        if res.crash:
            print("stopped:", res.crash)
        print(res.status, res.epochs, res.dirty_pages, sorted(res.files))
    """

    status: int
    crash: str | None = None
    signal: int | None = None
    epochs: int = 0
    dirty_pages: int = 0
    missed_pages: int = 0
    unsupported: list[str] = field(default_factory=list)
    #: Port exits of the vCPU (the library OS leaves the guest only for the host: a full
    #: output queue, an unsupported syscall, the end).
    io_exits: int = 0
    #: Every file the program's file system held at exit (with ``export_files``): path -> data;
    #: directories map to None.
    files: dict[str, bytes | None] = field(default_factory=dict)
    #: ... and every symbolic link: path -> its target (bytes, as the program wrote it).
    links: dict[str, bytes] = field(default_factory=dict)
    #: Syscall sites the library OS rewrote into jumps, the syscalls that came through them
    #: (no trap), and those that trapped (LinuxProgram's ``rewrite_syscalls``). As the guest
    #: counted them: figures to report, not to trust.
    rewritten_sites: int = 0
    fast_calls: int = 0
    trapped_calls: int = 0
    #: ``time.monotonic()`` when the VMM saw the program end (before the machine is torn
    #: down: closing a VM takes KVM ~7 ms here, which is not the program's time). The clock
    #: is the system's, so another process can compare it with its own start.
    ended_at: float = 0.0


#: ``dirtyring run --exec``'s period when none is named: its epochs when tracked, or, untracked
#: (its default), how often the program's output is fetched while it runs. Output reaches the
#: terminal within it, and pausing the program this rarely costs well under 1 % here.
EXEC_INTERVAL = 10e-3


def run_program(prog: LinuxProgram, *, write: Callable[[str, bytes], None],
                tracker: str = "ring", interval: float = 1e-3, verify_every: int = 0,
                warn: Callable[[str], None] = lambda s: None,
                seconds: float | None = None,
                trace: Callable[[str], None] = lambda s: None,
                stdin: int | None = None,
                signals: OutsideSignals | None = None) -> ProgramResult:
    """Run ``prog`` until it ends. ``write("stdout" | "stderr", bytes)`` gets its output in
    order; ``warn`` gets one line per unsupported syscall (the first time it is used).
    ``seconds`` bounds the run: a program still running then is stopped, and ``crash`` says so.
    ``trace`` gets one line per system call when the program was made with ``strace=True``.
    ``stdin``: a readable descriptor the program's stdin comes from (default: empty).
    ``signals``: signals to send the program from outside (``dirtyring run --exec`` puts there
    those it gets); sent at the next pause, every ``interval``.
    ``tracker="none"`` runs it untracked (no epochs' harvests, no write-protect faults: the
    library OS's own cost); its output is still drained every ``interval``.

    Example::

        import sys
        prog = dirtyring.LinuxProgram("/bin/busybox", ["busybox", "sha256sum", "in.txt"],
                                      files=[("in.txt", None)])
        res = dirtyring.run_program(
            prog, write=lambda stream, data: getattr(sys, stream).buffer.write(data),
            verify_every=10)                     # and check no dirty page was missed
        assert res.missed_pages == 0
        sys.exit(res.status)
    """
    unsupported: list[str] = []
    machine: list[Machine] = []
    res = ProgramResult(status=0, unsupported=unsupported)

    def sink(kind: str, payload: Any) -> None:
        if kind in ("stdout", "stderr"):
            write(kind, bytes(payload))
        elif kind == "unsupported_syscall":
            what = syscall_label(int(payload))
            if what in unsupported:  # the library OS reports numbers >= 512 every time
                return
            unsupported.append(what)
            warn(unsupported_line(prog.name, int(payload)))
        elif kind == "strace":
            for nr, args, ret in payload:
                trace(format_call(nr, args, ret, lambda va: prog.read_str(machine[0], va)))
        elif kind == "files_export":  # on the vCPU thread, at the program's exit
            try:
                for e in prog.exported(machine[0], *payload):
                    if stat.S_ISLNK(e.mode):
                        res.links[e.path] = e.data
                    else:
                        res.files[e.path] = None if stat.S_ISDIR(e.mode) else e.data
            except ProgramError as err:
                res.crash = str(err)

    def boot(m: Machine) -> None:
        """Boot, and set up what the guest may use at once: its vCPU thread starts running it
        as soon as this returns (a fast program had ended, or read an empty stdin, before
        setting them up afterwards could happen)."""
        prog.boot(m)
        if signals is not None:  # someone sends it signals: a wait for one may wait
            set_forwarding(m, True)
        machine.append(m)
        assert m.stdio is not None
        m.stdio.stdin_fd = stdin

    if tracker == "none" and verify_every:
        raise ConfigError("verify_every needs a tracker: nothing is tracked with tracker none")
    with Machine(prog.config(tracker=tracker), boot=boot, sink=sink) as m:
        assert m.memory is not None and m.stdio is not None
        deadline = None if seconds is None else time.monotonic() + seconds
        fwd = signals if signals is not None else OutsideSignals()
        if tracker == "none":
            res.crash = _run_untracked(m, res, interval, deadline, seconds, fwd)
        else:
            res.crash = _run_tracked(m, res, interval, deadline, seconds, verify_every, fwd)
        res.ended_at = time.monotonic()
        m.drain_output()  # anything queued after the last harvest (none once it has ended)
        res.io_exits = m.runners[0].exits[U.KVM_EXIT_IO]
        st = LinuxProgram.rewrite_stats(m)
        res.rewritten_sites, res.fast_calls = st["sites"], st["fast_calls"]
        res.trapped_calls = st["trapped_calls"]
        res.crash = m.crashed or res.crash
        if m.crashed and "triple-faulted" in m.crashed:
            res.crash = _where(m, prog) + m.crashed
        if res.crash is None:
            code = m.runners[0].exit_code or 0
            try:
                res.signal = killed_by(code)
            except ValueError as err:
                res.crash = f"the guest broke its contract: {err}"
            res.status = code & 0xFF
        if res.crash is not None:
            res.status = CRASH_STATUS
            res.signal = None
    return res


def _run_tracked(m: Machine, res: ProgramResult, interval: float, deadline: float | None,
                 seconds: float | None, verify_every: int, signals: OutsideSignals) -> str | None:
    """Epoch after epoch under the tracker (with the shadow check every ``verify_every``);
    why it was stopped early, if it was."""
    assert m.memory is not None
    drv = EpochDriver(m)
    m.pause_all()
    drv.tracker.full()
    check = ShadowCheck(m.memory) if verify_every else None
    crash = None
    while True:
        e = drv.run_epoch(interval)
        res.epochs += 1
        res.dirty_pages += len(e.dirty)
        if check is not None:
            check.apply(e.dirty)
            if res.epochs % verify_every == 0:
                res.missed_pages += len(check.stale())
        if m.crashed:
            crash = m.crashed
            break
        if e.reason == "stopped" or m.finished:
            break
        if deadline is not None and time.monotonic() >= deadline:
            crash = f"still running after {seconds:g} s; stopped"
            break
        signals.deliver(m)  # (paused between epochs)
    if check is not None:
        res.missed_pages += len(check.stale())
    return crash


def _run_untracked(m: Machine, res: ProgramResult, interval: float, deadline: float | None,
                   seconds: float | None, signals: OutsideSignals) -> str | None:
    """No tracker (``tracker="none"``): ``run_untracked``; why it was stopped early, if it
    was."""
    fetches, late = run_untracked(m, interval, signals, deadline)
    res.epochs += fetches
    return (f"still running after {seconds:g} s; stopped" if late else None) or m.crashed


def run_untracked(m: Machine, interval: float, signals: OutsideSignals,
                  deadline: float | None = None) -> tuple[int, bool]:
    """Let a program's running machine, which no tracker watches, run on until it stops or
    ``deadline`` (time.monotonic) passes: every ``interval`` its output is drained while it
    runs, and it is paused only to pass it ``signals``. The library OS's own cost, with no
    write-protect faults. (Pausing it every 10 ms cost a busybox awk loop 3-7 %: each pause
    and resume of a vCPU thread takes ~0.5 ms here.) Leaves it paused; returns the output
    fetches and whether the deadline ended it."""
    fetches, late = 0, False
    while not m.wait_stopped(interval):
        m.drain_output(live=True)
        fetches += 1
        if m.crashed:
            break
        if deadline is not None and time.monotonic() >= deadline:
            late = True
            break
        if signals.busy:
            m.pause_all()
            signals.deliver(m)
            m.resume_all()
    m.pause_all()
    return fetches, late


def syscall_label(nr: int) -> str:
    """``fork (57)``: how an unsupported syscall is named."""
    return f"{syscall_name(nr)} ({nr})"


def unsupported_line(program: str, nr: int) -> str:
    """The one line that names a syscall the library OS does not serve (once per number)."""
    return f"{program}: syscall {syscall_label(nr)} is not supported yet; it returned ENOSYS"


def _where(m: Machine, prog: LinuxProgram) -> str:
    """Which side faulted: the program, or the library OS (which a program can overwrite)."""
    try:
        rip = m.runners[0].fd.get_regs().rip
    except DirtyringError:
        return ""
    if layout.CODE_GPA <= rip < layout.CODE_LIMIT:
        return (f"the library OS faulted at {rip:#x} (the program may have overwritten its "
                "memory): ")
    tramp = prog.space.find("tramp")
    if tramp is not None and tramp.va <= rip < tramp.end:
        return (f"the program faulted at {rip:#x}, in a rewritten syscall site's trampoline "
                "(it may have overwritten them; --no-rewrite runs it without): ")
    image = prog.space.region("image+heap")
    if image.va <= rip < image.end:
        return f"the program faulted at {rip:#x} (a bad memory access, like SIGSEGV): "
    return f"the program jumped to {rip:#x}, outside its code: "


def save_tree(files: dict[str, bytes | None], root: Path,
              links: dict[str, bytes] | None = None) -> list[str]:
    """Write an exported file system under ``root`` (created if needed): files and
    directories, then symbolic links (so no write goes through one). Paths come from the guest;
    ``archive.unpack`` already refused any that is not absolute, and normalising here keeps
    every one inside ``root``. A link that would go under another link, or where something
    already is, is left out (a program's own export never has one: the library OS packs a
    link, not what it points to); returns the paths left out."""
    root.mkdir(parents=True, exist_ok=True)
    for path, data in sorted(files.items()):
        rel = posixpath.normpath(path).lstrip("/")
        if not rel or rel.startswith(".."):
            continue
        target = root / rel
        if data is None:
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
    left: list[str] = []
    for path, to in sorted((links or {}).items()):
        rel = posixpath.normpath(path).lstrip("/")
        parts = rel.split("/")
        if not rel or rel.startswith("..") or any(
                (root.joinpath(*parts[:i])).is_symlink() for i in range(1, len(parts))):
            left.append(path)
            continue
        target = root / rel
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.fsdecode(to), target)
        except OSError:
            left.append(path)
    return left
