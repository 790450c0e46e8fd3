"""``dirtyring bench migrate``: live migration over loopback, ring vs bitmap in one run.

For each tracker and load it boots a 1 GiB guest whose dirtier rewrites a 512 MiB region (idle,
50 MiB/s, 500 MiB/s, unthrottled), lets it run, measures its speed unmigrated, migrates it to a
real ``dirtyring receive`` process, and records the total time, the downtime (the source's pause
until the target's "resumed"; also from the target's own resume timestamp, wall clocks agree on
loopback), and how much of its speed the guest keeps while being migrated (page writes per second
during the pre-copy rounds over the unmigrated rate; the downtime itself is in the downtime).
That figure is split into the bulk round (which arms nothing) and the rounds that track every
write, and each sample records the 1-minute load average: the guest, the sender and the target
share the machine's cores with whatever else runs.

Before each migration the region is filled from the host (non-zero, allocated) and the guest
runs a while, as a guest that has been up for some time; the other 512 MiB stay zero.
QEMU 7.2 on this machine kind (issue 4) is stored beside the results for orientation.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DirtyringError
from ..guests.protocol import GuestParams, Pattern
from ..machine.config import MachineConfig
from ..machine.vm import Machine
from ..cli.child import ChildProcess, free_port
from .plot import pyplot, save
from .records import BenchError, Record, summary_stats, write_json

BENCH = "migrate"
MiB = 1 << 20
TRACKERS = ("ring", "bitmap")
#: (name, page writes per second; 0 = as fast as the guest can). "idle" writes one page a second.
LOADS = (("idle", 1), ("50MiB/s", 50 * MiB // 4096), ("500MiB/s", 500 * MiB // 4096),
         ("unthrottled", 0))
GUEST_BYTES, REGION_BYTES = 1024 * MiB, 512 * MiB
QUICK_GUEST_BYTES, QUICK_REGION_BYTES = 64 * MiB, 32 * MiB
ITERATIONS, QUICK_ITERATIONS = 3, 1
BASELINE_S, QUICK_BASELINE_S = 1.0, 0.3
RING_ENTRIES = 1024
#: QEMU 7.2 live migration measured on this machine kind (issue 4): (low, high).
QEMU: dict[str, Any] = {"total_s": (1.4, 1.9),
        "downtime_ms": {"idle": (0, 6), "50MiB/s": (31, 44), "500MiB/s": (66, 115),
                        "unthrottled": (96, 161)},
        "unthrottled_writer_pages_per_s": {"unmigrated": 77e6, "ring": 3e6, "bitmap": 51e6}}


@dataclass(frozen=True, slots=True, kw_only=True)
class Cell:
    tracker: str
    load: str
    rate_pps: int
    guest_bytes: int
    region_bytes: int

    @property
    def id(self) -> str:
        return f"{self.tracker}-{self.load}-{self.guest_bytes // MiB}MiB"


def _prefill(m: Machine, pages: int) -> None:
    """Make the region non-zero and allocated, as a guest that ran a while would have it."""
    assert m.memory is not None
    v = m.memory.slots[1].view.reshape(-1, 4096)
    v[:pages, 0] = 0xA5
    m.memory.mark_dirty(1, 0, pages)


def measure(cell: Cell, key: bytes, baseline_s: float) -> dict[str, float]:
    """One migration of ``cell``; returns its figures."""
    from ..migration.source import Migration, MigrationOptions, run_guest, tune_allocator
    region = cell.region_bytes // 4096
    cfg = MachineConfig(guest="dirtier", tracker=cell.tracker, data_slots=(cell.guest_bytes,),
                        ring_entries=RING_ENTRIES,
                        params=GuestParams(pattern=Pattern.HOT, hot_pages=region,
                                           rate_pps=cell.rate_pps))
    tune_allocator()
    port = free_port()
    rx = ChildProcess("receive", ["receive", "--listen", f"127.0.0.1:{port}", "--run-for", "0.3s"],
                      dict(os.environ, DIRTYRING_KEY=key.hex()))
    try:
        if rx.wait_event("listening", 30) is None:
            raise BenchError("the receiver process did not start listening")
        with Machine(cfg, threaded=False) as m:
            _prefill(m, region)
            # Warm: the guest's own first touches (shadow page tables), one pass if it can.
            end = time.monotonic() + (5.0 if not cell.rate_pps else baseline_s)
            while time.monotonic() < end and (cell.rate_pps or m.status(0, "passes") < 1):
                run_guest(m, 0.1)
            a, t = m.progress(), time.perf_counter()
            run_guest(m, baseline_s)
            base = (m.progress() - a) / (time.perf_counter() - t)
            mig = Migration(m, ("127.0.0.1", port), key, options=MigrationOptions())
            try:
                rep = mig.run()
            finally:
                mig.close()
            after = m.progress()
        done = rx.wait_event("failover_done", 30)
        ran = rx.wait_event("report", 30)
    finally:
        rx.stop()
    if done is None or ran is None:
        raise BenchError(f"cell {cell.id}: the receiver did not report the switchover")
    if after != rep.progress_at_pause:
        raise BenchError(f"cell {cell.id}: the source ran on after the switchover")
    precopy_s = sum(r.seconds for r in rep.rounds if r.kind != "final")
    kept = (rep.progress_at_pause - rep.progress_before) / max(precopy_s, 1e-9) / max(base, 1e-9)
    # Where the speed goes: the bulk round (nothing armed) and the rounds that track writes.
    bulk = [r for r in rep.rounds if r.kind != "final" and not r.armed]
    armed = [r for r in rep.rounds if r.kind != "final" and r.armed]

    def phase(rs: list[Any]) -> tuple[float, float]:
        s = sum(r.seconds for r in rs)
        done = sum(r.guest_progress_per_s * r.seconds for r in rs)
        return s, done / max(s, 1e-9) / max(base, 1e-9)
    bulk_s, bulk_kept = phase(bulk)
    armed_s, armed_kept = phase(armed)
    return {"total_s": rep.total_s, "downtime_ms": rep.downtime_ms,
            "downtime_target_ms": (float(done["resumed_t"]) - rep.pause_t) * 1e3,
            "speed_kept": kept, "base_pps": base, "rounds": len(rep.rounds),
            "bulk_s": bulk_s, "bulk_speed_kept": bulk_kept, "armed_s": armed_s,
            "armed_speed_kept": armed_kept, "load_1min": os.getloadavg()[0],
            "throttled": float(rep.throttled), "final_pages": rep.final_pages,
            "bandwidth_mb_s": rep.bandwidth_mb_s, "mb_sent": rep.bytes_sent / 1e6,
            "target_progress_gain": float(ran["progress"]) - rep.progress_at_pause}


def cells(quick: bool) -> list[Cell]:
    gb, rb = (QUICK_GUEST_BYTES, QUICK_REGION_BYTES) if quick else (GUEST_BYTES, REGION_BYTES)
    return [Cell(tracker=t, load=name, rate_pps=rate, guest_bytes=gb, region_bytes=rb)
            for name, rate in LOADS for t in TRACKERS]


def run(*, quick: bool, iterations: int | None = None, progress: Any = None) -> list[Record]:
    n = iterations or (QUICK_ITERATIONS if quick else ITERATIONS)
    baseline = QUICK_BASELINE_S if quick else BASELINE_S
    key = os.urandom(32)
    recs: list[Record] = []
    for cell in cells(quick):
        samples = [measure(cell, key, baseline) for _ in range(n)]
        d: dict[str, Any] = dict(tracker=cell.tracker, load=cell.load,
                                 guest_mib=cell.guest_bytes // MiB,
                                 region_mib=cell.region_bytes // MiB, iterations=n)
        for metric, unit in (("total_s", "s"), ("downtime_ms", "ms"),
                             ("downtime_target_ms", "ms"), ("speed_kept", "ratio"),
                             ("bulk_speed_kept", "ratio"), ("armed_speed_kept", "ratio"),
                             ("bulk_s", "s"), ("armed_s", "s"),
                             ("rounds", "count"), ("final_pages", "pages"),
                             ("bandwidth_mb_s", "MB/s"), ("mb_sent", "MB"),
                             ("load_1min", "load")):
            if metric.endswith("speed_kept") and cell.load == "idle":
                continue  # one write a second: nothing to keep
            st = summary_stats([s[metric] for s in samples], ("p50", "max"))
            for stat, v in st.items():
                recs.append(Record.make(BENCH, metric, v, unit, stat=stat, **d))
        recs.append(Record.make(BENCH, "unmigrated_rate", summary_stats(
            [s["base_pps"] for s in samples], ("p50",))["p50"], "writes/s", stat="p50", **d))
        recs.append(Record.make(BENCH, "throttled", sum(s["throttled"] for s in samples) / n,
                                "ratio", stat="mean", **d))
        if progress:
            progress(cell, samples)
    return recs


def plot(records: list[Record], path: Path) -> Path | None:
    plt = pyplot(quiet=True)  # the command says "no plot" itself
    if plt is None:
        return None
    loads = [name for name, _ in LOADS]
    panels = (("total_s", "total time (s)"), ("downtime_ms", "downtime (ms)"),
              ("speed_kept", "guest speed kept during pre-copy"))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    width = 0.38
    for ax, (metric, label) in zip(axes, panels):
        for k, tr in enumerate(TRACKERS):
            xs, ys = [], []
            for i, ld in enumerate(loads):
                r = next((r for r in records if r.metric == metric and r.stat == "p50"
                          and r.dims.get("tracker") == tr and r.dims.get("load") == ld), None)
                if r is not None:
                    xs.append(i + (k - 0.5) * width)
                    ys.append(r.value)
            ax.bar(xs, ys, width, label=tr, color=("tab:blue", "tab:red")[k])
        if metric == "downtime_ms":
            for i, ld in enumerate(loads):
                lo, hi = QEMU["downtime_ms"][ld]
                ax.plot([i - 0.45, i + 0.45], [hi, hi], color="k", linestyle=":", linewidth=1)
            ax.plot([], [], color="k", linestyle=":", label="QEMU 7.2 (worst)")
        if metric == "total_s":
            ax.axhspan(*QEMU["total_s"], color="0.85", label="QEMU 7.2")
        ax.set_xticks(range(len(loads)), loads)
        ax.set_ylabel(label)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    gib = next((r.dims["guest_mib"] for r in records if "guest_mib" in r.dims), 0)
    fig.suptitle(f"live migration over loopback, {gib} MiB guest (p50)")
    return save(plt, fig, path, dpi=90)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("migrate", help="live migration total time, downtime and guest speed kept, "
                                       "ring vs bitmap, 1 GiB guest over loopback")
    p.add_argument("--out", type=Path, default=Path("results"), metavar="DIR",
                   help="directory for migrate.json and migrate.png (default ./results)")
    p.add_argument("--quick", action="store_true", help="64 MiB guest, one iteration (tests, CI)")
    p.add_argument("--iterations", type=int, default=None, metavar="N",
                   help=f"migrations per cell (default {ITERATIONS}, "
                        f"{QUICK_ITERATIONS} with --quick)")
    p.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    def show(cell: Cell, samples: list[dict[str, float]]) -> None:
        for s in samples:
            kept = "" if cell.load == "idle" else (
                f", speed kept {100 * s['speed_kept']:5.1f} % (bulk round "
                f"{100 * s['bulk_speed_kept']:5.1f} % for {s['bulk_s']:4.2f} s, armed rounds "
                f"{100 * s['armed_speed_kept']:5.1f} % for {s['armed_s']:4.2f} s)")
            print(f"{cell.tracker:>6} {cell.load:>11}: total {s['total_s']:5.2f} s, downtime "
                  f"{s['downtime_ms']:7.1f} ms (target says {s['downtime_target_ms']:7.1f})"
                  f"{kept}, {int(s['rounds'])} rounds{', throttled' if s['throttled'] else ''}"
                  f", load {s['load_1min']:.1f}",
                  flush=True)
    t0 = time.monotonic()
    try:
        recs = run(quick=args.quick, iterations=args.iterations, progress=show)
    except DirtyringError as e:
        print(f"dirtyring bench migrate: error: {e}", file=sys.stderr)
        return 1
    out = Path(args.out)
    j = write_json(out / f"{BENCH}.json", BENCH, recs,
                   settings={"quick": args.quick, "ring_entries": RING_ENTRIES,
                             "loads": dict(LOADS)},
                   extra={"qemu_7_2_reference": QEMU,
                          "elapsed_s": round(time.monotonic() - t0, 1)})
    png = plot(recs, out / f"{BENCH}.png")
    print(f"wrote {j}" + (f" and {png}" if png else " (matplotlib missing: no plot)"))
    return 0
