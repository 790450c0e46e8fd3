"""``dirtyring bench exec``: unmodified Linux programs natively and under the library OS, in the
same run, against issue 15's goals.

- micro (``programs/exec_micro.c``, timed inside the program): the floor (a ``syscall`` the
  library OS returns from at once: what this host's kvm_pvm charges for the instruction
  itself), getpid and brk served in the guest (goal: within 1.5x of the floor), clock_gettime
  (goal: <= 0.2 us, i.e. no ``syscall``: the library OS's vDSO serves it), a 64-byte write to
  stdout (goal: no exit while the queue has room: the exits are counted), and getpid through
  the C library (``getpid_rw``: a site the library OS rewrites into a jump, so no trap). The
  raw-``syscall`` loops are not rewritable (the number comes from a register), so they keep
  measuring the trap;
- whole programs, wall time: a SQLite workload (200,000 inserts into a database file) and a
  busybox awk loop (goal: <= 1.10x native), as ``run --exec`` runs them by default
  (untracked: ``where="guest"``, the goal's figure). Beside it, tracked by the ring with 50 ms
  epochs (``guest-tracked``: what checkpointing costs on top; each page's first write in an
  epoch is a write-protect fault, a host cost reported per harvested page);
- start-up, for a program that returns at once: from building the program's machine to its
  end (the VMM's part; goal: <= 20 ms); and from the command to the program's end as its VMM
  saw it (after its ``main``, so a bound on "to main"; goal: <= 20 ms) and to the command's
  exit, both warm (``dirtyring-client`` with a ``dirtyring serve`` this bench starts: the
  goal's figure) and cold (``dirtyring run --exec``, a new Python process), beside the
  interpreter alone starting and ending (``python -S -c pass``) and with its site and numpy
  (``python -c "import numpy"``): the floors a Python command that uses numpy cannot go
  under.

Each guest run reports the syscall sites the library OS rewrote, and how many calls came
through them (fast) or still trapped; ``--no-rewrite`` runs every program with its code left
as linked, to compare.

Programs are built with gcc at the start (SQLite needs libsqlite3-dev, the awk loop
busybox-static: ``./tools/install-test-deps`` installs both); a missing one is skipped and said.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..cli.child import stop_process
from ..cli.client import client_path
from ..errors import DirtyringError
from ..linux.program import LinuxProgram
from ..linux.runner import EXEC_INTERVAL, ProgramResult, run_program
from .plot import pyplot, save
from .records import BenchError, Record, json_lines, write_json

BENCH = "exec"
HERE = Path(__file__).resolve().parent / "programs"
SQLITE_SRC = HERE / "sqlite_workload.c"
BUSYBOX = Path("/bin/busybox")
AWK_LOOP = "BEGIN { for (i = 0; i < @N@; i++) s += i % 7; print s }"
#: (micro ops, SQLite rows, awk iterations), full and --quick.
SIZES = {False: (100_000, 200_000, 3_000_000), True: (5_000, 5_000, 100_000)}
GOALS = {"getpid_vs_floor": 1.5, "brk_vs_floor": 1.5, "clock_us": 0.2,
         "program_vs_native": 1.10, "startup_ms": 20.0}


def _gcc(src: Path, out: Path, *libs: str) -> Path | None:
    gcc = shutil.which("gcc")
    if not gcc or not src.exists():
        return None
    r = subprocess.run([gcc, "-static", "-O2", "-o", str(out), str(src), *libs],
                       capture_output=True, text=True)
    return out if r.returncode == 0 else None


def _parse_micro(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        try:
            out[name] = float(value)
        except ValueError:
            continue
    return out


#: The epochs of the tracked program runs: what a user checkpointing a program might choose.
TRACKED_INTERVAL = 0.05


def _guest(path: Path, args: list[str], cwd: Path | None = None, *, rewrite: bool = True,
           tracker: str = "none") -> tuple[float, bytes, bytes, ProgramResult]:
    """Run in the guest: (wall seconds from building the machine to the end, stdout, stderr,
    the result: status, port exits of the vCPU, rewritten sites and calls). ``tracker``:
    "none" (``run --exec``'s default) or "ring" (50 ms epochs: what checkpointing adds)."""
    streams = {"stdout": bytearray(), "stderr": bytearray()}
    t0 = time.perf_counter()
    prog = LinuxProgram(path, [str(path), *args], rewrite_syscalls=rewrite)
    res = run_program(prog, write=lambda k, b: streams[k].extend(b),
                      interval=EXEC_INTERVAL if tracker == "none" else TRACKED_INTERVAL,
                      tracker=tracker)
    dt = time.perf_counter() - t0
    if res.crash:
        raise BenchError(f"{path.name} stopped in the guest: {res.crash}")
    return dt, bytes(streams["stdout"]), bytes(streams["stderr"]), res


def _rewrite_records(name: str, res: ProgramResult,
                     progress: Callable[[str], None]) -> list[Record]:
    """What rewriting syscall sites did in one guest run."""
    progress(f"{name:<8} syscall sites rewritten {res.rewritten_sites}, calls through them "
             f"{res.fast_calls}, trapped {res.trapped_calls}")
    return [Record.make(BENCH, "rewrite", v, unit, program=name, what=what)
            for what, v, unit in (("sites", res.rewritten_sites, "sites"),
                                  ("fast_calls", res.fast_calls, "calls"),
                                  ("trapped_calls", res.trapped_calls, "calls"))]


def _native(path: Path, args: list[str], cwd: Path) -> tuple[float, bytes, bytes, int]:
    t0 = time.perf_counter()
    p = subprocess.run([str(path), *args], capture_output=True, cwd=cwd, timeout=600)
    return time.perf_counter() - t0, p.stdout, p.stderr, p.returncode


def run(*, quick: bool, progress: Callable[[str], None] = lambda s: None,
        rewrite: bool = True) -> list[Record]:
    ops, rows, loops = SIZES[quick]
    reps = 1 if quick else 3
    recs: list[Record] = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        micro = _gcc(HERE / "exec_micro.c", d / "exec_micro")
        if micro is None:
            raise BenchError("cannot build the micro-benchmark program (is gcc installed?)")
        _, _, nerr, _ = _native(micro, [str(ops)], d)
        native = _parse_micro(nerr.decode())
        _, _, gerr, mres = _guest(micro, [str(ops)], rewrite=rewrite)
        exits = mres.io_exits
        guest = _parse_micro(gerr.decode())
        for name in ("floor", "getpid", "brk", "clock", "write64", "getpid_rw"):
            if name not in guest or name not in native:
                raise BenchError(f"the micro-benchmark did not report {name}")
            for where, v in (("native", native[name]), ("guest", guest[name])):
                recs.append(Record.make(BENCH, "op_us", v / 1e3, "us", op=name, where=where))
            progress(f"{name:<9} native {native[name] / 1e3:8.3f} us   guest "
                     f"{guest[name] / 1e3:8.3f} us")
        recs.append(Record.make(BENCH, "micro_exits", exits, "exits", where="guest"))
        progress(f"port exits during the micro run (writes included): {exits}")
        recs += _rewrite_records("micro", mres, progress)
        for name, cmd, args in _programs(d, rows, loops):
            if cmd is None:
                progress(f"{name}: skipped ({args[0]})")
                continue
            # Each run repeated, native and guest interleaved, and the median kept: one run of
            # half a second moves by ~10 % here from one run to the next.
            times: dict[str, list[float]] = {"native": [], "guest": [], "guest-tracked": []}
            for rep in range(reps):
                cwd = d / f"native-{name}-{rep}"  # a fresh directory: SQLite's file is new
                cwd.mkdir()
                nt, nout, nerr, nst = _native(cmd, args, cwd)
                if nst != 0 or not nout:
                    raise BenchError(f"{name} failed natively (status {nst}): {nerr[-300:]!r}")
                times["native"].append(nt)
                for where, tracker in (("guest", "none"), ("guest-tracked", "ring")):
                    gt, gout, _, gres = _guest(cmd, args, rewrite=rewrite, tracker=tracker)
                    if (gout, gres.status) != (nout, nst):
                        raise BenchError(f"{name}: the guest's output or status differs from "
                                         "native")
                    times[where].append(gt)
                    if tracker == "none":
                        untracked = gres
                    else:
                        tracked = gres
            walls = {where: sorted(ts)[len(ts) // 2] for where, ts in times.items()}
            for where, t in walls.items():
                recs.append(Record.make(BENCH, "wall_s", t, "s", program=name, where=where))
                if where != "native":
                    progress(f"{name:<8} native {walls['native']:7.3f} s   {where} {t:7.3f} s   "
                             f"({t / walls['native']:.2f}x, median of {reps})")
            recs += _rewrite_records(name, untracked, progress)
            # What tracking added, per page the ring reported: each is a write-protect fault
            # (plus its share of the harvests), the host's cost of dirty logging.
            pages = tracked.dirty_pages
            extra = (walls["guest-tracked"] - walls["guest"]) / max(pages, 1) * 1e6
            recs.append(Record.make(BENCH, "tracked_pages", pages, "pages", program=name))
            recs.append(Record.make(BENCH, "tracked_us_per_page", extra, "us", program=name))
            progress(f"{name:<8} tracked: {pages} pages reported in {tracked.epochs} epochs "
                     f"of {TRACKED_INTERVAL * 1e3:g} ms, {extra:.1f} us more each")
        true_prog = _gcc(HERE / "exec_micro.c", d / "exec_micro_0")
        assert true_prog is not None
        n = 5 if quick else 20
        recs += _startups(true_prog, rewrite, n, d, progress)
    return recs


def _startups(true_prog: Path, rewrite: bool, n: int, d: Path,
              progress: Callable[[str], None]) -> list[Record]:
    """Start-up, every way: the VMM's part in this process; the command, cold (a new Python
    process) and warm (``dirtyring-client`` with a ``dirtyring serve`` this bench starts and
    ends), each to the program's end as its VMM saw it (a bound on "to its main") and to the
    command's exit; and the interpreter's floors."""
    starts = sorted(_startup(true_prog, rewrite) for _ in range(n))
    recs = _startup_records(starts, "vmm")
    progress(f"start-up (build, boot, run until an empty program has ended): p50 "
             f"{starts[len(starts) // 2] * 1e3:.1f} ms, min {starts[0] * 1e3:.1f} ms")
    cmd = ["run", "--exec", str(true_prog), "--json", "--", "0"]
    cold = [_timed_command([sys.executable, "-m", "dirtyring.cli.main", *cmd])
            for _ in range(max(3, n // 2))]
    with _warm_server(d / "serve.sock") as env:
        client = str(client_path())
        warm = [_timed_command([client, *cmd], env) for _ in range(n)]
    for what, runs in (("command", cold), ("warm-command", warm)):
        for i, to in enumerate(("end", "exit")):
            recs += _startup_records(sorted(r[i] for r in runs), what, to=to)
        p50 = [sorted(r[i] for r in runs)[len(runs) // 2] * 1e3 for i in (0, 1)]
        name = ("dirtyring run --exec" if what == "command"
                else "dirtyring-client run --exec (warm server)")
        progress(f"start-up of {name}: to the program's end p50 {p50[0]:.1f} ms, to the "
                 f"command's exit {p50[1]:.1f} ms")
    floor = sorted(_timed([sys.executable, "-S", "-c", "pass"]) for _ in range(n))
    numpy_floor = sorted(_timed([sys.executable, "-c", "import numpy"]) for _ in range(n))
    recs += _startup_records(floor, "python") + _startup_records(numpy_floor, "python+numpy")
    progress(f"the Python interpreter alone (python -S -c pass): p50 "
             f"{floor[len(floor) // 2] * 1e3:.0f} ms; with its site and numpy (python -c "
             f"'import numpy'): p50 {numpy_floor[len(numpy_floor) // 2] * 1e3:.0f} ms")
    return recs


@contextmanager
def _warm_server(sock: Path) -> Iterator[dict[str, str]]:
    """A ``dirtyring serve`` at ``sock`` while inside (the environment its client needs);
    ended by its PID."""
    p = subprocess.Popen([sys.executable, "-m", "dirtyring.cli.main", "serve", "--quiet",
                          "--socket", str(sock)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        line = p.stdout.readline()
        if "listening on" not in line:
            p.kill()
            raise BenchError(f"dirtyring serve did not start: {line}{p.communicate()[1]}")
        yield dict(os.environ, DIRTYRING_SOCKET=str(sock))
    finally:
        stop_process(p, grace=60)


def _timed_command(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """Seconds from starting ``cmd`` (a ``run --exec ... --json``) to its program's end, as
    its VMM saw it (the done event's ``ended_monotonic``), and to its exit."""
    t0, t1, err = _run_checked(cmd, env)
    try:
        ended = json.loads(err.splitlines()[-1])["ended_monotonic"]
    except (IndexError, ValueError, KeyError):
        raise BenchError(f"{' '.join(cmd[:4])}... printed no done event: "
                         f"{err[-300:]!r}") from None
    return ended - t0, t1 - t0


def _startup(path: Path, rewrite: bool) -> float:
    """Seconds from building an empty program (``main`` returns at once) to the VMM seeing it
    end: start-up plus its exit, not the machine's teardown after it."""
    t0 = time.monotonic()
    _, _, _, res = _guest(path, ["0"], rewrite=rewrite)
    if res.status != 0:
        raise BenchError(f"{path.name} did not end cleanly: status {res.status}")
    return res.ended_at - t0


def _run_checked(cmd: list[str], env: dict[str, str] | None = None
                 ) -> tuple[float, float, bytes]:
    """Run a command that must succeed: when it started and ended (time.monotonic, the
    system's clock a VMM's timestamps are on too) and its stderr."""
    t0 = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, timeout=120, env=env)
    t1 = time.monotonic()
    if p.returncode != 0:
        raise BenchError(f"{' '.join(cmd[:4])}... failed (status {p.returncode}): "
                         f"{p.stderr[-300:]!r}")
    return t0, t1, p.stderr


def _timed(cmd: list[str]) -> float:
    """Wall seconds of a command that must succeed."""
    t0, t1, _ = _run_checked(cmd)
    return t1 - t0


def _startup_records(sorted_s: list[float], what: str, **dims: str) -> list[Record]:
    return [Record.make(BENCH, "startup_ms", sorted_s[len(sorted_s) // 2] * 1e3, "ms",
                        stat="p50", what=what, **dims),
            Record.make(BENCH, "startup_ms", sorted_s[0] * 1e3, "ms", stat="min", what=what,
                        **dims)]


def _programs(d: Path, rows: int, loops: int) -> list[tuple[str, Path | None, list[str]]]:
    sq = _gcc(SQLITE_SRC, d / "sqlite_workload", "-lsqlite3", "-lm")
    out: list[tuple[str, Path | None, list[str]]] = [
        ("sqlite", sq, ["delete", str(rows)] if sq else ["no libsqlite3.a or workload source"])]
    if BUSYBOX.exists():
        out.append(("awk", BUSYBOX, ["awk", AWK_LOOP.replace("@N@", str(loops))]))
    else:
        out.append(("awk", None, ["no /bin/busybox"]))
    return out


def goals(records: list[Record]) -> dict[str, Any]:
    """Each goal with the measured figure and whether it is met."""
    def op(name: str, where: str = "guest") -> float:
        return next(r.value for r in records if r.metric == "op_us"
                    and r.matches(op=name, where=where))
    out: dict[str, Any] = {}
    floor = op("floor")
    for name in ("getpid", "brk"):
        ratio = op(name) / floor
        out[f"{name}_vs_floor"] = {"value": round(ratio, 2), "goal": GOALS[f"{name}_vs_floor"],
                                   "met": ratio <= GOALS[f"{name}_vs_floor"]}
    out["clock_us"] = {"value": round(op("clock"), 3), "goal": GOALS["clock_us"],
                       "met": op("clock") <= GOALS["clock_us"]}
    for name in ("sqlite", "awk"):
        w = {r.dims["where"]: r.value for r in records if r.metric == "wall_s"
             and r.matches(program=name)}
        # As ``run --exec`` runs it (untracked: the library OS's own cost).
        if "guest" in w and "native" in w:
            ratio = w["guest"] / w["native"]
            out[f"{name}_vs_native"] = {"value": round(ratio, 2),
                                        "goal": GOALS["program_vs_native"],
                                        "met": ratio <= GOALS["program_vs_native"]}
    start = {(r.dims["what"], r.dims.get("to", "end")): r.value for r in records
             if r.metric == "startup_ms" and r.stat == "p50"}
    goal = GOALS["startup_ms"]
    # The VMM's part; then the command, to its program's end as its VMM saw it (after the
    # program's main, so a bound on "to main"): warm (dirtyring-client and dirtyring serve),
    # with the cold command (a Python process, which starts no faster than its interpreter
    # with numpy: the floors, measured in the same run) beside it.
    out["startup_ms"] = {"value": round(start["vmm", "end"], 1), "goal": goal,
                         "met": start["vmm", "end"] <= goal}
    warm = start["warm-command", "end"]
    out["startup_command_ms"] = {
        "value": round(warm, 1), "goal": goal, "met": warm <= goal,
        "command": "dirtyring-client run --exec (dirtyring serve running)",
        "to_exit_ms": round(start["warm-command", "exit"], 1),
        "cold_command_ms": round(start["command", "end"], 1),
        "cold_to_exit_ms": round(start["command", "exit"], 1),
        "floor_python_ms": round(start["python", "end"], 1),
        "floor_python_numpy_ms": round(start["python+numpy", "end"], 1)}
    return out


def context(records: list[Record]) -> dict[str, Any]:
    """Figures with no goal of their own, reported beside the goals: what tracking adds."""
    out: dict[str, Any] = {}
    for name in ("sqlite", "awk"):
        w = {r.dims["where"]: r.value for r in records if r.metric == "wall_s"
             and r.matches(program=name)}
        per = [r.value for r in records if r.metric == "tracked_us_per_page"
               and r.matches(program=name)]
        if "guest-tracked" in w and "native" in w:
            out[f"{name}_tracked_vs_native"] = {
                "value": round(w["guest-tracked"] / w["native"], 2),
                "epochs_ms": TRACKED_INTERVAL * 1e3,
                "us_per_reported_page": round(per[0], 1) if per else None}
    return out


def format_table(records: list[Record]) -> str:
    """Native and guest side by side, per operation and per program."""
    rows = ["what                 native        guest     ratio"]
    for metric, key, unit, scale in (("op_us", "op", "us", 1.0), ("wall_s", "program", "s", 1.0)):
        names = dict.fromkeys(str(r.dims[key]) for r in records if r.metric == metric)
        for n in names:
            v = {r.dims["where"]: r.value * scale for r in records
                 if r.metric == metric and r.dims[key] == n}
            for where in ("guest", "guest-tracked"):
                if where in v and "native" in v:
                    label = n if where == "guest" else f"{n} tracked"
                    rows.append(f"{label:<16} {v['native']:>7.3f} {unit:<2} {v[where]:>10.3f} "
                                f"{unit:<2} {v[where] / max(v['native'], 1e-12):>8.1f}x")
    for r in records:
        if r.metric in ("startup_ms", "micro_exits"):
            to = f" to {r.dims['to']}" if "to" in r.dims else ""
            name = (f"start {r.dims['what']}{to} {r.stat}" if r.metric == "startup_ms"
                    else r.metric)
            rows.append(f"{name:<32} {r.value:>8.1f} {r.unit}")
    for n in dict.fromkeys(str(r.dims["program"]) for r in records if r.metric == "rewrite"):
        v = {r.dims["what"]: int(r.value) for r in records
             if r.metric == "rewrite" and r.dims["program"] == n}
        rows.append(f"rewrite {n:<8} {v.get('sites', 0):>6} sites {v.get('fast_calls', 0):>9} "
                    f"fast {v.get('trapped_calls', 0):>8} trapped")
    return "\n".join(rows)


def plot(records: list[Record], path: Path) -> Path | None:
    """Guest time over native time per operation and program (log scale)."""
    plt = pyplot(quiet=True)
    if plt is None:
        return None
    labels, ratios = [], []
    for metric, key in (("op_us", "op"), ("wall_s", "program")):
        for n in dict.fromkeys(str(r.dims[key]) for r in records if r.metric == metric):
            v = {r.dims["where"]: r.value for r in records
                 if r.metric == metric and r.dims[key] == n}
            for where in ("guest", "guest-tracked"):
                if where in v and "native" in v:
                    labels.append(n if where == "guest" else f"{n}\ntracked")
                    ratios.append(v[where] / max(v["native"], 1e-12))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(labels, ratios)
    ax.set_yscale("log")
    ax.set_ylabel("guest / native time")
    ax.axhline(GOALS["program_vs_native"], color="grey", linewidth=0.8, linestyle=":")
    ax.set_title("Linux programs under the library OS")
    fig.tight_layout()
    return save(plt, fig, path, dpi=90)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("exec", help="Linux programs natively vs under the library OS",
                       description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--out", type=Path, default=Path("results"), metavar="DIR",
                   help="directory for exec.json and exec.png (default ./results)")
    p.add_argument("--quick", action="store_true", help="small sizes (tests, CI)")
    p.add_argument("--jsonl", action="store_true",
                   help="print the records as JSON lines on stdout instead of the table")
    p.add_argument("--no-rewrite", action="store_true",
                   help="run the guests with their syscall sites left as linked (every "
                        "`syscall` traps), to compare (default: rewrite)")
    p.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    """``dirtyring bench exec``."""
    try:
        t0 = time.monotonic()
        recs = run(quick=args.quick, progress=lambda s: print(s, file=sys.stderr, flush=True),
                   rewrite=not args.no_rewrite)
        g = goals(recs)
        path = write_json(Path(args.out) / f"{BENCH}.json", BENCH, recs,
                          settings={"quick": args.quick, "sizes": SIZES[args.quick],
                                    "rewrite": not args.no_rewrite},
                          extra={"goals": g, "context": context(recs),
                                 "elapsed_s": round(time.monotonic() - t0, 1)})
    except (DirtyringError, OSError) as e:
        print(f"dirtyring bench exec: error: {e}", file=sys.stderr)
        return 1
    print(json_lines(recs) if args.jsonl else format_table(recs), flush=True)
    for name, v in g.items():
        floor = (f" ({v['command']}; to its exit {v['to_exit_ms']} ms). Cold, "
                 f"dirtyring run --exec: {v['cold_command_ms']} ms (to its exit "
                 f"{v['cold_to_exit_ms']} ms), of which the Python interpreter alone takes "
                 f"{v['floor_python_ms']} ms, {v['floor_python_numpy_ms']} ms with its site "
                 "and numpy" if "floor_python_ms" in v else "")
        print(f"goal {name}: {v['value']} (goal {v['goal']}): "
              f"{'met' if v['met'] else 'NOT met'}{floor}", file=sys.stderr)
    for name, v in context(recs).items():
        print(f"beside the goals: {name}: {v['value']} ({v['epochs_ms']:g} ms epochs, "
              f"{v['us_per_reported_page']} us per reported page)", file=sys.stderr)
    png = plot(recs, Path(args.out) / f"{BENCH}.png")
    print(f"exec: wrote {path}" + (f" and {png}" if png else ""), file=sys.stderr)
    return 0
