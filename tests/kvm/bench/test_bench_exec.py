"""``dirtyring bench exec --quick`` end to end: every figure is measured natively and in the
guest in the same run, the programs' output matched (the bench refuses otherwise), and every
goal is reported with its figure. No speed is asserted: benchmarks measure, tests check."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from dirtyring.bench.records import read_json


def test_bench_exec_quick(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "dirtyring.cli.main", "bench", "exec", "--quick",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    doc, recs = read_json(tmp_path / "exec.json")
    json.dumps(doc)
    ops = {(r.dims["op"], r.dims["where"]) for r in recs if r.metric == "op_us"}
    assert ops == {(o, w) for o in ("floor", "getpid", "brk", "clock", "write64", "getpid_rw")
                   for w in ("native", "guest")}
    # What rewriting syscall sites did, per guest run: the micro run's getpid_rw loop came
    # through a rewritten site.
    rw = {(r.dims["program"], r.dims["what"]): r.value for r in recs if r.metric == "rewrite"}
    assert {p for p, _ in rw} == {"micro", "sqlite", "awk"}
    assert rw["micro", "sites"] > 0 and rw["micro", "fast_calls"] > 0
    assert all(r.value > 0 for r in recs if r.metric in ("op_us", "wall_s", "startup_ms"))
    programs = {(r.dims["program"], r.dims["where"]) for r in recs if r.metric == "wall_s"}
    assert programs == {(n, w) for n in ("sqlite", "awk")
                        for w in ("native", "guest", "guest-tracked")}
    # The tracked runs reported pages (every program writes some), and what each cost.
    assert {r.dims["program"] for r in recs if r.metric == "tracked_pages" and r.value > 0} \
        == {"sqlite", "awk"}
    starts = {(r.dims["what"], r.dims.get("to"), r.stat) for r in recs
              if r.metric == "startup_ms"}
    assert starts == {(w, to, s) for w, to in (("vmm", None), ("python", None),
                                               ("python+numpy", None), ("command", "end"),
                                               ("command", "exit"), ("warm-command", "end"),
                                               ("warm-command", "exit"))
                      for s in ("p50", "min")}
    goals = doc["goals"]
    assert set(goals) == {"getpid_vs_floor", "brk_vs_floor", "clock_us", "sqlite_vs_native",
                          "awk_vs_native", "startup_ms", "startup_command_ms"}
    assert all(isinstance(g["met"], bool) and g["value"] >= 0 for g in goals.values())
    command = goals["startup_command_ms"]
    assert command["command"].startswith("dirtyring-client run --exec")
    for key in ("to_exit_ms", "cold_command_ms", "cold_to_exit_ms", "floor_python_ms",
                "floor_python_numpy_ms"):
        assert command[key] > 0
    # To the program's end comes before the command's exit, warm and cold.
    assert command["value"] < command["to_exit_ms"]
    assert command["cold_command_ms"] < command["cold_to_exit_ms"]
    assert set(doc["context"]) == {"sqlite_tracked_vs_native", "awk_tracked_vs_native"}
