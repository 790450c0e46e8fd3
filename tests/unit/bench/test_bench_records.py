"""Bench plumbing without /dev/kvm: records, parameters, matrices, goals, CLI, plots."""
from __future__ import annotations

import argparse
import builtins
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dirtyring.bench import exits, harvest, register
from dirtyring.bench.records import Record, find, read_json, summary_stats, write_json
from dirtyring.errors import DirtyringError
from dirtyring.machine import layout

GiB = 1 << 30


# --- records ----------------------------------------------------------------------------------
def test_record_make_sorts_dimensions_and_round_trips_through_json() -> None:
    r = Record.make("harvest", "harvest_time", 12, "us", stat="p50", tracker="ring", a=1)
    assert r.dimensions == (("a", 1), ("tracker", "ring"))
    assert r.value == 12.0 and isinstance(r.value, float)
    d = json.loads(json.dumps(r.to_json()))
    assert Record.from_json(d) == r
    assert r.matches(tracker="ring") and not r.matches(tracker="bitmap")


@pytest.mark.parametrize("kw", [dict(bench="", metric="m", stat="p50", value=1.0, unit="us"),
                                dict(bench="b", metric="m", stat="p50", value="1", unit="us"),
                                dict(bench="b", metric="m", stat="p50", value=True, unit="us"),
                                dict(bench="b", metric="m", stat="p50", value=1.0, unit="us",
                                     dimensions=(("z", 1), ("a", 2)))])
