"""``dirtyring bench rollback --quick`` end to end: every cell measured and checked, files sane.
Behaviour only, never timing."""
from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from dirtyring.bench import rollback
from dirtyring.bench.records import find, read_json

HAVE_MPL = importlib.util.find_spec("matplotlib") is not None


def test_quick_run_writes_every_cell(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = argparse.ArgumentParser()
    rollback.add_parser(p.add_subparsers(dest="bench", required=True))
    args = p.parse_args(["rollback", "--quick", "--iterations", "12", "--out", str(tmp_path)])
    assert args.func(args) == 0
    out = capsys.readouterr()
    assert "error" not in out.err and "goal: 10,000/s at 64 pages" in out.out
    assert "per CPU-second" in out.out
    doc, recs = read_json(tmp_path / "rollback.json")
    json.loads((tmp_path / "rollback.json").read_text())
    assert doc["bench"] == "rollback" and doc["settings"]["quick"] is True
    assert doc["goal"]["dirty_pages"] == 64 and isinstance(doc["goal"]["met"], bool)
    for mode in rollback.MODES:
        for n in rollback.DIRTY_PAGES:
            where: dict[str, Any] = dict(mode=mode, dirty_pages=n)
            rate = find(recs, "rollbacks_per_s", "value", **where)
            alone = find(recs, "rollback_only_per_s", "value", **where)
            cpu = find(recs, "rollbacks_per_cpu_s", "value", **where)
            assert rate is not None and alone is not None and 0 < rate.value <= alone.value
            assert cpu is not None and cpu.value > 0
            assert int(rate.dims["iterations"]) >= 1 and rate.dims["memory_mib"] == 64
            pages = find(recs, "pages_restored", "min", **where)
            assert pages is not None
            if mode == "full":
                assert pages.value > 64 * 256  # all of memory
            else:
                assert n <= pages.value < n + 64  # the written pages + status, stack, hot set
            checks = find(recs, "fingerprint_checks", "value", **where)
            assert checks is not None and checks.value >= 2
    assert (tmp_path / "rollback.png").exists() == HAVE_MPL


def test_params_validate() -> None:
    with pytest.raises(ValueError):
        rollback.RollbackParams(mode="nope", dirty_pages=16)
    with pytest.raises(ValueError):
        rollback.RollbackParams(mode="ring", dirty_pages=1 << 20)
    p = rollback.RollbackParams(mode="full", dirty_pages=64)
    assert p.id == "full-64p-64MiB" and p.machine_config().tracker == "none"
