"""The cumulative histograms the metrics read: folded in batches from the statistics' windows,
every value counted once, in the right bucket, whatever the batch sizes."""
from __future__ import annotations

from collections import deque

import numpy as np

from dirtyring.machine.stats import (DIRTY_PAGES_BUCKETS, PAUSE_BUCKETS_S, EpochStats,
                                     WindowHistogram)


def expected(values: list[float], bounds: tuple[float, ...]) -> tuple[int, ...]:
    return tuple(sum(1 for v in values if v <= b) for b in bounds) + (len(values),)


def test_every_value_is_counted_once_in_cumulative_buckets() -> None:
    window: deque[float] = deque(maxlen=16)
    n = [0]
    bounds = (1.0, 2.0, 5.0)
    h = WindowHistogram(window, lambda: n[0], bounds)
    values = [0.5, 1.0, 1.5, 2.0, 3.0, 7.0, 0.1, 5.0, 5.5, 2.5]
    for i, v in enumerate(values):
        window.append(v)
        n[0] += 1
        if i % 3 == 2:
            h.fold()
    h.fold()
    h.fold()  # nothing new: nothing changes
    assert h.value.counts == expected(values, bounds)
    assert h.value.n == len(values)
    assert abs(h.value.total - sum(values)) < 1e-9
    assert h.value.bounds == bounds


def test_le_is_inclusive_and_scale_converts_units() -> None:
    window: deque[float] = deque(maxlen=64)
    n = [0]
    h = WindowHistogram(window, lambda: n[0], (100e-6, 1e-3), scale=1e-6)  # window in µs
    for v in (100.0, 100.5, 1000.0, 2000.0):
        window.append(v)
        n[0] += 1
    h.fold()
    assert h.value.counts == (1, 3, 4)
    assert abs(h.value.total - 3200.5e-6) < 1e-12


def test_values_lost_from_the_window_keep_the_count_exact() -> None:
    window: deque[float] = deque(maxlen=8)
    n = [0]
    h = WindowHistogram(window, lambda: n[0], (1.0, 10.0))
    for _ in range(20):  # more than the window holds before any fold
        window.append(3.0)
        n[0] += 1
    h.fold()
    assert h.value.n == 20 and h.value.counts == (0, 20, 20)
    assert abs(h.value.total - 60.0) < 1e-9


def test_values_before_the_histogram_are_not_in_it() -> None:
    window: deque[float] = deque([9.0, 9.0], maxlen=8)
    n = [2]
    h = WindowHistogram(window, lambda: n[0], (1.0,))
    window.append(0.5)
    n[0] += 1
    h.fold()
    assert h.value.counts == (1, 1) and h.value.n == 1


def test_epoch_stats_fold_every_half_window_and_at_each_snapshot() -> None:
    st = EpochStats(window=64, histograms=True)
    assert st.pause_hist is not None and st.dirty_hist is not None
    pauses, dirty = [], []
    for i in range(100):  # record: folded at 32, 64, 96 by itself
        p = (i % 7 + 1) * 30e-6
        st.record(pause_s=p, harvest_s=0.0, dirty_pages=i % 70)
        pauses.append(p)
        dirty.append(i % 70)
    assert st.pause_hist.value.n == 96
    batch = [40e-6, 2e-3, 0.3]
    st.record_many(pause_s=batch, dirty_pages=5, nbytes=4096)
    pauses += batch
    dirty += [5] * 3
    st.snapshot()
    assert st.pause_hist.value.n == st.epochs == 103
    assert st.pause_hist.value.counts == expected(pauses, PAUSE_BUCKETS_S)
    assert abs(st.pause_hist.value.total - sum(pauses)) < 1e-9
    assert st.dirty_hist.value.counts == expected([float(d) for d in dirty],
                                                  tuple(float(b) for b in DIRTY_PAGES_BUCKETS))
    assert st.dirty_hist.value.total == sum(dirty)
    assert st.histograms == (st.pause_hist.value, st.dirty_hist.value)  # published together


def test_without_histograms_nothing_is_kept() -> None:
    st = EpochStats()
    for _ in range(10_000):
        st.record(pause_s=1e-4, harvest_s=0.0, dirty_pages=1)
    st.snapshot()
    assert st.pause_hist is None and st.dirty_hist is None


def test_fold_matches_numpy_on_random_values() -> None:
    rng = np.random.default_rng(7)
    window: deque[float] = deque(maxlen=4096)
    n = [0]
    bounds = PAUSE_BUCKETS_S
    h = WindowHistogram(window, lambda: n[0], bounds)
    values = rng.lognormal(-8, 2, 10_000)
    for i, v in enumerate(values):
        window.append(float(v))
        n[0] += 1
        if n[0] >= h.next:
            h.fold()
    h.fold()
    want = [int((values <= b).sum()) for b in bounds] + [len(values)]
    assert list(h.value.counts) == want