def test_record_rejects_malformed_fields(kw: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Record(**kw)


def test_record_is_frozen() -> None:
    r = Record.make("b", "m", 1.0, "us")
    with pytest.raises(AttributeError):
        r.value = 2.0  # type: ignore[misc]


def test_summary_stats() -> None:
    s = summary_stats(list(range(1, 101)), ("p50", "p90", "p99", "mean", "min", "max"))
    assert s["p50"] == pytest.approx(50.5)
    assert s["p90"] == pytest.approx(90.1)
    assert s["min"] == 1 and s["max"] == 100 and s["mean"] == pytest.approx(50.5)
    with pytest.raises(ValueError):
        summary_stats([])
    with pytest.raises(ValueError):
        summary_stats([1.0], ("median",))


def test_write_and_read_json(tmp_path: Path) -> None:
    recs = [Record.make("x", "m", 1.5, "us", stat="p50", k=1)]
    p = write_json(tmp_path / "sub" / "x.json", "x", recs, settings={"quick": True},
                   extra={"notes": ["n"]})
    doc, back = read_json(p)
    assert back == recs
    assert doc["bench"] == "x" and doc["settings"] == {"quick": True} and doc["notes"] == ["n"]
    assert doc["format"] == 1 and "kernel" in doc["host"]
    assert not list(tmp_path.glob("sub/*.tmp"))


# --- harvest parameters -------------------------------------------------------------------------
def test_harvest_params_id_stride_and_expected_pages() -> None:
    c = harvest.HarvestParams(tracker="ring", slot_gib=4, dirty_pages=256, layout="contiguous")
    s = harvest.HarvestParams(tracker="bitmap", slot_gib=4, dirty_pages=256, layout="scattered")
    assert c.id == "ring-4GiB-256p-contiguous"
    assert c.stride == 1 and s.stride == 4 * GiB // 4096 // 256
    for p in (c, s):
        e = p.expected_pages()
        assert len(np.unique(e)) == 256 and e.min() >= 0 and e.max() < p.slot_pages
    assert s.expected_pages().max() >= s.slot_pages * 255 // 256
    cfg = s.machine_config()
    assert cfg.data_slots == (4 * GiB,) and cfg.tracker == "bitmap"
    assert cfg.params.hot_pages == 256 and cfg.params.exit_every == 256
    assert cfg.params.stride == s.stride and cfg.ring_entries >= 4096 + 64


def test_harvest_params_cap_the_slot_at_what_the_layout_maps() -> None:
    p = harvest.HarvestParams(tracker="ring", slot_gib=256, dirty_pages=16, layout="scattered")
    assert p.slot_bytes == min(256 * GiB, layout.MAX_DATA_BYTES)
    assert p.clamped == (256 * GiB > layout.MAX_DATA_BYTES)
    assert p.dims()["requested_gib"] == 256
    assert p.dims()["slot_gib"] == pytest.approx(p.slot_bytes / GiB)


@pytest.mark.parametrize("kw", [dict(tracker="hotset"), dict(layout="random"),
                                dict(dirty_pages=0), dict(slot_gib=0),
                                dict(dirty_pages=16384)])
def test_harvest_params_reject_bad_cells(kw: dict[str, Any]) -> None:
    base: dict[str, Any] = dict(tracker="ring", slot_gib=1, dirty_pages=16, layout="contiguous")
    base.update(kw)
    with pytest.raises(ValueError):
        harvest.HarvestParams(**base)


def test_matrices() -> None:
    full = harvest.FULL.cells()
    assert len(full) == 3 * 5 * 3 * 2 and len({c.id for c in full}) == len(full)
    assert {c.slot_gib for c in full} == {1, 4, 16, 64, 256}
    assert {c.dirty_pages for c in full} == {16, 256, 4096}
    quick = harvest.QUICK.cells()
    assert {c.slot_gib for c in quick} == {1, 4} and {c.dirty_pages for c in quick} == {16, 256}
    assert len(quick) == 24
    # The three trackers of a cell run back to back (A/B under the same host load).
    assert [c.tracker for c in quick[:3]] == ["ring", "bitmap", "bitmap-clear"]
    assert harvest.FULL.id != harvest.QUICK.id


def test_split_iterations_and_merge() -> None:
    assert harvest.split_iterations(150, 3) == [50, 50, 50]
    assert harvest.split_iterations(10, 3) == [4, 3, 3]
    assert harvest.split_iterations(2, 3) == [1, 1]
    assert harvest.split_iterations(5, 1) == [5]
    p = harvest.HarvestParams(tracker="ring", slot_gib=1, dirty_pages=16, layout="contiguous")
    a = harvest.CellResult(params=p, samples_ns=(1, 2), reported=(17, 17), missed=0)
    b = harvest.CellResult(params=p, samples_ns=(3,), reported=(18,), missed=2)
    m = harvest.merge([a, b])
    assert m.samples_ns == (1, 2, 3) and m.reported == (17, 17, 18) and m.missed == 2
    recs = harvest.cell_records(m, 3, 2)
    t = find(recs, "harvest_time", "p50")
    assert t is not None and t.value == pytest.approx(0.002) and t.dims["rounds"] == 2
    assert find(recs, "pages_missed", "value").value == 2  # type: ignore[union-attr]
    assert find(recs, "pages_reported", "min").value == 17  # type: ignore[union-attr]


def _cell(tracker: str, gib: int, pages: int, lay: str, p50: float) -> list[Record]:
    p = harvest.HarvestParams(tracker=tracker, slot_gib=gib, dirty_pages=pages, layout=lay)
    return [Record.make("harvest", "harvest_time", p50 * f, "us", stat=s, iterations=3,
                        **p.dims()) for s, f in (("p50", 1.0), ("p90", 1.2))] + \
        [Record.make("harvest", "pages_reported", pages + 1, "pages", stat="min", **p.dims()),
         Record.make("harvest", "pages_missed", 0, "pages", **p.dims())]


def _synthetic(ring: dict[int, float], bitmap: dict[int, float]) -> list[Record]:
    recs: list[Record] = []
    for lay in harvest.LAYOUTS:
        for gib in ring:
            recs += _cell("ring", gib, 16, lay, ring[gib])
            recs += _cell("bitmap", gib, 16, lay, bitmap[gib])
            recs += _cell("bitmap-clear", gib, 16, lay, bitmap[gib] * 1.1)
    return recs


def test_goals_met() -> None:
    recs = _synthetic({1: 10.0, 16: 12.0, 64: 11.0}, {1: 20.0, 16: 200.0, 64: 2000.0})
    gs = harvest.goals(recs)
    assert {(g.name, g.layout) for g in gs} == {(n, lay) for n in ("ring_flat", "ring_vs_bitmap")
                                                for lay in harvest.LAYOUTS}
    assert all(g.met for g in gs)
    flat = next(g for g in gs if g.name == "ring_flat")
    assert flat.value == pytest.approx(1.2)
    ratio = next(g for g in gs if g.name == "ring_vs_bitmap")
    assert ratio.value == pytest.approx(2000.0 / 11.0)


def test_goals_not_met() -> None:
    recs = _synthetic({1: 10.0, 64: 16.0}, {1: 20.0, 64: 900.0})
    gs = harvest.goals(recs)
    assert not any(g.met for g in gs)
    summary = harvest.format_summary(recs)
    assert summary.count("NOT MET") == 4


def test_ratio_records_and_table() -> None:
    recs = _synthetic({1: 10.0, 4: 10.0}, {1: 30.0, 4: 60.0})
    ratios = harvest.ratio_records(recs)
    r = find(ratios, "bitmap_over_ring", "p50", requested_gib=4, layout="scattered")
    assert r is not None and r.value == pytest.approx(6.0) and r.unit == "x"
    assert find(ratios, "bitmap-clear_over_ring", "p90", requested_gib=1) is not None
    table = harvest.format_table(recs)
    assert len(table.splitlines()) == 2 + 2 * 2
    assert "6.00x" in table
    assert harvest.incomplete(recs) == []
    bad = recs + [Record.make("harvest", "pages_missed", 3, "pages", tracker="ring",
                              requested_gib=1, dirty_pages=16, layout="scattered")]
    assert harvest.incomplete(bad) == ["ring-1GiB-16p-scattered: 3 pages missed"]


def test_exits_params() -> None:
    assert exits.QUICK.pause_vcpus == (1, 2) and exits.FULL.pause_vcpus == (1, 2)
    assert [p.id for p in exits.FULL.pause_params()] == ["pause-resume-1vcpu",
                                                         "pause-resume-2vcpu"]
    rt = exits.FULL.roundtrip.machine_config()
    assert rt.tracker == "none" and rt.params.exit_every == 1
    pp = exits.FULL.pause_params()[1].machine_config()
    assert pp.vcpus == 2 and pp.params.exit_every == 0 and pp.tracker == "none"
    assert exits.QUICK.id != exits.FULL.id


# --- command line -----------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    register(p.add_subparsers(dest="bench", required=True))
    return p


def test_register_adds_both_subcommands_with_common_options() -> None:
    p = _parser()
    a = p.parse_args(["harvest"])
    assert a.out == Path("results") and not a.quick and a.iterations is None
    assert a.func.__name__ == "harvest_command"
    b = p.parse_args(["exits", "--quick", "--out", "/x", "--iterations", "7", "--jsonl"])
    assert b.quick and b.out == Path("/x") and b.iterations == 7 and b.jsonl
    assert b.func.__name__ == "exits_command"
    with pytest.raises(SystemExit):
        p.parse_args(["harvest", "--iterations", "0"])


def test_handler_turns_dirtyring_error_into_one_line(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        tmp_path: Path) -> None:
    def boom(*a: object, **k: object) -> list[Record]:
        raise DirtyringError("no /dev/kvm here")

    monkeypatch.setattr(harvest, "run", boom)
    monkeypatch.setattr(exits, "run", boom)
    for name in ("harvest", "exits"):
        args = _parser().parse_args([name, "--quick", "--out", str(tmp_path)])
        assert args.func(args) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1] == f"dirtyring bench {name}: error: no /dev/kvm here"
    assert not list(tmp_path.iterdir())


