"""``dirtyring bench failover --quick`` end to end on /dev/kvm (real processes, kill -9): the
JSON is complete and every kill was followed by a resume on the standby. It checks the order of
events each kill measured, never how fast anything was."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from dirtyring.bench.records import find, read_json
from dirtyring.cli.main import build_parser

METRICS = ("kill_to_resume_ms", "detect_to_resume_ms", "kill_to_detect_ms", "restore_ms")


def test_bench_failover_quick_records_a_resume_after_every_kill(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["bench", "failover", "--quick", "--memory", "16M",
                                      "--out", str(tmp_path)])
    rc = args.func(args)
    out = capsys.readouterr()
    assert rc == 0, out.err[-2000:]
    assert "error" not in out.err
    doc, recs = read_json(tmp_path / "failover.json")
    assert doc["bench"] == "failover"
    kills = doc["settings"]["kills"]
    assert kills == 2 and doc["settings"]["guest"] == "dirtier"
    rows = doc["per_kill"]
    assert len(rows) == kills  # each kill ended in a measured resume (else the bench fails)
    assert out.out.count("resumed") == kills
    for r in rows:
        assert set(r) == set(METRICS), r
        assert all(isinstance(v, float) and math.isfinite(v) for v in r.values()), r
        # The order of what happened, from the standby's own events and clocks:
        # kill < loss detected < guest resumed; restoring the state is part of the resume.
        assert 0 < r["kill_to_detect_ms"] < r["kill_to_resume_ms"], r
        assert 0 < r["restore_ms"] <= r["detect_to_resume_ms"], r
    for metric in METRICS:
        vals = [r[metric] for r in rows]
        got = {}
        for stat in ("min", "p50", "max"):
            rec = find(recs, metric, stat, guest="dirtier", kills=kills)
            assert rec is not None, (metric, stat)
            assert rec.unit == "ms"
            got[stat] = rec.value
        # The summary is of these kills, not of anything else.
        assert got["min"] == pytest.approx(min(vals)) and got["max"] == pytest.approx(max(vals))
        assert got["min"] <= got["p50"] <= got["max"], (metric, got)
    assert len(recs) == 3 * len(METRICS)
