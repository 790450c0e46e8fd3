"""Both benches in quick mode, end to end on /dev/kvm: the files are complete and sane.
These tests check behaviour (every cell measured, the trackers found every page), never timing."""
from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from dirtyring.bench import exits, harvest, register
from dirtyring.bench.records import find, read_json

HAVE_MPL = importlib.util.find_spec("matplotlib") is not None


def _run(bench: str, out: Path, *extra: str) -> int:
    p = argparse.ArgumentParser()
    register(p.add_subparsers(dest="bench", required=True))
    args = p.parse_args([bench, "--quick", "--out", str(out), *extra])
    return int(args.func(args))


def _check_record_shape(doc: dict[str, object]) -> None:
    for r in doc["records"]:  # type: ignore[attr-defined]
        assert set(r) == {"bench", "metric", "stat", "value", "unit", "dimensions"}
        assert isinstance(r["value"], float) and r["unit"]


def test_harvest_quick_writes_a_complete_result(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert _run("harvest", tmp_path) == 0
    out = capsys.readouterr()
    assert "error" not in out.err
    path = tmp_path / "harvest.json"
    json.loads(path.read_text())  # well-formed
    doc, recs = read_json(path)
    _check_record_shape(doc)
    assert doc["bench"] == "harvest" and doc["settings"]["quick"] is True
    iterations = doc["settings"]["iterations"]
    for c in harvest.QUICK.cells():
        where: dict[str, Any] = dict(tracker=c.tracker, requested_gib=c.slot_gib,
                                     dirty_pages=c.dirty_pages, layout=c.layout)
        for stat in ("p50", "p90"):
            r = find(recs, "harvest_time", stat, **where)
            assert r is not None, (c.id, stat)
            assert r.value > 0 and r.unit == "us" and r.dims["iterations"] == iterations
        p50, p90 = (find(recs, "harvest_time", s, **where) for s in ("p50", "p90"))
        assert p50 is not None and p90 is not None and p90.value >= p50.value
        # Every harvest found every page the guest wrote (plus its own status page).
        missed = find(recs, "pages_missed", "value", **where)
        assert missed is not None and missed.value == 0, c.id
        reported = find(recs, "pages_reported", "min", **where)
        assert reported is not None and reported.value >= c.dirty_pages, c.id
        if c.tracker != "ring":
            ratio = find(recs, f"{c.tracker}_over_ring", "p50", requested_gib=c.slot_gib,
                         dirty_pages=c.dirty_pages, layout=c.layout)
            assert ratio is not None and ratio.value > 0
    assert {(g["name"], g["layout"]) for g in doc["goals"]} == {
        (n, lay) for n in ("ring_flat", "ring_vs_bitmap") for lay in harvest.LAYOUTS}
    assert all(isinstance(g["met"], bool) and g["value"] > 0 for g in doc["goals"])
    assert "goal" in out.out and "GiB pages layout" in out.out
    assert (tmp_path / "harvest.png").exists() == HAVE_MPL


def test_exits_quick_writes_a_complete_result(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert _run("exits", tmp_path, "--iterations", "30") == 0
    assert "error" not in capsys.readouterr().err
    doc, recs = read_json(tmp_path / "exits.json")
    _check_record_shape(doc)
    assert doc["settings"]["iterations"] == 30
    for metric, stat in (("exit_rate", "p50"), ("exit_rate", "p90"), ("round_trip", "p50"),
                         ("python_exit_dispatch", "p50")):
        r = find(recs, metric, stat, vcpus=1)
        assert r is not None and r.value > 0, (metric, stat)
    rate = find(recs, "exit_rate", "p50")
    assert rate is not None and rate.unit == "exits/s"
    for v in exits.QUICK.pause_vcpus:
        for metric in ("pause_all", "resume_all"):
            for stat in ("p50", "p90", "p99"):
                r = find(recs, metric, stat, vcpus=v)
                assert r is not None and r.value > 0 and r.unit == "us", (metric, stat, v)
                assert r.dims["iterations"] == 30
    assert (tmp_path / "exits.png").exists() == HAVE_MPL


def test_harvest_cell_reports_exactly_the_pages_written() -> None:
    """One cell, measured directly: every harvest holds the N pages (and only a few others)."""
    p = harvest.HarvestParams(tracker="ring", slot_gib=1, dirty_pages=64, layout="scattered")
    res = harvest.measure_cell(p, iterations=5, warmup=2)
    assert len(res.samples_ns) == 5 and all(s > 0 for s in res.samples_ns)
    assert res.missed == 0
    assert all(64 <= n <= 64 + 4 for n in res.reported), res.reported
