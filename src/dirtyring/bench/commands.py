"""``dirtyring bench harvest|exits``: run a bench, write ``DIR/<bench>.json`` and ``.png``.

Progress goes to stderr; the result table (or, with ``--jsonl``, one JSON record per line) goes to
stdout. Each handler returns an exit code: 0, or 1 after one clear line on stderr when the bench
failed (a DirtyringError) or measured a correctness problem (a tracker missed pages).
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..cli.options import positive_int
from ..errors import DirtyringError
from . import exits, fuzz, harvest
from .plot import plot_exits, plot_harvest
from .records import Record, host_info, json_lines, write_json


def _common(p: argparse.ArgumentParser, iterations_help: str) -> None:
    p.add_argument("--out", type=Path, default=Path("results"), metavar="DIR",
                   help="directory for <bench>.json and <bench>.png (default ./results)")
    p.add_argument("--quick", action="store_true",
                   help="small matrix and few iterations (tests, CI)")
    p.add_argument("--iterations", type=positive_int, default=None, metavar="N",
                   help=iterations_help)
    p.add_argument("--jsonl", action="store_true",
                   help="print the records as JSON lines on stdout instead of the table")


def register(subparsers: Any) -> None:
    """Add ``harvest``, ``exits`` and ``fuzz`` to an argparse subparsers object (handler in
    ``func``)."""
    h = subparsers.add_parser(
        "harvest", help="harvest-and-rearm cost: ring vs bitmap vs bitmap-clear, 1-256 GiB",
        description="Time tracker.harvest() (collect + re-arm) for the ring, bitmap and "
                    "bitmap-clear trackers over sparse slots of 1..256 GiB and 16/256/4096 "
                    "contiguous or scattered dirty pages; check the ring's goals.")
    _common(h, f"timed harvests per cell (default {harvest.ITERATIONS}, "
               f"{harvest.QUICK_ITERATIONS} with --quick)")
    h.add_argument("--rounds", type=positive_int, default=None, metavar="N",
                   help=f"sweeps over the matrix, samples pooled (default {harvest.ROUNDS}, "
                        f"{harvest.QUICK_ROUNDS} with --quick)")
    h.set_defaults(func=harvest_command)
    e = subparsers.add_parser(
        "exits", help="KVM_RUN round trip and pause/resume-all cost",
        description="Exits per second of a guest that exits on every write, and the cost of "
                    "pause_all()/resume_all() on 1 and 2 running vCPUs.")
    _common(e, f"pause/resume samples per vCPU count (default {exits.ITERATIONS}, "
               f"{exits.QUICK_ITERATIONS} with --quick)")
    e.set_defaults(func=exits_command)
    fuzz.add_parser(subparsers)  # ``fuzz``: atheris on the wire Connection and snapshot reader


def _guarded(name: str, body: Callable[[argparse.Namespace], int]
             ) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        try:
            return body(args)
        except DirtyringError as e:
            print(f"dirtyring bench {name}: error: {e}", file=sys.stderr)
            return 1
        except OSError as e:  # writing results
            print(f"dirtyring bench {name}: error: {e}", file=sys.stderr)
            return 1
    handler.__name__ = f"{name}_command"
    handler.__doc__ = body.__doc__
    return handler


def _emit(records: list[Record], table: str, args: argparse.Namespace) -> None:
    print(json_lines(records) if args.jsonl else table, flush=True)


def _harvest(args: argparse.Namespace) -> int:
    """``dirtyring bench harvest``."""
    matrix = harvest.QUICK if args.quick else harvest.FULL
    iterations = args.iterations or (harvest.QUICK_ITERATIONS if args.quick
                                     else harvest.ITERATIONS)
    warmup = harvest.QUICK_WARMUP if args.quick else harvest.WARMUP
    rounds = len(harvest.split_iterations(
        iterations, args.rounds or (harvest.QUICK_ROUNDS if args.quick else harvest.ROUNDS)))
    cells = matrix.cells()
    out = Path(args.out)
    notes = sorted({f"{c.slot_gib} GiB was measured as {c.slot_bytes / harvest.GiB:g} GiB: the "
                    "guest layout maps at most layout.MAX_DATA_BYTES of data memory"
                    for c in cells if c.clamped})
    err = sys.stderr
    print(f"harvest: {len(cells)} cells, {iterations} timed harvests each in {rounds} "
          f"round(s) (+{warmup} warmup per machine)", file=err, flush=True)
    for n in notes:
        print(f"harvest: note: {n}", file=err)
    t_start = time.monotonic()
    load_start = host_info().get("loadavg")

    def progress(i: int, total: int, res: harvest.CellResult) -> None:
        med = sorted(res.samples_ns)[len(res.samples_ns) // 2] / 1e3
        miss = f", {res.missed} pages MISSED" if res.missed else ""
        print(f"[{i:>3}/{total}] {res.params.id:<34} p50 {med:>9.1f} us{miss}  "
              f"({time.monotonic() - t_start:.0f} s)", file=err, flush=True)

    records = harvest.run(matrix, iterations=iterations, warmup=warmup, rounds=rounds,
                          progress=progress)
    gs = harvest.goals(records)
    path = write_json(out / "harvest.json", harvest.BENCH, records, settings={
        "quick": bool(args.quick), "iterations": iterations, "warmup": warmup, "rounds": rounds,
        "ring_entries": harvest.RING_ENTRIES, "matrix": asdict(matrix), "matrix_id": matrix.id,
    }, extra={"goals": [asdict(g) for g in gs], "notes": notes, "loadavg_start": load_start,
              "elapsed_s": round(time.monotonic() - t_start, 1)})
    _emit(records, harvest.format_table(records), args)
    summary = harvest.format_summary(records)
    if summary and args.quick:
        summary += "\n(quick matrix: the goals are defined over 1..256 GiB; these are indicative)"
    if summary:
        print(summary, file=sys.stdout if not args.jsonl else err, flush=True)
    png = plot_harvest(records, out / "harvest.png")
    print(f"harvest: wrote {path}" + (f" and {png}" if png else ""), file=err)
    bad = harvest.incomplete(records)
    if bad:
        print(f"dirtyring bench harvest: error: trackers missed dirty pages: {'; '.join(bad)}",
              file=err)
        return 1
    return 0


def _exits(args: argparse.Namespace) -> int:
    """``dirtyring bench exits``."""
    base = exits.QUICK if args.quick else exits.FULL
    params = exits.ExitsParams(roundtrip=base.roundtrip, pause_vcpus=base.pause_vcpus,
                               iterations=args.iterations or base.iterations)
    out = Path(args.out)
    err = sys.stderr
    print(f"exits: round trip {params.roundtrip.trials} x {params.roundtrip.trial_s:g} s; "
          f"pause/resume {params.iterations} samples on {params.pause_vcpus} vCPUs",
          file=err, flush=True)
    t_start = time.monotonic()
    load_start = host_info().get("loadavg")

    def progress(name: str, recs: list[Record]) -> None:
        print(f"exits: {name} done ({time.monotonic() - t_start:.1f} s)", file=err, flush=True)

    records = exits.run(params, progress=progress)
    path = write_json(out / "exits.json", exits.BENCH, records, settings={
        "quick": bool(args.quick), "iterations": params.iterations,
        "roundtrip": asdict(params.roundtrip), "pause_vcpus": list(params.pause_vcpus),
        "params_id": params.id},
        extra={"loadavg_start": load_start, "elapsed_s": round(time.monotonic() - t_start, 1)})
    _emit(records, exits.format_table(records), args)
    png = plot_exits(records, out / "exits.png")
    print(f"exits: wrote {path}" + (f" and {png}" if png else ""), file=err)
    return 0


harvest_command = _guarded("harvest", _harvest)
exits_command = _guarded("exits", _exits)
