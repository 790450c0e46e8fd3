"""``dirtyring bench replicate``: committed checkpoints per second and guest progress under
replication, for each tracker, epoch length and working set, against the same guest unprotected
(measured right before each epoch length's cells), and the host's ceiling measured in the same
run (the guest paused and resumed at the same rate with only its registers read: no tracking,
copy or network).

Each cell runs a real standby process on loopback and the primary in this process (one vCPU,
inline on the main thread), with the dirtier rewriting a hot set of N pages.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from ..cli.child import ChildProcess, free_port
from ..errors import DirtyringError
from ..guests.protocol import GuestParams, Pattern
from ..machine.config import MachineConfig
from ..machine.vm import Machine
from .plot import pyplot, save
from .records import Record, write_json

BENCH = "replicate"
INTERVALS_US = (100, 125, 150, 175, 200, 250, 1000, 5000, 25000)
WORKING_SETS = (16, 64, 256, 4096)
TRACKERS = ("ring", "bitmap", "hotset")
QUICK_INTERVALS_US = (250, 5000)
QUICK_WORKING_SETS = (64,)
SECONDS, QUICK_SECONDS = 2.0, 0.8
WARMUP = 0.4


@dataclass(frozen=True, slots=True, kw_only=True)
class Cell:
    tracker: str
    interval_us: int
    pages: int

    @property
    def id(self) -> str:
        return f"{self.tracker}-{self.interval_us}us-{self.pages}p"


def _config(tracker: str, pages: int) -> MachineConfig:
    mem = max(pages, 64) * 4096 * 2
    ring = 1 << max(12, (pages + 64).bit_length())
    return MachineConfig(guest="dirtier", tracker=tracker, data_slots=(mem,),
                         ring_entries=min(ring, 65536),
                         params=GuestParams(pattern=Pattern.HOT, hot_pages=pages))


def unprotected_rate(pages: int, seconds: float) -> float:
    """Page writes per second of the guest running alone (inline, no epochs)."""
    m = Machine(MachineConfig(guest="dirtier", tracker="none",
                              data_slots=(max(pages, 64) * 8192,),
                              params=GuestParams(pattern=Pattern.HOT, hot_pages=pages)),
                threaded=False)
    try:
        m.runners[0].run_inline(0.05)
        a, t = m.progress(), time.perf_counter()
        m.runners[0].run_inline(seconds)
        return (m.progress() - a) / (time.perf_counter() - t)
    finally:
        m.close()


def ceiling(interval: float, pages: int, seconds: float) -> tuple[float, float]:
    """(stops per second, page writes per second) pausing and resuming at ``interval`` with
    only the registers read."""
    m = Machine(MachineConfig(guest="dirtier", tracker="none",
                              data_slots=(max(pages, 64) * 8192,),
                              params=GuestParams(pattern=Pattern.HOT, hot_pages=pages)),
                threaded=False)
    try:
        r = m.runners[0]
        r.run_inline(0.05)
        n, a, t0 = 0, m.progress(), time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            r.run_inline(interval)
            m.capture_regs()
            n += 1
        el = time.perf_counter() - t0
        return n / el, (m.progress() - a) / el
    finally:
        m.close()


def measure(cell: Cell, seconds: float, key: bytes) -> dict[str, float]:
    from ..replication.primary import Primary, PrimaryOptions
    port = free_port()
    sb = ChildProcess("standby", ["standby", "--listen", f"127.0.0.1:{port}"],
                      dict(os.environ, DIRTYRING_KEY=key.hex()))
    samples: list[dict[str, Any]] = []
    try:
        if sb.wait_event("listening", 30) is None:
            raise DirtyringError(f"the standby process did not start: {sb.describe()}")
        m = Machine(_config(cell.tracker, cell.pages), threaded=False)
        try:
            prim = Primary(m, ("127.0.0.1", port), key,
                           options=PrimaryOptions(interval=cell.interval_us * 1e-6,
                                                  unsafe_output=True),
                           on_event=lambda e: samples.append(e) if e["event"] == "stats" else None)
            try:
                prim.run(seconds + WARMUP + 0.3, progress_every=0.1)
            finally:
                prim.close()
        finally:
            m.close()
    finally:
        sb.stop()
    protected = [s for s in samples if s["state"] == "protected"]
    if len(protected) < 2:
        raise DirtyringError(f"cell {cell.id}: the primary never became protected")
    t_first = protected[0]["t"]
    window = [s for s in protected if s["t"] >= t_first + WARMUP] or protected
    a, b = window[0], window[-1]
    dt = max(b["t"] - a["t"], 1e-6)
    return {"committed_per_s": (b["acked"] - a["acked"]) / dt,
            "progress_per_s": (b["guest_progress"] - a["guest_progress"]) / dt,
            "pause_us_p50": b["pause_us_p50"], "pause_us_p99": b["pause_us_p99"],
            "mb_per_s": b["mb_per_s"], "ack_ms_p50": b["ack_ms_p50"],
            "compression_ratio": b["compression_ratio"],
            # Checkpoints the native steady batch took (hot set only), of all in the window.
            "steady_fraction": (b["steady_pauses"] - a["steady_pauses"])
            / max(b["epoch"] - a["epoch"], 1)}


def run(*, quick: bool, seconds: float | None = None, progress: Any = None,
        pages: tuple[int, ...] | None = None,
        intervals_us: tuple[int, ...] | None = None) -> list[Record]:
    """Measure the matrix (or the cells ``pages`` x ``intervals_us`` of it, to compare two
    versions on the cells that matter without a full run)."""
    intervals = intervals_us or (QUICK_INTERVALS_US if quick else INTERVALS_US)
    sets = pages or (QUICK_WORKING_SETS if quick else WORKING_SETS)
    secs = seconds or (QUICK_SECONDS if quick else SECONDS)
    key = os.urandom(32)
    recs: list[Record] = []
    base: dict[int, float] = {}
    for iv in intervals:
        for n in sets:
            # The guest alone, right before its cells: this host's speed drifts by several
            # per cent over the minutes a full run takes (64 pages: 215-236 M writes/s), and a
            # baseline from the start would count that drift as the cells' overhead.
            base[n] = unprotected_rate(n, 0.25 if quick else 0.5)
            recs.append(Record.make(BENCH, "unprotected_progress", base[n], "writes/s",
                                    interval_us=iv, pages=n))
            stops, prog = ceiling(iv * 1e-6, n, secs / 2)
            recs.append(Record.make(BENCH, "ceiling_stops", stops, "1/s", interval_us=iv,
                                    pages=n, tracker="ceiling"))
            recs.append(Record.make(BENCH, "progress_fraction", prog / base[n], "ratio",
                                    interval_us=iv, pages=n, tracker="ceiling"))
            for tr in TRACKERS:
                cell = Cell(tracker=tr, interval_us=iv, pages=n)
                r = measure(cell, secs, key)
                d: dict[str, Any] = dict(interval_us=iv, pages=n, tracker=tr)
                recs.append(Record.make(BENCH, "committed", r["committed_per_s"], "1/s", **d))
                recs.append(Record.make(BENCH, "progress_fraction",
                                        r["progress_per_s"] / base[n], "ratio", **d))
                recs.append(Record.make(BENCH, "pause_us", r["pause_us_p50"], "us", stat="p50",
                                        **d))
                recs.append(Record.make(BENCH, "pause_us", r["pause_us_p99"], "us", stat="p99",
                                        **d))
                recs.append(Record.make(BENCH, "throughput", r["mb_per_s"], "MB/s", **d))
                recs.append(Record.make(BENCH, "ack_ms", r["ack_ms_p50"], "ms", stat="p50",
                                        **d))
                if tr == "hotset":
                    recs.append(Record.make(BENCH, "steady_fraction", r["steady_fraction"],
                                            "ratio", **d))
                if progress:
                    progress(cell, r, base[n], stops, prog)
    return recs


#: Issue 3's goal: committed checkpoints/s with the guest keeping this much of its progress.
GOAL_RATE, GOAL_PROGRESS, GOAL_PAGES = 4000.0, 0.5, 64


def verdict(records: list[Record]) -> str:
    """The goal line: the best committed rate among cells of the goal's working set where
    the guest kept at least the goal's progress, and whether that meets the goal."""
    prog = {(r.dims["tracker"], r.dims["interval_us"]): r.value for r in records
            if r.metric == "progress_fraction" and r.dims.get("pages") == GOAL_PAGES}
    cells = [(r.value, prog.get((r.dims["tracker"], r.dims["interval_us"]), 0.0),
              r.dims["tracker"], r.dims["interval_us"]) for r in records
             if r.metric == "committed" and r.dims.get("pages") == GOAL_PAGES]
    if not cells:
        return f"goal: no cell with {GOAL_PAGES} pages measured"
    ok = [c for c in cells if c[1] >= GOAL_PROGRESS]
    fast = max(cells)
    head = (f"goal: {GOAL_RATE:,.0f} committed/s with the guest at >= {GOAL_PROGRESS:.0%}, "
            f"{GOAL_PAGES} pages: ")
    if not ok:
        return head + (f"NOT met (no cell kept {GOAL_PROGRESS:.0%}; fastest {fast[0]:,.0f}/s "
                       f"at {fast[1]:.0%}, {fast[2]} {fast[3]} µs)")
    best = max(ok)
    met = "met" if best[0] >= GOAL_RATE else "NOT met"
    return head + (f"{met}: best {best[0]:,.0f}/s at {best[1]:.0%} ({best[2]}, {best[3]} µs); "
                   f"fastest {fast[0]:,.0f}/s at {fast[1]:.0%} ({fast[2]}, {fast[3]} µs)")


