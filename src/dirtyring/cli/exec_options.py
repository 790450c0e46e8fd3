"""``--exec PROGRAM [--env K=V]... [--file HOST[:GUEST]]... -- ARGS``: the options that make a
command run a Linux program instead of a built-in guest, the same for run, snapshot, protect
and migrate, and the program and output streams they turn into."""
from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ..errors import ConfigError
from ..linux.program import LinuxProgram
from ..linux.runner import unsupported_line
from ..linux.signals import FORWARDED, OutsideSignals, end_report
from ..machine.vm import Machine


def add_exec_options(p: argparse.ArgumentParser, *, memory_note: bool = True,
                     strace: bool = False) -> None:
    """Add --exec, --env, --file, --no-rewrite (and --strace where the command prints traces)
    and the positional program arguments."""
    p.add_argument("--exec", metavar="PROGRAM", default=None,
                   help="run this static x86-64 Linux program instead of a built-in guest, "
                        "under the library OS; its output passes through (default: none"
                        + ("; --memory sizes its address space" if memory_note else "") + ")")
    p.add_argument("--env", action="append", default=[], metavar="K=V",
                   help="an environment variable for --exec (repeatable; default: an empty "
                        "environment)")
    p.add_argument("--file", action="append", default=[], metavar="HOST_PATH[:GUEST_PATH]",
                   help="copy a host file (or a directory's tree) into the program's file "
                        "system, at GUEST_PATH (default: the same path, relative to /, the "
                        "program's working directory); repeatable (default: none)")
    p.add_argument("--no-rewrite", action="store_true",
                   help="keep the program's code byte for byte: do not let the library OS "
                        "rewrite its `mov $nr,%%eax; syscall` sites into jumps that skip the "
                        "trap a `syscall` costs (~20 us on kvm_pvm) (default: rewrite)")
    if strace:
        p.add_argument("--strace", action="store_true",
                       help="print each of the program's system calls with its arguments and "
                            "result on stderr (from a trace ring in guest memory: no exit per "
                            "call; default off)")
    p.add_argument("args", nargs="*", metavar="ARGS",
                   help="the program's arguments, after -- (default: none)")


def program_from_args(args: argparse.Namespace, *, export_files: bool = False
                      ) -> LinuxProgram | None:
    """The program the options name, or None without --exec (then program arguments, --env and
    --file are a usage error)."""
    if args.exec is None:
        if args.args or args.env or args.file or getattr(args, "strace", False) \
                or getattr(args, "no_rewrite", False):
            raise ConfigError("program arguments, --env, --file, --strace and --no-rewrite "
                              "need --exec PROGRAM")
        return None
    env = {}
    for kv in args.env:
        k, eq, v = kv.partition("=")
        if not eq or not k:
            raise ConfigError(f"--env {kv!r} is not K=V")
        env[k] = v
    files = [(h, g or None) for h, _, g in (f.partition(":") for f in args.file)]
    return LinuxProgram(args.exec, [args.exec, *args.args], env, memory=args.memory,
                        files=files, export_files=export_files,
                        strace=getattr(args, "strace", False),
                        rewrite_syscalls=not getattr(args, "no_rewrite", False))


def guest_or_program(args: argparse.Namespace) -> LinuxProgram | None:
    """For a command with an optional built-in GUEST positional and --exec: the program, or
    None for the named built-in guest; naming both or neither is a usage error."""
    prog = program_from_args(args)
    if prog is not None and args.guest is not None:
        raise ConfigError("name a built-in guest or --exec PROGRAM, not both")
    if prog is None and args.guest is None:
        raise ConfigError("name the guest program to run (dirtier, compute, kvstore) or "
                          "--exec PROGRAM")
    return prog


def passthrough(kind: str, payload: Any) -> bool:
    """Write a program's stdout/stderr chunk to ours; True if ``kind`` was one of them."""
    if kind == "stdout":
        sys.stdout.buffer.write(payload)
        sys.stdout.buffer.flush()
        return True
    if kind == "stderr":
        sys.stderr.buffer.write(payload)
        sys.stderr.buffer.flush()
        return True
    return False


def program_sink(name: str) -> Callable[[str, Any], None]:
    """A machine sink for the Linux program ``name`` outside ``run``: its output passes
    through, and each syscall it uses that the library OS does not serve is named once on
    stderr."""
    named: set[int] = set()

    def sink(kind: str, payload: Any) -> None:
        if not passthrough(kind, payload) and kind == "unsupported_syscall" \
                and payload not in named:
            named.add(payload)
            print(f"dirtyring: {unsupported_line(name, payload)}", file=sys.stderr,
                  flush=True)
    return sink


def finished_status(m: Machine) -> int:
    """The exit status of a command whose Linux program ended on ``m``: the program's own (as
    ``run`` returns it), after naming on stderr the signal that killed it, if one did."""
    code = m.runners[0].exit_code
    report = end_report(code)
    if report:
        print(f"dirtyring: {report}", file=sys.stderr, flush=True)
    return (code or 0) & 0xFF


@contextmanager
def forwarded_signals() -> Iterator[OutsideSignals]:
    """While inside, the signals a shell's foreground job gets (SIGHUP, SIGINT, SIGQUIT,
    SIGTERM) go to the program, not to us: Ctrl-C runs its handler, or ends it with 130. The
    caller delivers them at its pauses (``OutsideSignals.deliver``). kill -9 still ends
    dirtyring at once."""
    sigs = OutsideSignals()
    old = {s: signal.signal(s, lambda sig, frame: sigs.put(sig)) for s in FORWARDED}
    try:
        yield sigs
    finally:
        for s, h in old.items():
            signal.signal(s, h)
