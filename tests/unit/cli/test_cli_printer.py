"""The one event sink of the long-running commands: JSON lines, or text with a live status."""
from __future__ import annotations

import json
from typing import Any

import pytest

from dirtyring.cli.printer import EVENT_SCHEMA_VERSION, EventPrinter


def _stats_only(p: EventPrinter, e: dict[str, Any]) -> bool:
    if e["event"] == "stats":
        p.status(f"epoch {e['epoch']}")
        return True
    return False


def test_json_mode_prints_every_event_whole(capsys: pytest.CaptureFixture[str]) -> None:
    p = EventPrinter(True, True, _stats_only)
    p({"event": "stats", "epoch": 3})
    p({"event": "degraded", "reason": "x", "t": 1.0})
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(x) for x in lines] == [{"v": 1, "event": "stats", "epoch": 3},
                                              {"v": 1, "event": "degraded", "reason": "x",
                                               "t": 1.0}]


def test_every_json_line_starts_with_the_schema_version(
        capsys: pytest.CaptureFixture[str]) -> None:
    """``"v"`` is the first key of every line: a reader can check it before anything else."""
    p = EventPrinter(True, False)
    p({"event": "protected", "epoch": 7, "t": 2.0})
    p({"event": "report", "rounds": []})
    for line in capsys.readouterr().out.splitlines():
        assert line.startswith('{"v": 1, "event": ')
        assert json.loads(line)["v"] == EVENT_SCHEMA_VERSION == 1


def test_live_status_is_rewritten_and_ended_before_the_next_line(
        capsys: pytest.CaptureFixture[str]) -> None:
    p = EventPrinter(False, True, _stats_only)
    p({"event": "stats", "epoch": 1})
    p({"event": "stats", "epoch": 2})
    p({"event": "degraded", "reason": "lost", "t": 5.0})
    p.line("done")
    assert capsys.readouterr().out == "\repoch 1\repoch 2\ndegraded: reason=lost\ndone\n"


def test_without_live_view_statuses_are_plain_lines(capsys: pytest.CaptureFixture[str]) -> None:
    p = EventPrinter(False, False, _stats_only, hide=("event", "t", "rounds"))
    p({"event": "stats", "epoch": 1})
    p({"event": "report", "rounds": [1, 2], "total_s": 1.5})
    assert capsys.readouterr().out == "epoch 1\nreport: total_s=1.5\n"
