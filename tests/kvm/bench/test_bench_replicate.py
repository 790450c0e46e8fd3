"""`dirtyring bench replicate --quick` end to end on /dev/kvm (a real standby process per cell):
every cell measured against its ceiling, the share of the hot set's checkpoints the native
steady batch took recorded, the goal line printed. Behaviour only, never timing: how large
that share is depends on the host (a slow write fault keeps a big set from settling between
re-arms), so it is the benchmark's figure; tests/kvm/replication/test_steady_pause.py checks
what the batch does."""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest

from dirtyring.bench import replicate
from dirtyring.bench.records import find, read_json

HAVE_MPL = importlib.util.find_spec("matplotlib") is not None


@pytest.mark.slow
def test_replicate_quick_writes_a_complete_result(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    p = argparse.ArgumentParser()
    replicate.add_parser(p.add_subparsers(dest="bench", required=True))
    args = p.parse_args(["replicate", "--quick", "--seconds", "0.6", "--out", str(tmp_path)])
    assert args.func(args) == 0
    out = capsys.readouterr()
    assert "error" not in out.err
    doc, recs = read_json(tmp_path / "replicate.json")
    assert doc["bench"] == "replicate" and doc["settings"]["quick"] is True
    for n in replicate.QUICK_WORKING_SETS:
        for iv in replicate.QUICK_INTERVALS_US:
            base = find(recs, "unprotected_progress", "value", interval_us=iv, pages=n)
            assert base is not None and base.value > 0  # measured next to its cells
            ceiling = find(recs, "ceiling_stops", "value", interval_us=iv, pages=n)
            assert ceiling is not None and ceiling.value > 0
            for tr in replicate.TRACKERS:
                where: dict[str, str | int] = dict(interval_us=iv, pages=n, tracker=tr)
                committed = find(recs, "committed", "value", **where)
                progress = find(recs, "progress_fraction", "value", **where)
                assert committed is not None and committed.value > 0, where
                assert progress is not None and progress.value > 0, where
                for stat in ("p50", "p99"):
                    pause = find(recs, "pause_us", stat, **where)
                    assert pause is not None and pause.value > 0, (where, stat)
            # The steady batch is the hot set's alone: its share is recorded for that cell.
            steady = [r for r in recs if r.metric == "steady_fraction"
                      and r.dims.get("interval_us") == iv and r.dims.get("pages") == n]
            assert [r.dims["tracker"] for r in steady] == ["hotset"], steady
            assert 0 <= steady[0].value <= 1, steady
    assert "goal: 4,000 committed/s" in out.out
    assert (tmp_path / "replicate.png").exists() == HAVE_MPL
