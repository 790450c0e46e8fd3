"""`dirtyring bench replicate` ends with a goal line computed from what it measured."""
from __future__ import annotations

from dirtyring.bench.records import Record
from dirtyring.bench.replicate import BENCH, verdict


def _cell(tracker: str, iv: int, rate: float, progress: float, pages: int = 64) -> list[Record]:
    d = dict(tracker=tracker, interval_us=iv, pages=pages)
    return [Record.make(BENCH, "committed", rate, "1/s", **d),
            Record.make(BENCH, "progress_fraction", progress, "ratio", **d)]


def test_goal_met_only_by_a_cell_that_is_fast_enough_and_keeps_half() -> None:
    recs = (_cell("ring", 100, 5000, 0.03) + _cell("hotset", 250, 4100, 0.52)
            + _cell("hotset", 100, 9000, 0.9, pages=16))  # another working set does not count
    line = verdict(recs)
    assert "met: best 4,100/s at 52% (hotset, 250 µs)" in line and "NOT" not in line, line
    assert "fastest 5,000/s at 3% (ring, 100 µs)" in line, line


def test_goal_not_met_names_the_best_that_kept_half() -> None:
    recs = _cell("ring", 100, 5000, 0.03) + _cell("hotset", 250, 2300, 0.48) + \
        _cell("hotset", 1000, 800, 0.78)
    line = verdict(recs)
    assert "NOT met: best 800/s at 78% (hotset, 1000 µs)" in line, line


def test_goal_not_met_when_no_cell_keeps_half() -> None:
    line = verdict(_cell("ring", 100, 5000, 0.03))
    assert "NOT met (no cell kept 50%; fastest 5,000/s at 3%" in line, line
    assert verdict([]).startswith("goal: no cell")
