"""Harvest-and-rearm cost: ring vs bitmap vs bitmap+clear, over slot size and dirty-page count.

What one iteration measures
---------------------------
The dirtier guest rewrites a hot set of exactly N pages (``Pattern.HOT``, ``hot_pages=N``),
``stride`` pages apart: 1 (contiguous) or ``slot_pages // N`` (scattered across the whole slot),
and does ``out PORT_TICK`` after every N writes (``exit_every=N``), i.e. after every pass. Our
``on_tick`` hook runs on the vCPU thread inside that exit: it sets ``pause_requested`` (so the
vCPU parks right after completing the ``out``, before any further guest write) and wakes the
controller. The controller then ``pause_all()`` (waits until parked), times **only**
``tracker.harvest()`` (collect + re-arm write protection) with ``perf_counter_ns``, checks that
all N pages were reported, and ``resume_all()``. Since the harvest re-armed those pages, the next
pass faults on each of them again, so every iteration harvests the same N data pages (plus the
guest's status page and, now and then, a stack page).

The first ``warmup`` iterations are discarded (first-touch faults, the boot-time VMM writes).

Slot sizes are sparse memfd mappings (``MAP_NORESERVE``): only the N hot pages are ever backed.
The kernel still allocates per-slot metadata (rmap arrays, ~2 MiB per GiB here), so we build one
machine at a time and close it before the next. Machines must be built from the main thread
(the vCPU kick signal handler).
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..guests.protocol import GuestParams, Pattern
from ..machine import layout as mlayout
from ..machine.config import MachineConfig
from ..machine.vcpu import VcpuRunner
from ..machine.vm import Machine
from .records import BenchError, Record, find, summary_stats

BENCH = "harvest"
GiB = 1 << 30
PAGE = 4096
TRACKERS = ("ring", "bitmap", "bitmap-clear")
LAYOUTS = ("contiguous", "scattered")
#: Per-vCPU ring entries: room for 4096 dirty pages plus the guest's own pages (soft limit - 64).
RING_ENTRIES = 8192
ITERATIONS = 150
QUICK_ITERATIONS = 15
#: Sweeps over the matrix (samples pooled); see :func:`run`.
ROUNDS = 3
QUICK_ROUNDS = 1
WARMUP = 5
QUICK_WARMUP = 3
#: Seconds to wait for the guest's next tick before declaring the cell stuck.
TICK_TIMEOUT = 10.0

#: Goal 1: ring cost at 16 dirty pages stays within this factor over all slot sizes.
FLAT_PAGES, FLAT_LIMIT = 16, 1.5
#: Goal 2: at the largest slot, bitmap (GET + decode) / ring at 16 dirty pages is at least this.
RATIO_PAGES, RATIO_GOAL = 16, 100.0


@dataclass(frozen=True, slots=True, kw_only=True)
class HarvestParams:
    """One cell of the matrix. ``slot_gib`` is the requested size; see :attr:`slot_bytes`."""

    tracker: str
    slot_gib: int
    dirty_pages: int
    layout: str

    def __post_init__(self) -> None:
        if self.tracker not in TRACKERS:
            raise ValueError(f"tracker must be one of {TRACKERS}, not {self.tracker!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, not {self.layout!r}")
        if self.slot_gib <= 0 or self.dirty_pages <= 0:
            raise ValueError("slot_gib and dirty_pages must be positive")
        if self.dirty_pages > self.slot_pages:
            raise ValueError(f"{self.dirty_pages} pages do not fit in {self.slot_gib} GiB")
        if self.dirty_pages > RING_ENTRIES - 64 - 16:
            raise ValueError(f"{self.dirty_pages} pages do not fit in a ring of {RING_ENTRIES}")

    @property
    def id(self) -> str:
        return f"{self.tracker}-{self.slot_gib}GiB-{self.dirty_pages}p-{self.layout}"

    @property
    def slot_bytes(self) -> int:
        """The data slot really used: the requested size, capped at what the guest layout maps
        (``layout.MAX_DATA_BYTES``, 255 GiB at the time of writing)."""
        return min(self.slot_gib * GiB, mlayout.MAX_DATA_BYTES)

    @property
    def clamped(self) -> bool:
        return self.slot_bytes != self.slot_gib * GiB

    @property
    def slot_pages(self) -> int:
        return self.slot_bytes // PAGE

    @property
    def stride(self) -> int:
        return 1 if self.layout == "contiguous" else self.slot_pages // self.dirty_pages

    def expected_pages(self) -> np.ndarray:
        """Data-slot page indices the guest rewrites every pass (the dirtier's HOT pattern)."""
        return (np.arange(self.dirty_pages, dtype=np.int64) * self.stride) % self.slot_pages

    def machine_config(self) -> MachineConfig:
        return MachineConfig(
            guest="dirtier", vcpus=1, data_slots=(self.slot_bytes,), tracker=self.tracker,
            ring_entries=RING_ENTRIES,
            params=GuestParams(pattern=Pattern.HOT, hot_pages=self.dirty_pages,
                               stride=self.stride, exit_every=self.dirty_pages))

    def dims(self) -> dict[str, Any]:
        return {"tracker": self.tracker, "requested_gib": self.slot_gib,
                "slot_gib": round(self.slot_bytes / GiB, 3), "dirty_pages": self.dirty_pages,
                "layout": self.layout}


@dataclass(frozen=True, slots=True, kw_only=True)
class HarvestMatrix:
    """The cells of one run. Cells are ordered size, pages, layout, tracker: the three trackers
    of one (size, pages, layout) run back to back, so their A/B comparison shares host load."""

    sizes_gib: tuple[int, ...] = (1, 4, 16, 64, 256)
    pages: tuple[int, ...] = (16, 256, 4096)
    layouts: tuple[str, ...] = LAYOUTS
    trackers: tuple[str, ...] = TRACKERS

    @property
    def id(self) -> str:
        return (f"{'+'.join(map(str, self.sizes_gib))}GiB-{'+'.join(map(str, self.pages))}p-"
                f"{'+'.join(self.layouts)}-{'+'.join(self.trackers)}")

    def cells(self) -> list[HarvestParams]:
        return [HarvestParams(tracker=t, slot_gib=s, dirty_pages=n, layout=lay)
                for s in self.sizes_gib for n in self.pages for lay in self.layouts
                for t in self.trackers]


FULL = HarvestMatrix()
QUICK = HarvestMatrix(sizes_gib=(1, 4), pages=(16, 256))


@dataclass(frozen=True, slots=True, kw_only=True)
class CellResult:
    params: HarvestParams
    samples_ns: tuple[int, ...]
    reported: tuple[int, ...]  # len(harvest) per measured iteration
    missed: int  # expected pages absent from a harvest, summed over measured iterations


def measure_cell(p: HarvestParams, *, iterations: int, warmup: int = WARMUP,
                 timeout: float = TICK_TIMEOUT) -> CellResult:
    """Build the cell's machine, time ``iterations`` harvests (after ``warmup``), close it."""
    if iterations <= 0:
        raise ValueError("iterations must be positive")
    tick = threading.Event()

    def on_tick(vcpu: VcpuRunner) -> None:
        # vCPU thread, inside the TICK exit: park after completing this `out`, then wake us.
        vcpu.pause_requested = True
        tick.set()

    expected = p.expected_pages()
    samples: list[int] = []
    reported: list[int] = []
    missed = 0
    with Machine(p.machine_config()) as m:
        assert m.memory is not None and m.tracker is not None
        tracker = m.tracker
        data_slot = m.memory.slots[1].info.slot
        m.control.on_tick = on_tick
        for i in range(warmup + iterations):
            if not tick.wait(timeout):
                m.check()
                raise BenchError(f"harvest cell {p.id}: the guest did not tick within "
                                 f"{timeout:g} s")
            tick.clear()
            m.pause_all()
            t0 = time.perf_counter_ns()
            ds = tracker.harvest()
            t1 = time.perf_counter_ns()
            if i >= warmup:
                samples.append(t1 - t0)
                reported.append(len(ds))
                got = ds.slot(data_slot)
                missed += p.dirty_pages - int(np.count_nonzero(
                    np.isin(expected, got, assume_unique=True)))
            m.resume_all()
        m.control.on_tick = None
    return CellResult(params=p, samples_ns=tuple(samples), reported=tuple(reported),
                      missed=missed)


def cell_records(res: CellResult, iterations: int, rounds: int = 1) -> list[Record]:
    p = res.params
    d = p.dims()
    us = [s / 1e3 for s in res.samples_ns]
    out = [Record.make(BENCH, "harvest_time", v, "us", stat=k, iterations=iterations,
                       rounds=rounds, **d)
           for k, v in summary_stats(us, ("p50", "p90")).items()]
    out.append(Record.make(BENCH, "pages_reported", min(res.reported), "pages", stat="min",
                           **d))
    out.append(Record.make(BENCH, "pages_missed", res.missed, "pages", stat="value", **d))
    return out


def ratio_records(records: Sequence[Record]) -> list[Record]:
    """bitmap / ring and bitmap-clear / ring, at p50 and p90, for every cell that has both."""
    out: list[Record] = []
    for r in records:
        if r.metric != "harvest_time" or r.dims["tracker"] != "ring":
            continue
        d = r.dims
        where = {k: d[k] for k in ("requested_gib", "dirty_pages", "layout")}
        for other in ("bitmap", "bitmap-clear"):
            o = find(records, "harvest_time", r.stat, tracker=other, **where)
            if o is not None and r.value > 0:
                out.append(Record.make(BENCH, f"{other}_over_ring", o.value / r.value, "x",
                                       stat=r.stat, slot_gib=d["slot_gib"], **where))
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class Goal:
    name: str
    layout: str
    value: float
    limit: float
    met: bool
    text: str


def goals(records: Sequence[Record]) -> list[Goal]:
    """The two goal checks, per layout, over whatever sizes the records cover."""
    out: list[Goal] = []
    for lay in LAYOUTS:
        ring = sorted((r for r in records if r.metric == "harvest_time" and r.stat == "p50"
                       and r.matches(tracker="ring", dirty_pages=FLAT_PAGES, layout=lay)),
                      key=lambda r: float(r.dims["slot_gib"]))
        if len(ring) >= 2:
            lo, hi = min(r.value for r in ring), max(r.value for r in ring)
            a, b = ring[0].dims["slot_gib"], ring[-1].dims["slot_gib"]
            spread = hi / lo
            out.append(Goal(
                name="ring_flat", layout=lay, value=spread, limit=FLAT_LIMIT,
                met=spread <= FLAT_LIMIT,
                text=(f"ring at {FLAT_PAGES} {lay} pages, {a:g}..{b:g} GiB: max/min p50 = "
                      f"{spread:.2f}x ({lo:.1f}..{hi:.1f} us); goal <= {FLAT_LIMIT}x")))
        if ring:
            big = ring[-1]
            bm = find(records, "harvest_time", "p50", tracker="bitmap", dirty_pages=RATIO_PAGES,
                      layout=lay, requested_gib=big.dims["requested_gib"])
            if bm is not None:
                ratio = bm.value / big.value
                out.append(Goal(
                    name="ring_vs_bitmap", layout=lay, value=ratio, limit=RATIO_GOAL,
                    met=ratio >= RATIO_GOAL,
                    text=(f"at {big.dims['slot_gib']:g} GiB, {RATIO_PAGES} {lay} pages: bitmap "
                          f"{bm.value:.1f} us / ring {big.value:.1f} us = {ratio:.1f}x; goal "
                          f">= {RATIO_GOAL:g}x")))
    return out


def goal_records(gs: Sequence[Goal]) -> list[Record]:
    return [Record.make(BENCH, f"goal_{g.name}", g.value, "x", layout=g.layout, limit=g.limit,
                        met=g.met) for g in gs]


def split_iterations(iterations: int, rounds: int) -> list[int]:
    """Timed harvests per round: ``iterations`` spread as evenly as possible, none empty."""
    rounds = max(1, min(rounds, iterations))
    return [iterations // rounds + (1 if r < iterations % rounds else 0) for r in range(rounds)]


def merge(results: Sequence[CellResult]) -> CellResult:
    """One cell's results from several rounds, pooled."""
    return CellResult(params=results[0].params,
                      samples_ns=tuple(s for r in results for s in r.samples_ns),
                      reported=tuple(n for r in results for n in r.reported),
                      missed=sum(r.missed for r in results))


def run(matrix: HarvestMatrix = FULL, *, iterations: int = ITERATIONS, warmup: int = WARMUP,
        rounds: int = ROUNDS,
        progress: Callable[[int, int, CellResult], None] | None = None) -> list[Record]:
    """Measure every cell of ``matrix`` (one machine at a time) and derive ratios and goals.

    The matrix is swept ``rounds`` times, each sweep taking its share of ``iterations`` per
    cell, and the samples are pooled: a burst of load from elsewhere on the host then lands on
    all cells alike instead of skewing the few that happened to run during it.
    """
    cells = matrix.cells()
    per_round = split_iterations(iterations, rounds)
    done: dict[str, list[CellResult]] = {p.id: [] for p in cells}
    total, i = len(cells) * len(per_round), 0
    for n in per_round:
        for p in cells:
            res = measure_cell(p, iterations=n, warmup=warmup)
            done[p.id].append(res)
            i += 1
            if progress is not None:
                progress(i, total, res)
    records: list[Record] = []
    for p in cells:
        records += cell_records(merge(done[p.id]), iterations, len(per_round))
    records += ratio_records(records)
    records += goal_records(goals(records))
    return records


def incomplete(records: Sequence[Record]) -> list[str]:
    """Cells whose harvests missed pages the guest certainly wrote (a tracking bug)."""
    return [f"{r.dims['tracker']}-{r.dims['requested_gib']}GiB-{r.dims['dirty_pages']}p-"
            f"{r.dims['layout']}: {int(r.value)} pages missed"
            for r in records if r.metric == "pages_missed" and r.value > 0]


# --- text report ------------------------------------------------------------------------------
def format_table(records: Sequence[Record], trackers: Sequence[str] = TRACKERS) -> str:
    """Median (p90) harvest time per cell, trackers side by side, and the ratios to the ring."""
    cells = sorted({(float(r.dims["slot_gib"]), int(r.dims["requested_gib"]),
                     int(r.dims["dirty_pages"]), str(r.dims["layout"]))
                    for r in records if r.metric == "harvest_time"},
                   key=lambda c: (c[0], c[2], LAYOUTS.index(c[3])))
    head = f"{'GiB':>5} {'pages':>5} {'layout':<10}" + "".join(
        f" {t + ' p50 (p90) us':>26}" for t in trackers) + "  bitmap/ring  clear/ring"
    lines = [head, "-" * len(head)]
    for gib, req, n, lay in cells:
        row = f"{gib:>5g} {n:>5} {lay:<10}"
        p50: dict[str, float] = {}
        for t in trackers:
            a = find(records, "harvest_time", "p50", tracker=t, requested_gib=req,
                     dirty_pages=n, layout=lay)
            b = find(records, "harvest_time", "p90", tracker=t, requested_gib=req,
                     dirty_pages=n, layout=lay)
            if a is None or b is None:
                row += f" {'-':>26}"
                continue
            p50[t] = a.value
            row += f" {f'{a.value:.1f} ({b.value:.1f})':>26}"
        for t in ("bitmap", "bitmap-clear"):
            if "ring" in p50 and t in p50:
                row += f" {p50[t] / p50['ring']:>11.2f}x"
            else:
                row += f" {'-':>12}"
        lines.append(row)
    return "\n".join(lines)


def format_summary(records: Sequence[Record]) -> str:
    lines = []
    for g in goals(records):
        lines.append(f"goal {'MET' if g.met else 'NOT MET'}: {g.text}")
    for r in records:
        if r.metric == "harvest_time" and r.stat == "p50" and r.matches(
                tracker="ring", dirty_pages=4096, layout="scattered"):
            gib = r.dims["requested_gib"]
            parts = [f"ring {r.value:.0f} us"]
            for t in ("bitmap", "bitmap-clear"):
                o = find(records, "harvest_time", "p50", tracker=t, dirty_pages=4096,
                         layout="scattered", requested_gib=gib)
                if o is not None:
                    parts.append(f"{t} {o.value:.0f} us ({o.value / r.value:.2f}x ring)")
            lines.append(f"4096 scattered pages at {r.dims['slot_gib']:g} GiB: "
                         + ", ".join(parts))
    return "\n".join(lines)