def plot(records: list[Record], path: Path) -> Path | None:
    """Per working set: committed checkpoints/s (top) and the guest's kept progress (bottom)
    against epoch length, for each tracker and the pause-only ceiling."""
    plt = pyplot(quiet=True)  # the command says "no plot" itself
    if plt is None:
        return None
    sets = sorted({r.dims["pages"] for r in records if "interval_us" in r.dims})
    fig, axes = plt.subplots(2, len(sets), figsize=(5 * len(sets), 7.5), squeeze=False)
    for col, n in enumerate(sets):
        top, bottom = axes[0][col], axes[1][col]
        for tr in (*TRACKERS, "ceiling"):
            style = dict(marker="o", label=tr, linestyle="--" if tr == "ceiling" else "-")
            metric = "ceiling_stops" if tr == "ceiling" else "committed"
            for ax, m, scale in ((top, metric, 1.0), (bottom, "progress_fraction", 100.0)):
                pts = sorted((r.dims["interval_us"], r.value * scale) for r in records
                             if r.metric == m and r.dims.get("pages") == n
                             and r.dims.get("tracker") == tr)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], **style)
        top.set_title(f"hot set of {n} pages")
        top.set_ylabel("committed checkpoints / s")
        bottom.set_ylabel("guest progress kept (%)")
        bottom.axhline(100 * GOAL_PROGRESS, color="grey", linewidth=0.8, linestyle=":")
        if n == GOAL_PAGES:
            top.axhline(GOAL_RATE, color="grey", linewidth=0.8, linestyle=":")
        for ax in (top, bottom):
            ax.set_xscale("log")
            ax.set_xlabel("epoch length (µs)")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize="small")
    fig.tight_layout()
    return save(plt, fig, path, dpi=90)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("replicate", help="committed checkpoints/s and guest progress under "
                                         "replication vs unprotected and the host ceiling")
    p.add_argument("--out", type=Path, default=Path("results"), metavar="DIR",
                   help="directory for replicate.json and replicate.png (default ./results)")
    p.add_argument("--quick", action="store_true", help="small matrix (tests, CI)")
    p.add_argument("--seconds", type=float, default=None,
                   help=f"measured seconds per cell (default {SECONDS:g}, "
                        f"{QUICK_SECONDS:g} with --quick)")
    p.add_argument("--pages", type=_int_list, default=None, metavar="N[,N...]",
                   help="only these hot-set sizes, in pages (default "
                        f"{','.join(map(str, WORKING_SETS))}; "
                        f"{','.join(map(str, QUICK_WORKING_SETS))} with --quick)")
    p.add_argument("--intervals", type=_int_list, default=None, metavar="US[,US...]",
                   help="only these epoch lengths, in µs (default "
                        f"{','.join(map(str, INTERVALS_US))}; "
                        f"{','.join(map(str, QUICK_INTERVALS_US))} with --quick)")
    p.set_defaults(func=command)


