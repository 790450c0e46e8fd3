"""``dirtyring bench migrate --quick`` end to end: every cell migrates, the file is complete.
Behaviour only (all cells present, sane values, the guest ran on at the target), never timing."""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from dirtyring.bench import migrate
from dirtyring.bench.records import find, read_json

HAVE_MPL = importlib.util.find_spec("matplotlib") is not None


def test_bench_migrate_quick(tmp_path: Path) -> None:
    p = argparse.ArgumentParser()
    migrate.add_parser(p.add_subparsers(dest="bench", required=True))
    args = p.parse_args(["migrate", "--quick", "--out", str(tmp_path)])
    assert args.func(args) == 0
    doc, recs = read_json(tmp_path / "migrate.json")
    assert doc["bench"] == "migrate" and doc["settings"]["quick"] is True
    assert doc["qemu_7_2_reference"]["total_s"] == [1.4, 1.9]
    for cell in migrate.cells(quick=True):
        where = dict(tracker=cell.tracker, load=cell.load)
        total = find(recs, "total_s", "p50", **where)
        down = find(recs, "downtime_ms", "p50", **where)
        assert total is not None and down is not None, cell.id
        assert 0 < down.value < 1000 * total.value
        tgt = find(recs, "downtime_target_ms", "p50", **where)
        assert tgt is not None and 0 < tgt.value <= down.value + 1.0, cell.id
        kept = find(recs, "speed_kept", "p50", **where)
        if cell.load == "idle":
            assert kept is None
        else:
            assert kept is not None and kept.value > 0, cell.id
    if HAVE_MPL:
        assert (tmp_path / "migrate.png").stat().st_size > 0