def _fake_harvest_run(*a: object, **k: object) -> list[Record]:
    recs = _synthetic({1: 10.0, 4: 11.0}, {1: 20.0, 4: 40.0})
    recs += harvest.ratio_records(recs)
    return recs + harvest.goal_records(harvest.goals(recs))


def test_harvest_command_without_matplotlib_still_writes_json(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        tmp_path: Path) -> None:
    real_import = builtins.__import__

    def no_matplotlib(name: str, *a: Any, **k: Any) -> Any:
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("no matplotlib")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    monkeypatch.setattr(harvest, "run", _fake_harvest_run)
    args = _parser().parse_args(["harvest", "--quick", "--out", str(tmp_path)])
    assert args.func(args) == 0
    out = capsys.readouterr()
    assert out.err.count("matplotlib is not installed") == 1
    doc, recs = read_json(tmp_path / "harvest.json")
    assert recs and doc["settings"]["quick"] is True
    assert len(doc["goals"]) == 4
    assert not (tmp_path / "harvest.png").exists()
    assert "GiB pages layout" in out.out


def test_harvest_command_reports_missed_pages_as_failure(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        tmp_path: Path) -> None:
    def run(*a: object, **k: object) -> list[Record]:
        return _fake_harvest_run() + [Record.make(
            "harvest", "pages_missed", 2, "pages", tracker="ring", requested_gib=1,
            dirty_pages=16, layout="contiguous")]

    monkeypatch.setattr(harvest, "run", run)
    args = _parser().parse_args(["harvest", "--out", str(tmp_path), "--jsonl"])
    assert args.func(args) == 1
    out = capsys.readouterr()
    assert "missed dirty pages" in out.err.strip().splitlines()[-1]
    assert (tmp_path / "harvest.json").exists()
    first = json.loads(out.out.splitlines()[0])
    assert set(first) == {"bench", "metric", "stat", "value", "unit", "dimensions"}


def test_plots_write_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from dirtyring.bench.plot import plot_exits, plot_harvest

    assert plot_harvest(_fake_harvest_run(), tmp_path / "h.png") == tmp_path / "h.png"
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    recs = [Record.make("exits", "round_trip", 30.0, "us", stat="p50", vcpus=1),
            Record.make("exits", "exit_rate", 33000.0, "exits/s", stat="p50", vcpus=1),
            Record.make("exits", "python_exit_dispatch", 1.0, "us", stat="p50", vcpus=1)]
    for v in (1, 2):
        for m in ("pause_all", "resume_all"):
            recs += [Record.make("exits", m, 10.0 * v, "us", stat=s, vcpus=v)
                     for s in ("p50", "p90", "p99")]
    assert plot_exits(recs, tmp_path / "e.png") == tmp_path / "e.png"
    assert plot_harvest([], tmp_path / "none.png") is None