def _int_list(text: str) -> tuple[int, ...]:
    """``64,256`` -> (64, 256); positive integers only (argparse turns the error into a usage
    message)."""
    try:
        out = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not out or min(out) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers: {text!r}")
    return out


def command(args: argparse.Namespace) -> int:
    def show(cell: Cell, r: dict[str, float], base: float, stops: float, prog: float) -> None:
        print(f"{cell.tracker:>7} {cell.interval_us:6d} µs {cell.pages:5d} pages: "
              f"{r['committed_per_s']:7.0f} committed/s, guest at "
              f"{100 * r['progress_per_s'] / base:5.1f} % | ceiling {stops:7.0f} stops/s at "
              f"{100 * prog / base:5.1f} %  (pause p50 {r['pause_us_p50']:.0f} µs, "
              f"{r['mb_per_s']:.0f} MB/s)", flush=True)
    try:
        recs = run(quick=args.quick, seconds=args.seconds, progress=show, pages=args.pages,
                   intervals_us=args.intervals)
    except DirtyringError as e:
        print(f"dirtyring bench replicate: error: {e}", file=sys.stderr)
        return 1
    print(verdict(recs))
    out = Path(args.out)
    settings = {"quick": args.quick, "pages": args.pages, "intervals_us": args.intervals}
    j = write_json(out / f"{BENCH}.json", BENCH, recs, settings=settings)
    png = plot(recs, out / f"{BENCH}.png")
    print(f"wrote {j}" + (f" and {png}" if png else " (matplotlib missing: no plot)"))
    return 0
