"""``dirtyring run``: a guest workload under dirty tracking, epoch after epoch, with live figures
and an end-to-end check that every page the guest changed was reported."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..guests import NAMES
from ..linux.program import LinuxProgram
from ..linux.runner import EXEC_INTERVAL, run_program, save_tree
from ..linux.signals import killed_line
from ..guests.protocol import GuestParams, Pattern
from ..machine.config import MachineConfig
from ..machine.epoch import EpochDriver
from ..machine.stats import EpochStats
from ..machine.verify import ShadowCheck
from ..machine.vm import Machine
from .commands import command_help
from .exec_options import add_exec_options, forwarded_signals, program_from_args
from .options import add_guest_options, duration, positive_int


def add_parser(sub: Any) -> None:
    p = sub.add_parser("run", help=command_help("run"))
    p.add_argument("--guest", choices=NAMES, default="dirtier",
                   help="guest program to run (default dirtier)")
    add_guest_options(p, tracker_help=(
        "dirty page tracker (default ring; with --exec: none, the program runs untracked "
        "like itself, unless a tracker or --verify-every is named)"))
    p.add_argument("--interval", type=duration, default=None, metavar="DURATION",
                   help="epoch length (default 1ms; with --exec 10ms: how often its output is "
                        "fetched while it runs, or its epochs when tracked)")
    p.add_argument("--ring-entries", type=positive_int, default=4096,
                   help="dirty ring entries per vCPU; an epoch ends early when it fills "
                        "(default 4096)")
    p.add_argument("--seconds", type=float, default=10.0,
                   help="how long to run, in seconds (default 10)")
    p.add_argument("--verify-every", type=int, default=None, metavar="N",
                   help="compare a shadow copy with guest memory every N epochs "
                        "(default 100 when tracked; 0 = off)")
    p.add_argument("--json", action="store_true", help="JSON lines instead of the live view")
    add_exec_options(p, strace=True)
    p.add_argument("--save-files", metavar="DIR", default=None,
                   help="when the program ends, write every file of its file system under DIR "
                        "(default: not saved)")
    p.set_defaults(func=run)


def resolve_defaults(args: argparse.Namespace, exec_mode: bool) -> None:
    """Fill run's guest-dependent defaults into ``args``.

    Why a program runs untracked unless asked: ``run`` checkpoints nothing, so tracking would
    only show off the tracker, and on kvm_pvm every page a program writes again after a harvest
    costs a write-protect fault of ~20 µs (KVM's shadow MMU has no fast path for it). SQLite's
    200,000 inserts took 31 s with 1 ms epochs instead of 0.5 s. A built-in guest is there to
    show the tracker at work, so it keeps ring, 1 ms epochs and the shadow check."""
    if args.tracker is None:
        args.tracker = "none" if exec_mode and not args.verify_every else "ring"
    if args.tracker == "none" and not exec_mode:
        raise ConfigError("--tracker none runs only a program (--exec): a built-in guest's "
                          "run shows its tracker at work")
    if args.verify_every is None:
        args.verify_every = 0 if args.tracker == "none" else 100
    elif args.verify_every < 0:
        raise ConfigError(f"--verify-every {args.verify_every}: give 0 (off) or a positive "
                          "number of epochs")
    elif args.verify_every and args.tracker == "none":
        raise ConfigError("--verify-every needs a tracker: nothing is tracked with "
                          "--tracker none")
    if args.interval is None:
        args.interval = EXEC_INTERVAL if exec_mode else 1e-3


def run(args: argparse.Namespace) -> int:
    prog = program_from_args(args, export_files=args.save_files is not None)
    resolve_defaults(args, prog is not None)
    if prog is not None:
        return run_exec(args, prog)
    if args.save_files:
        raise ConfigError("--save-files needs --exec PROGRAM")
    cfg = MachineConfig(guest=args.guest, tracker=args.tracker, vcpus=args.vcpus,
                        data_slots=(args.memory,), ring_entries=args.ring_entries,
                        params=GuestParams(pattern=Pattern[args.pattern.upper()],
                                           hot_pages=args.hot_pages, rate_pps=args.rate))
    live = sys.stdout.isatty() and not args.json
    with Machine(cfg) as m:
        drv = EpochDriver(m)
        stats = EpochStats()
        m.pause_all()
        drv.tracker.full()
        assert m.memory is not None
        check = ShadowCheck(m.memory) if args.verify_every else None
        stale_total = 0
        t_end = time.monotonic() + args.seconds
        next_print = time.monotonic() + 0.5
        if not args.json:
            print(f"running guest '{cfg.guest}' on {cfg.vcpus} vCPU(s), "
                  f"{args.memory >> 20} MiB, tracker {cfg.tracker}, epochs of "
                  f"{args.interval * 1e6:.0f} µs, for {args.seconds:g} s (Ctrl-C stops)")
        try:
            while time.monotonic() < t_end:
                e = drv.run_epoch(args.interval)
                t = time.perf_counter()
                if check is not None:
                    check.apply(e.dirty)
                    if drv.number % args.verify_every == 0:
                        stale = check.stale()
                        if stale:
                            stale_total += len(stale)
                            print(f"MISSED DIRTY PAGES at epoch {e.number}: {stale}; "
                                  "resyncing", file=sys.stderr)
                            check.apply(drv.tracker.full())
                copy_s = time.perf_counter() - t
                stats.record(pause_s=e.harvest_s + copy_s, harvest_s=e.harvest_s,
                             dirty_pages=len(e.dirty), resync=e.resync,
                             budget=e.reason == "budget")
                m.check()
                if e.reason == "stopped":
                    break
                if time.monotonic() >= next_print:
                    next_print += 0.5
                    stats.progress(m.progress())
                    _show(stats, live, args.json)
        except KeyboardInterrupt:
            pass
        stats.progress(m.progress())
        snap = stats.snapshot()
        if check is not None:
            stale = check.stale()
            stale_total += len(stale)
        if live:
            print()
        result = {"event": "done", **snap.as_dict(), "missed_pages": stale_total,
                  "tracker": drv.tracker.statistics().kind,
                  "verified": check is not None}
        if args.json:
            print(json.dumps(result))
        else:
            print(f"{snap.epochs} epochs in {snap.elapsed_s:.1f} s, "
                  f"{snap.dirty_pages_per_epoch:.0f} dirty pages per epoch, pause p50 "
                  f"{snap.pause_us_p50:.0f} µs; end-to-end check: "
                  + ("off" if check is None else
                     "every reported page accounted for, none missed" if not stale_total
                     else f"{stale_total} MISSED pages"))
        return 1 if stale_total else 0


def run_exec(args: argparse.Namespace, prog: LinuxProgram) -> int:
    """``dirtyring run --exec PROGRAM -- ARGS``: like running the program itself."""
    streams = {"stdout": sys.stdout.buffer, "stderr": sys.stderr.buffer}

    def write(kind: str, data: bytes) -> None:
        streams[kind].write(data)
        streams[kind].flush()

    def warn(line: str) -> None:
        print(f"dirtyring: {line}", file=sys.stderr, flush=True)

    with forwarded_signals() as forwarded:
        res = run_program(prog, write=write, tracker=args.tracker, interval=args.interval,
                          verify_every=args.verify_every, warn=warn,
                          trace=lambda line: print(line, file=sys.stderr, flush=True),
                          stdin=_stdin_fd(), signals=forwarded)
    if res.crash:
        warn(f"{prog.name}: stopped: {res.crash}")
    if res.signal is not None:
        warn(f"{prog.name}: {killed_line(res.signal)}")
    if args.save_files is not None and res.crash is None:
        try:
            left = save_tree(res.files, Path(args.save_files), res.links)
        except OSError as e:
            warn(f"--save-files {args.save_files}: {e.strerror}")
            return 1
        for path in left:
            warn(f"--save-files: the symbolic link {path} was not saved (something is there "
                 "already, or a link is in its way)")
    if res.missed_pages:
        warn(f"MISSED DIRTY PAGES: {res.missed_pages} page(s) the tracker never reported")
        return 1 if res.status == 0 else res.status
    if args.json:
        print(json.dumps({"event": "done", "status": res.status, "crash": res.crash,
                          "signal": res.signal, "tracker": args.tracker,
                          "interval_s": args.interval,
                          "epochs": res.epochs, "dirty_pages": res.dirty_pages,
                          "missed_pages": res.missed_pages, "unsupported": res.unsupported,
                          "ended_monotonic": res.ended_at}),
              file=sys.stderr)
    return res.status


def _stdin_fd() -> int | None:
    """Our stdin for the program's, if we have one."""
    try:
        return sys.stdin.fileno() if sys.stdin is not None else None
    except (OSError, ValueError):
        return None


def _show(stats: EpochStats, live: bool, as_json: bool) -> None:
    s = stats.snapshot()
    if as_json:
        print(json.dumps({"event": "stats", **s.as_dict()}), flush=True)
        return
    line = (f"{s.elapsed_s:6.1f}s  {s.epochs_per_s:7.0f} epochs/s  "
            f"{s.dirty_pages_per_epoch:6.0f} dirty/epoch  pause p50 {s.pause_us_p50:5.0f} µs "
            f"p99 {s.pause_us_p99:6.0f} µs  guest {s.guest_progress_per_s / 1e6:7.2f} M/s")
    print("\r" + line if live else line, end="" if live else "\n", flush=True)
