"""``dirtyring migrate`` (the source) and ``dirtyring receive`` (the target).

``receive`` is a standby that never fails over by itself: it commits the source's rounds and
resumes the guest when the source sends the switchover. ``migrate`` boots a guest, lets it run
(``--warmup``), then moves it live and leaves the source paused.

Also runnable as ``python -m dirtyring.cli.migration migrate|receive ...``.
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from typing import Any

from ..errors import DirtyringError
from ..guests import NAMES
from ..guests.protocol import GuestParams, Pattern
from ..machine.config import LINUX_GUEST, MachineConfig
from ..machine.vm import Machine
from ..migration.source import (Migration, MigrationError, MigrationOptions, run_guest,
                                tune_allocator)
from ..replication.standby import Standby
from ..replication.transport import load_key, parse_addr
from .commands import command_help
from .exec_options import (add_exec_options, finished_status, guest_or_program, passthrough,
                           program_sink)
from .options import add_metrics_option, duration, positive_int, size, start_metrics
from .printer import EventPrinter

#: Ring entries per vCPU for a migrating guest: a ring-full exit (the throttle's pacing point)
#: every 960 newly dirty pages, 3.75 MiB; harvesting that costs ~60 µs.
RING_ENTRIES = 1024


def _bar(done: int, total: int, width: int = 28) -> str:
    f = min(1.0, done / total) if total else 1.0
    n = int(f * width)
    return "[" + "#" * n + "." * (width - n) + f"] {100 * f:5.1f} %"


def _render(p: EventPrinter, e: dict[str, Any]) -> bool:
    kind = e["event"]
    if kind == "progress":
        if p.live:
            p.status(f"  round {e['round']:2d} {_bar(e['sent'], e['total'])} "
                     f"{e['sent']:8d}/{e['total']} pages")
        return True
    if kind == "round":
        thr = "-"
        if e["throttle_pages_per_s"]:
            thr = f"{e['throttle_pages_per_s'] * 4096 / 1e6:.1f} MB/s"
        elif e["throttle_duty"] < 1:
            thr = f"{100 * e['throttle_duty']:.0f} % duty"
        # The bulk round arms nothing: what it leaves is every page found writable.
        left = "dirtied" if e.get("armed", True) else "writable"
        p.line(f"round {e['round']:2d} {e['kind']:5s} sent {e['pages_sent']:8d} pages in "
               f"{e['seconds']:6.3f} s {e['mb_per_s']:7.1f} MB/s | {left} "
               f"{e['dirty_pages']:7d} pages ({e['dirty_mb_per_s']:6.1f} MB/s) | expected "
               f"downtime {e['expected_downtime_ms']:7.1f} ms | throttle {thr}")
        return True
    if kind == "switched_over":
        return True  # the final summary line says it all
    if kind == "running":
        if p.live:
            p.status(f"  guest running on the target: progress {e['progress']}")
        return True
    if kind in ("output", "heartbeat"):
        p.line(f"{kind}: {e.get('payload')}")
        return True
    return False


def _printer(as_json: bool, live: bool) -> EventPrinter:
    return EventPrinter(as_json, live, _render, hide=("event", "t", "rounds"))


def add_parsers(sub: Any) -> None:
    m = sub.add_parser("migrate", help=command_help("migrate"))
    m.add_argument("guest", nargs="?", choices=NAMES, default=None,
                   help="guest program to run (default: none; name one, or use --exec)")
    m.add_argument("--to", required=True, metavar="HOST:PORT",
                   help="the target's --listen address (required)")
    m.add_argument("--key", help="shared key, hex (or $DIRTYRING_KEY)")
    m.add_argument("--insecure", action="store_true", help="no key (trusted loopback only)")
    m.add_argument("--downtime-limit", type=duration, default=0.3, metavar="DURATION",
                   help="switch over once the remaining pages fit in this (default 300ms)")
    m.add_argument("--bandwidth-limit", type=float, default=0.0, metavar="MB/s",
                   help="pace the link to this many MB/s (10^6 bytes on the wire, after zero "
                        "and sparse page encoding; default 0: unlimited)")
    m.add_argument("--timeout", type=duration, default=30.0, metavar="DURATION",
                   help="stop and copy anyway after this long (default 30s)")
    m.add_argument("--max-rounds", type=positive_int, default=30, metavar="N",
                   help="switch over after at most this many copy rounds (default 30)")
    m.add_argument("--no-throttle", action="store_true",
                   help="never slow down vCPUs that dirty faster than the link carries")
    m.add_argument("--tracker", choices=("ring", "bitmap"), default="ring",
                   help="dirty page tracker (default ring)")
    m.add_argument("--memory", type=size, default=None, metavar="SIZE",
                   help="guest data memory (default 64M; with --exec, the program's address "
                        "space: 1G, which costs nothing until the program uses it)")
    m.add_argument("--pattern", choices=[x.name.lower() for x in Pattern], default="random",
                   help="dirtier write pattern (default random)")
    m.add_argument("--hot-pages", type=positive_int, default=64, metavar="PAGES",
                   help="pages the hot pattern writes to (default 64)")
    m.add_argument("--rate", type=int, default=0, metavar="PAGES_PER_S",
                   help="dirtier page writes per second (default 0: as fast as it can)")
    m.add_argument("--warmup", type=duration, default=0.5, metavar="DURATION",
                   help="let the guest run this long before migrating (default 500ms)")
    m.add_argument("--verify", action="store_true",
                   help="send the memory digest with the last round (receive --verify checks it)")
    m.add_argument("--json", action="store_true", help="JSON lines instead of the live view")
    add_metrics_option(m)
    add_exec_options(m)
    m.set_defaults(func=migrate)

    r = sub.add_parser("receive", help=command_help("receive"))
    r.add_argument("--listen", required=True, metavar="HOST:PORT",
                   help="address to wait for the source on (required)")
    r.add_argument("--key", help="shared key, hex (or $DIRTYRING_KEY)")
    r.add_argument("--insecure", action="store_true", help="no key (trusted loopback only)")
    r.add_argument("--heartbeat-timeout", type=duration, default=10.0, metavar="DURATION",
                   help="give the source up after this long without a frame (default 10s)")
    r.add_argument("--verify", action="store_true",
                   help="check the source's memory digest before resuming")
    r.add_argument("--run-for", type=duration, default=None, metavar="DURATION",
                   help="after the switchover, run the guest this long, then exit "
                        "(default: until SIGTERM or the guest stops)")
    r.add_argument("--json", action="store_true", help="JSON lines instead of the live view")
    add_metrics_option(r)
    r.set_defaults(func=receive)


def migrate(args: argparse.Namespace) -> int:
    key, insecure = load_key(args.key, allow_insecure=args.insecure)
    tune_allocator()
    prog = guest_or_program(args)
    if prog is not None:
        cfg = prog.config(tracker=args.tracker, ring_entries=RING_ENTRIES)
    else:
        cfg = MachineConfig(guest=args.guest, tracker=args.tracker, data_slots=(args.memory,),
                            ring_entries=RING_ENTRIES,
                            params=GuestParams(pattern=Pattern[args.pattern.upper()],
                                               hot_pages=args.hot_pages, rate_pps=args.rate))
    args.program = prog
    opt = MigrationOptions(downtime_limit=args.downtime_limit,
                           bandwidth_limit=args.bandwidth_limit * 1e6, timeout=args.timeout,
                           max_rounds=args.max_rounds, throttle=not args.no_throttle,
                           verify=args.verify)
    live = sys.stdout.isatty() and not args.json and prog is None
    out = _printer(args.json, live)
    if prog is not None:
        out.file = sys.stderr  # the program's own output owns stdout
    metrics = start_metrics(args.metrics)  # first: a bad address ends the command at once
    try:
        return _migrate(args, cfg, key, insecure, opt, out, metrics)
    finally:
        if metrics is not None:
            metrics.close()


def _migrate(args: argparse.Namespace, cfg: MachineConfig, key: bytes, insecure: bool,
             opt: MigrationOptions, out: EventPrinter, metrics: Any) -> int:
    if metrics is not None:
        out({"event": "metrics", "t": time.time(),
             "addr": f"{metrics.addr[0]}:{metrics.port}"})
    prog = args.program
    with Machine(cfg, threaded=False, boot=prog.boot if prog else True,
                 sink=program_sink(prog.name) if prog else None) as m:
        run_guest(m, args.warmup)
        out({"event": "source_running", "t": time.time(),
             "guest": args.guest or (prog.name if prog else ""),
             "memory_bytes": args.memory, "tracker": args.tracker, "progress": m.progress()})
        mig = Migration(m, parse_addr(args.to), key, insecure=insecure, options=opt,
                        on_event=out)
        if metrics is not None:
            from ..migration.metrics import MigrationCollector
            metrics.add(MigrationCollector(mig))
        try:
            rep = mig.run()
        except MigrationError as e:
            where = ("the guest was still running on the source" if e.source_may_run else
                     "the source is left paused: the target may be running the guest")
            raise DirtyringError(f"{e} ({where})") from None
        finally:
            mig.close()
        final = {"event": "report", **rep.as_dict()}
        if args.json:
            out(final)
        else:
            out.line(f"migrated in {rep.total_s:.2f} s, downtime {rep.downtime_ms:.1f} ms "
                     f"({rep.stop_reason}, {len(rep.rounds)} rounds, {rep.pages_sent} pages, "
                     f"{rep.bytes_sent / 1e6:.0f} MB of pages in {rep.wire_bytes / 1e6:.1f} MB "
                     f"on the wire{', throttled' if rep.throttled else ''}); source paused")
    return 0


def receive(args: argparse.Namespace) -> int:
    key, insecure = load_key(args.key, allow_insecure=args.insecure)
    tune_allocator(2 << 30)  # a round's staging: up to the guest's size
    out = _printer(args.json, sys.stdout.isatty() and not args.json)
    stop = threading.Event()
    failed: list[str] = []

    def events(e: dict[str, Any]) -> None:
        if e["event"] == "standby_vm_created" and e.get("guest") == LINUX_GUEST:
            out.file = sys.stderr  # a Linux program's own output will own stdout
        out(e)
        if e["event"] == "primary_lost" and e.get("committed_epoch", 0) > 0:
            # Part of a guest arrived and the source is gone: this target is not resumable and
            # its memory is not empty any more. Like QEMU's -incoming, give up.
            failed.append(e["reason"])
            stop.set()
        elif e["event"] == "failover_impossible":
            failed.append(e.get("detail", "cannot resume"))

    def sink(kind: str, payload: Any) -> None:
        if not passthrough(kind, payload):
            out({"event": "output", "t": time.time(), "kind": kind, "payload": repr(payload)})

    sb = Standby(parse_addr(args.listen), key, insecure=insecure,
                 heartbeat_timeout=args.heartbeat_timeout, verify=args.verify,
                 auto_failover=False, on_event=events, sink=sink)
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    metrics = start_metrics(args.metrics)
    if metrics is not None:
        from ..replication.metrics import StandbyCollector
        metrics.add(StandbyCollector(sb))
        out({"event": "metrics", "t": time.time(),
             "addr": f"{metrics.addr[0]}:{metrics.port}"})
    t_run = 0.0
    try:
        sb.serve(stop)
        if failed or sb.state != "failed_over" or sb.machine is None:
            why = failed[0] if failed else "interrupted before the switchover"
            raise DirtyringError(f"incoming migration failed: {why}")
        m = sb.machine
        if m.stdio is not None:
            out.file = sys.stderr  # a Linux program: its own output owns stdout
        t_run = time.monotonic()
        out({"event": "migrated", "t": time.time(), "resumed_t": sb.resumed_wall,
             "epochs": sb.epochs, "pages": sb.pages, "committed_epoch": sb.committed_epoch,
             "staging_bytes_max": sb.max_staging_bytes, "progress": m.progress()})
        end = None if args.run_for is None else t_run + args.run_for
        tick = 0.05 if m.stdio is not None else 0.5  # a program's output drains this often
        while not stop.is_set() and (end is None or time.monotonic() < end):
            left = tick if end is None else max(0.0, min(tick, end - time.monotonic()))
            if m.wait_stopped(left):
                m.drain_output()
                out({"event": "guest_stopped", "t": time.time(), "crash": m.crashed})
                break
            m.drain_output(live=True)
            if m.stdio is None:
                out({"event": "running", "t": time.time(), "progress": m.progress()})
        out({"event": "report", "t": time.time(), **sb.status(),
             "guest": "crashed" if m.crashed else "stopped" if m.finished else "running",
             "ran_s": time.monotonic() - t_run, "progress": m.progress(),
             "resumed_t": sb.resumed_wall})
        if m.stdio is not None and m.finished and not m.crashed:
            return finished_status(m)
    except KeyboardInterrupt:
        pass
    finally:
        if metrics is not None:
            metrics.close()
        sb.close()
    return 0
