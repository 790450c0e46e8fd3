"""``dirtyring bench failover``: how fast the standby runs the guest again after the primary is
killed (-9), over several kills at random moments: from the kill, and from the moment the standby
detected the loss (connection lost), to the guest running on the standby.

Real processes on loopback, as in ``dirtyring demo``: a standby and a protected primary running
the dirtier (or the key-value guest under client load), killed by PID.
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
from .records import Record, write_json

BENCH = "failover"


def one_kill(guest: str, memory: str, kill_after: float, env: dict[str, str]) -> dict[str, float]:
    p_repl = free_port()
    sb = ChildProcess("standby", ["standby", "--listen", f"127.0.0.1:{p_repl}",
                                  "--heartbeat-timeout", "0.5s"], env)
    pr: ChildProcess | None = None
    try:
        if sb.wait_event("listening", 20) is None:
            raise DirtyringError("the standby did not start")
        pr = ChildProcess("primary", ["protect", guest, "--standby", f"127.0.0.1:{p_repl}",
                                      "--memory", memory], env)
        if pr.wait_event("protected", 30) is None:
            raise DirtyringError("the primary never became protected")
        time.sleep(kill_after)
        t_kill = time.time()
        os.kill(pr.p.pid, signal.SIGKILL)
        pr.p.wait(60)  # a killed VMM's KVM teardown is slow on a loaded host; not timed
        done = sb.wait_event("failover_done", 10)
        lost = sb.wait_event("primary_lost", 0.5)
        if done is None or lost is None:
            raise DirtyringError("the standby did not take over")
        return {"kill_to_resume_ms": (done["t"] - t_kill) * 1e3,
                "detect_to_resume_ms": float(done["since_detection_ms"]),
                "kill_to_detect_ms": (lost["t"] - t_kill) * 1e3,
                "restore_ms": float(done["resume_ms"])}
    finally:
        if pr is not None:
            pr.stop()
        sb.stop()


def run(*, kills: int, guest: str, memory: str, progress: Any = None,
        rows: list[dict[str, float]] | None = None) -> list[Record]:
    """``kills`` kills at random moments; the records are p50/max/min of each measure. Each
    kill's own measures are appended to ``rows`` if given (the JSON keeps them, so a reader
    can see that every kill was followed by a resume)."""
    env = dict(os.environ, DIRTYRING_KEY=os.urandom(32).hex())
    rows = [] if rows is None else rows
    for i in range(kills):
        r = one_kill(guest, memory, random.uniform(0.3, 1.5), env)
        rows.append(r)
        if progress:
            progress(i, r)
    recs = []
    for metric in rows[0]:
        vals = np.array([r[metric] for r in rows])
        for stat, v in (("p50", np.percentile(vals, 50)), ("max", vals.max()),
                        ("min", vals.min())):
            recs.append(Record.make(BENCH, metric, float(v), "ms", stat=stat, guest=guest,
                                    kills=kills))
    return recs


def add_parser(sub: Any) -> None:
    p = sub.add_parser("failover", help="time from kill -9 of the primary to the guest "
                                        "running on the standby")
    p.add_argument("--out", type=Path, default=Path("results"), metavar="DIR")
    p.add_argument("--quick", action="store_true", help="2 kills instead of 10")
    p.add_argument("--kills", type=int, default=None)
    p.add_argument("--guest", default="dirtier", choices=["dirtier", "kvstore", "compute"])
    p.add_argument("--memory", default="64M")
    p.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    kills = args.kills or (2 if args.quick else 10)

    def show(i: int, r: dict[str, float]) -> None:
        print(f"kill {i + 1}/{kills}: resumed {r['kill_to_resume_ms']:.1f} ms after the kill, "
              f"{r['detect_to_resume_ms']:.1f} ms after detection (detected after "
              f"{r['kill_to_detect_ms']:.1f} ms)", flush=True)
    try:
        rows: list[dict[str, float]] = []
        recs = run(kills=kills, guest=args.guest, memory=args.memory, progress=show, rows=rows)
    except DirtyringError as e:
        print(f"dirtyring bench failover: error: {e}", file=sys.stderr)
        return 1
    out = Path(args.out)
    j = write_json(out / f"{BENCH}.json", BENCH, recs,
                   settings={"kills": kills, "guest": args.guest, "memory": args.memory},
                   extra={"per_kill": rows})
    for r in recs:
        if r.stat in ("p50", "max"):
            print(f"{r.metric:>20} {r.stat}: {r.value:7.1f} ms")
    print(f"wrote {j}")
    return 0
