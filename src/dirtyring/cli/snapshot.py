"""``dirtyring snapshot`` and ``dirtyring restore``.

A snapshot needs a running guest in this process, so ``snapshot`` boots one, lets it run and
writes a full snapshot and then an incremental one every ``--every`` seconds into a directory.
``restore`` rebuilds a machine from any snapshot of such a chain (or the newest one in a
directory), resumes it and shows that the guest carries on from where the snapshot left it.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..guests import NAMES
from ..guests.protocol import GuestParams, Pattern, hash_chain
from ..linux.runner import CRASH_STATUS, run_untracked
from ..linux.signals import set_forwarding
from ..machine.config import LINUX_GUEST, MachineConfig
from ..machine.vm import Machine
from ..snapshots.files import (FILE_KEY, SnapshotInfo, SnapshotWriter, latest, resolve_chain,
                               restore)
from .commands import command_help
from .exec_options import (add_exec_options, finished_status, forwarded_signals, program_from_args,
                           program_sink)
from .options import add_guest_options, duration


def seconds(text: str) -> float:
    """'0.2' (seconds), '200ms', '1.5s' -> seconds."""
    try:
        v = float(text)
    except ValueError:
        return duration(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return v


def add_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "snapshot", help=command_help("snapshot"),
        description="Boot a guest, let it run, and write a full snapshot followed by incremental "
                    "snapshots (only the pages dirtied since the previous one) every --every "
                    "seconds into DIR, as one chain. The guest pauses only to harvest and "
                    "capture; files are written while it runs.")
    p.add_argument("dir", type=Path, metavar="DIR", help="directory for the .snap files")
    p.add_argument("--guest", choices=NAMES, default="compute",
                   help="guest program to run (default compute)")
    add_guest_options(p, rate=False)
    p.add_argument("--seconds", type=seconds, default=1.0,
                   help="how long the guest runs after the full snapshot (default 1s)")
    p.add_argument("--every", type=seconds, default=0.2,
                   help="time between incremental snapshots (default 0.2s)")
    p.add_argument("--name", default="snap", help="file name prefix (default snap)")
    p.add_argument("--verify", action="store_true",
                   help="digest live memory at each capture and check the chain against it")
    add_exec_options(p)
    _common(p)
    p.set_defaults(func=snapshot_command)

    r = sub.add_parser(
        "restore", help=command_help("restore"),
        description="Check the chain ending at PATH (a .snap file, or a directory: its newest "
                    "snapshot), rebuild the machine from it and let the guest run.")
    r.add_argument("path", type=Path, metavar="PATH",
                   help="a .snap file, or a directory (its newest snapshot)")
    r.add_argument("--seconds", type=seconds, default=1.0, help="how long to run (default 1s)")
    _common(r)
    r.set_defaults(func=restore_command)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--key-file", type=Path, default=None, metavar="FILE",
                   help="HMAC key for the files (default: a public key; checksums only)")
    p.add_argument("--json", action="store_true", help="JSON lines instead of text")


def _key(args: argparse.Namespace) -> bytes:
    path: Path | None = args.key_file
    if path is None:
        return FILE_KEY
    try:
        key = path.read_bytes().strip()
    except OSError as e:
        raise ConfigError(f"cannot read key file {path}: {e.strerror}") from None
    if len(key) < 16:
        raise ConfigError(f"key file {path} holds {len(key)} bytes; use at least 16")
    return key


def _out(args: argparse.Namespace, text: str, **record: Any) -> None:
    print(json.dumps(record) if args.json else text, flush=True,
          file=getattr(args, "status_stream", sys.stdout))


def _line(i: SnapshotInfo, progress: int) -> dict[str, Any]:
    return {"event": "snapshot", "name": i.name, "kind": i.kind, "seq": i.seq, "pages": i.pages,
            "bytes": i.file_bytes, "pause_us": round(i.pause_us, 1),
            "write_ms": round(i.write_s * 1e3, 2), "progress": progress, "path": str(i.path)}


def snapshot_command(args: argparse.Namespace) -> int:
    if args.every <= 0:
        raise ConfigError("--every must be positive")
    key = _key(args)
    prog = program_from_args(args)
    if prog is not None:
        # A program's output is its own (passed through); the snapshot lines go to stderr.
        cfg = prog.config(tracker=args.tracker)
        machine = Machine(cfg, boot=prog.boot, sink=program_sink(prog.name))
        args.status_stream = sys.stderr
    else:
        cfg = MachineConfig(guest=args.guest, tracker=args.tracker, vcpus=args.vcpus,
                            data_slots=(args.memory,),
                            params=GuestParams(pattern=Pattern[args.pattern.upper()],
                                               hot_pages=args.hot_pages))
        machine = Machine(cfg)
    with machine as m:
        w = SnapshotWriter(m, args.dir, key=key, verify=args.verify)
        _out(args, f"guest '{cfg.guest}', {cfg.vcpus} vCPU(s), {cfg.data_bytes >> 20} MiB, tracker "
                   f"{cfg.tracker}: full snapshot, then one every {args.every:g} s for "
                   f"{args.seconds:g} s into {args.dir}", event="start")
        shots = [w.full(f"{args.name}-0000")]
        _show(args, shots[-1], m.progress())
        end = time.monotonic() + args.seconds
        while (left := end - time.monotonic()) > 1e-3:
            stopped = w.run(min(args.every, left)) == "stopped"
            m.check()
            shots.append(w.incremental(f"{args.name}-{len(shots):04d}"))
            _show(args, shots[-1], m.progress())
            if stopped:
                _out(args, "the guest finished; no more snapshots", event="guest_finished")
                break
        total = sum(s.file_bytes for s in shots)
        _out(args, f"wrote {len(shots)} snapshots (1 full + {len(shots) - 1} incremental, "
                   f"{total / 1024:.1f} KiB) to {args.dir}; restore one with: dirtyring restore "
                   f"{shots[-1].path}", event="done", snapshots=len(shots), bytes=total)
    return 0


def _show(args: argparse.Namespace, i: SnapshotInfo, progress: int) -> None:
    _out(args, f"{i.name:<12} {i.kind:<5} seq {i.seq:<3} {i.pages:>7} pages "
               f"{i.file_bytes / 1024:>9.1f} KiB  pause {i.pause_us:>7.0f} µs  write "
               f"{i.write_s * 1e3:>6.1f} ms  guest progress {progress:,}", **_line(i, progress))


def restore_command(args: argparse.Namespace) -> int:
    key = _key(args)
    t0 = time.perf_counter()

    def applied(i: SnapshotInfo) -> None:
        _out(args, f"  applied {i.path.name} ({i.kind}, seq {i.seq}, {i.pages} pages)",
             event="applied", name=i.name, kind=i.kind, seq=i.seq, pages=i.pages)

    target = args.path
    program = resolve_chain(target if not target.is_dir() else latest(target, key=key),
                            key=key)[-1].config.guest == LINUX_GUEST
    if program:
        args.status_stream = sys.stderr  # the program's own output owns stdout
    if not target.is_dir():
        chain = resolve_chain(target, key=key)
        _out(args, f"chain of {len(chain)}: " + " -> ".join(c.name for c in chain),
             event="chain", files=[c.path.name for c in chain])
    with restore(target, key=key, progress=applied,
                 sink=program_sink("the program") if program else None) as m:
        if program:
            return _run_restored_program(args, m, t0)
        restore_ms = (time.perf_counter() - t0) * 1e3
        cfg = m.config
        start = {r.index: (m.status(r.index, "report_i"), m.status(r.index, "report_h"))
                 for r in m.runners}
        p0 = m.progress()
        _out(args, f"restored guest '{cfg.guest}' ({cfg.vcpus} vCPU(s), "
                   f"{cfg.data_bytes >> 20} MiB) in {restore_ms:.1f} ms at progress {p0:,}; "
                   f"running {args.seconds:g} s", event="restored", progress=p0,
             restore_ms=round(restore_ms, 2))
        m.resume_all()
        t_run = last_t = time.monotonic()
        end, last_p = t_run + args.seconds, p0
        while (left := end - time.monotonic()) > 0:
            if m.wait_stopped(min(0.25, left)):
                break
            now, p = time.monotonic(), m.progress()
            _out(args, f"  {now - t_run:5.2f} s  progress {p:,} "
                       f"(+{(p - last_p) / max(now - last_t, 1e-9) / 1e6:.1f} M/s)",
                 event="progress", progress=p, t=round(now - t_run, 3))
            last_t, last_p = now, p
        m.pause_all()
        m.check()
        ok = _check_reports(args, m, start)
        _out(args, f"stopped at progress {m.progress():,}", event="done", progress=m.progress(),
             chain_ok=ok)
    return 0 if ok is not False else 1


def _run_restored_program(args: argparse.Namespace, m: Machine, t0: float) -> int:
    """A restored Linux program runs to its end (or --seconds); its output passes through, the
    signals we get go to it (as with ``run --exec``), and its exit status is ours."""
    # A fresh getrandom pool: the snapshot holds the pool the original run was drawing from,
    # and every restore of it would hand the program the same "random" bytes again (two
    # copies restored from one snapshot would share keys, nonces, temp names). The VM
    # generation ID problem of any VM snapshot; here the VMM owns the pool, so it refills it.
    assert m.stdio is not None
    m.stdio.refill_entropy()
    with forwarded_signals() as signals:  # (before we say it runs: from then on, it gets them)
        set_forwarding(m, True)
        _out(args, f"restored a Linux program ({m.config.data_bytes >> 20} MiB) in "
                   f"{(time.perf_counter() - t0) * 1e3:.1f} ms; running it", event="restored")
        m.resume_all()
        _, late = run_untracked(m, 0.05, signals, time.monotonic() + args.seconds)
    m.drain_output()
    if late:
        _out(args, f"still running after {args.seconds:g} s; stopped", event="done")
        return 0
    if m.crashed:
        print(f"dirtyring: the program stopped: {m.crashed}", file=sys.stderr)
        return CRASH_STATUS
    status = finished_status(m)
    _out(args, f"the program ended with status {status}", event="done", status=status)
    return status


def _check_reports(args: argparse.Namespace, m: Machine,
                   start: dict[int, tuple[int, int]]) -> bool | None:
    """Compute guest: its first report after the restore must continue the snapshot's hash
    chain (recomputed here from the last report the snapshot holds)."""
    if m.config.guest != "compute":
        return None
    seed = m.config.params.seed
    first: dict[int, tuple[int, int]] = {}
    for kind, payload in m.outputs:
        if kind == "report" and payload[0] not in first:
            first[payload[0]] = (payload[1], payload[2])
    ok = True
    for v, (i0, h0) in sorted(start.items()):
        if v not in first:
            _out(args, f"  vCPU {v}: no report after the restore (run longer)", event="chain",
                 vcpu=v, ok=None)
            continue
        i1, h1 = first[v]
        want = hash_chain(seed, i1, start=(i0, h0) if i0 else None)
        good = want == h1
        ok &= good
        _out(args, f"  vCPU {v}: first report after the restore, step {i1:,}, "
                   + ("continues the snapshot's hash chain: ok" if good else
                      f"is OFF the hash chain (got {h1:#x}, want {want:#x})"),
             event="chain", vcpu=v, step=i1, ok=good)
    if not ok:
        print("dirtyring: error: the restored guest diverged from its snapshot", file=sys.stderr)
    return ok

