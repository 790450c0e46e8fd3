"""``dirtyring bench failover``: how fast the standby runs the guest again after the primary is
killed (-9), over several kills at random moments: from the kill, and from the moment the standby
detected the loss (connection lost), to the guest running on the standby.

Real processes on loopback, as in ``dirtyring demo``: a standby and a protected primary running
the dirtier (or the key-value guest under client load), killed by PID. Three cells:

- ``none``: no arbiter (the standby goes live on the lost connection);
- ``etcd-crash``: both hold the group's key in a local etcd member; the primary alone is killed,
  its uplink revokes the lease first, so the standby pays one etcd transaction;
- ``etcd-host-loss``: the primary and its uplink are killed together (the whole host gone):
  nobody revokes, the standby waits out the lease (``--lease-ttl``).
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..cli.child import ChildProcess, free_port
from ..errors import DirtyringError
from ..replication.uplink_handle import uplink_pid
from .etcd_member import EtcdMember
from .records import Record, write_json

BENCH = "failover"
CELLS = ("none", "etcd-crash", "etcd-host-loss")
#: The lease TTL of the etcd cells, seconds (the host-loss cell waits it out at each kill).
LEASE_TTL = 2
#: Both sides' heartbeat timeout. A kill is seen as a lost connection, never through this, so
#: it changes no figure here. On a host loaded by two busy processes the primary sent nothing
#: for 0.7-3.5 s between its sync's start and "protected" (8 runs), and a standby waiting only
#: 0.5 s (4 runs in 5) or 2 s (2 in 8) dropped it: "no frame from the primary".
HEARTBEAT_TIMEOUT = "10s"


def one_kill(guest: str, memory: str, kill_after: float, env: dict[str, str], *,
             cell: str = "none", etcd: str = "", group: str = "",
             lease_ttl: int = LEASE_TTL) -> dict[str, float]:
    p_repl = free_port()
    arb = [] if cell == "none" else ["--etcd", etcd, "--name", group,
                                     "--lease-ttl", str(lease_ttl)]
    sb = ChildProcess("standby", ["standby", "--listen", f"127.0.0.1:{p_repl}",
                                  "--heartbeat-timeout", HEARTBEAT_TIMEOUT, *arb], env)
    pr: ChildProcess | None = None
    try:
        # Deadlines, not figures: a loaded host took 25 s to start a primary.
        if sb.wait_event("listening", 120) is None:
            raise DirtyringError("the standby did not start: " + sb.describe())
        pr = ChildProcess("primary", ["protect", guest, "--standby", f"127.0.0.1:{p_repl}",
                                      "--memory", memory, "--heartbeat-timeout",
                                      HEARTBEAT_TIMEOUT, *arb], env)
        if pr.wait_event("protected", 120) is None:
            raise DirtyringError("the primary never became protected: " + pr.describe())
        time.sleep(kill_after)
        uplink = uplink_pid(pr.p.pid) if cell == "etcd-host-loss" else 0
        t_kill = time.time()
        if uplink:  # the whole host: nobody is left to revoke the lease
            os.kill(uplink, signal.SIGKILL)
        os.kill(pr.p.pid, signal.SIGKILL)
        pr.p.wait(60)  # a killed VMM's KVM teardown is slow on a loaded host; not timed
        done = sb.wait_event("failover_done", 10 + 2 * lease_ttl)
        lost = sb.wait_event("primary_lost", 0.5)
        if done is None or lost is None:
            raise DirtyringError("the standby did not take over: " + sb.describe())
        r = {"kill_to_resume_ms": (done["t"] - t_kill) * 1e3,
             "detect_to_resume_ms": float(done["since_detection_ms"]),
             "kill_to_detect_ms": (lost["t"] - t_kill) * 1e3,
             "restore_ms": float(done["resume_ms"])}
        if cell != "none":
            lease = sb.wait_event("lease_granted", 0.5)
            if lease is None:
                raise DirtyringError("the standby went live without the key: " + sb.describe())
            r["lease_wait_ms"] = float(lease["wait_ms"])
        return r
    finally:
        if pr is not None:
            pr.stop()
        sb.stop()


def run(*, kills: int, guest: str, memory: str, progress: Any = None,
        rows: list[dict[str, Any]] | None = None,
        cells: tuple[str, ...] = ("none",), lease_ttl: int = LEASE_TTL) -> list[Record]:
    """``kills`` kills at random moments in each cell; the records are p50/max/min of each
    measure. Each kill's own measures (and its cell) are appended to ``rows`` if given (the
    JSON keeps them, so a reader can see that every kill was followed by a resume)."""
    env = dict(os.environ, DIRTYRING_KEY=os.urandom(32).hex())
    rows = [] if rows is None else rows
    recs = []
    member = EtcdMember() if any(c != "none" for c in cells) else None
    try:
        if member is not None:
            member.start()
        for cell in cells:
            mine: list[dict[str, float]] = []
            for i in range(kills):
                r = one_kill(guest, memory, random.uniform(0.3, 1.5), env, cell=cell,
                             etcd=member.url if member is not None else "",
                             group=f"bench-{os.getpid()}-{cell}-{i}", lease_ttl=lease_ttl)
                mine.append(r)
                rows.append({"cell": cell, **r})
                if progress:
                    progress(cell, i, r)
            for metric in mine[0]:
                vals = np.array([r[metric] for r in mine])
                for stat, v in (("p50", np.percentile(vals, 50)), ("max", vals.max()),
                                ("min", vals.min())):
                    recs.append(Record.make(BENCH, metric, float(v), "ms", stat=stat,
                                            guest=guest, kills=kills, cell=cell))
    finally:
        if member is not None:
            member.stop()
    return recs


def add_parser(sub: Any) -> None:
    p = sub.add_parser("failover", help="time from kill -9 of the primary to the guest "
                                        "running on the standby")
    p.add_argument("--out", type=Path, default=Path("results"), metavar="DIR",
                   help="directory for failover.json (default ./results)")
    p.add_argument("--quick", action="store_true", help="2 kills per cell instead of 10")
    p.add_argument("--kills", type=int, default=None, metavar="N",
                   help="kills per cell (default 10, 2 with --quick)")
    p.add_argument("--guest", default="dirtier", choices=["dirtier", "kvstore", "compute"],
                   help="guest program to protect (default dirtier)")
    p.add_argument("--memory", default="64M", metavar="SIZE",
                   help="guest data memory (default 64M)")
    p.add_argument("--cells", default=",".join(CELLS), metavar="CELL[,CELL...]",
                   help=f"which arbiters to measure: {', '.join(CELLS)} (default: all; the "
                        "etcd cells start a local etcd member)")
    p.add_argument("--lease-ttl", type=int, default=LEASE_TTL, metavar="SECONDS",
                   help=f"the etcd cells' lease time to live in seconds (default {LEASE_TTL}; a "
                        "loaded host needs "
                        "more: a lease not renewed in time lapses before the standby's "
                        "handshake)")
    p.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    kills = args.kills or (2 if args.quick else 10)
    cells = tuple(c.strip() for c in args.cells.split(",") if c.strip())
    bad = [c for c in cells if c not in CELLS]
    if bad or not cells:
        print(f"dirtyring: error: unknown cell {bad[0] if bad else '(none)'!r}; "
              f"choose from {', '.join(CELLS)}", file=sys.stderr)
        return 2

    def show(cell: str, i: int, r: dict[str, float]) -> None:
        print(f"{cell}: kill {i + 1}/{kills}: resumed {r['kill_to_resume_ms']:.1f} ms after the "
              f"kill, {r['detect_to_resume_ms']:.1f} ms after detection (detected after "
              f"{r['kill_to_detect_ms']:.1f} ms)", flush=True)
    try:
        rows: list[dict[str, Any]] = []
        recs = run(kills=kills, guest=args.guest, memory=args.memory, progress=show, rows=rows,
                   cells=cells, lease_ttl=args.lease_ttl)
    except DirtyringError as e:
        print(f"dirtyring bench failover: error: {e}", file=sys.stderr)
        return 1
    out = Path(args.out)
    j = write_json(out / f"{BENCH}.json", BENCH, recs,
                   settings={"kills": kills, "guest": args.guest, "memory": args.memory,
                             "cells": list(cells), "lease_ttl_s": args.lease_ttl},
                   extra={"per_kill": rows})
    for r in recs:
        if r.stat in ("p50", "max"):
            print(f"{r.dims['cell']:>15} {r.metric:>20} {r.stat}: {r.value:8.1f} ms")
    print(f"wrote {j}")
    return 0
