"""One statistics record for every epoch-driven job (tracking runs, replication, snapshots,
migration): counts, rates and pause-time percentiles over a sliding window.

The window also feeds cumulative histograms (``WindowHistogram``) for the Prometheus metrics
(``replication/metrics.py``): per-epoch values are only appended to the window, as they always
were, and the window's newest values are counted into bucket totals in batches, every half
window and whenever the statistics are summarised (``snapshot``), by the thread that appends
them. The epoch loop pays one integer comparison per epoch, and a numpy pass of ~2,000 values
(tens of µs) every ~2,000 epochs, after the guest was resumed.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from itertools import islice

import numpy as np


@dataclass(frozen=True, slots=True)
class HistogramValue:
    """Cumulative histogram at one moment: ``counts[i]`` values were <= ``bounds[i]`` (the
    last entry, past the bounds, is +Inf: every value), their ``total`` and how many."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    total: float
    n: int


def newest(window: deque[float] | deque[int], k: int | None = None) -> np.ndarray:
    """The ``k`` newest values of ``window`` (all of them by default), newest first, as floats,
    while other threads may append to it: a copy that met an append ("deque mutated during
    iteration", seen on a degraded primary whose ack reader released output during a fold) is
    simply taken again; appends are rare and short, so a retry finds the window still."""
    while True:
        n = len(window) if k is None else min(k, len(window))
        try:
            return np.fromiter(islice(reversed(window), n), float, n)
        except RuntimeError:
            continue


class WindowHistogram:
    """Cumulative bucket counts of every value appended to a bounded window (a ``deque``),
    taken from its newest values in batches (``fold``), so that appending stays the only cost
    per value.

    ``appended()`` returns how many values were ever appended to the window. ``fold`` counts
    the ones appended since the previous fold; call it before the window could have dropped
    them (``due`` says when half of it is new). If more were appended than the window holds,
    the window's newest values stand for the lost ones (scaled): the count stays exact.
    Values are in the window's unit; ``scale`` converts them for ``total`` and ``bounds`` are in
    the converted unit (e.g. a window of µs, bounds in seconds, scale 1e-6).

    Thread safety: fold takes a lock; the published value is replaced whole (readers on
    other threads see one consistent value). When other threads append while a fold runs,
    a value or two may be counted in a neighbouring fold's buckets; counts stay exact."""

    def __init__(self, window: deque[float] | deque[int], appended: Callable[[], int],
                 bounds: Sequence[float], *, scale: float = 1.0) -> None:
        self.window = window
        self.appended = appended
        self.bounds = tuple(float(b) for b in bounds)
        self._edges = np.asarray(self.bounds) / scale  # in the window's unit
        self.scale = scale
        self._counts = np.zeros(len(self.bounds) + 1, np.int64)
        self._total = 0.0
        self.seen = appended()  # values appended before this histogram existed are not in it
        self._first = self.seen
        self.every = max(1, (window.maxlen or 2) // 2)
        self.next = self.seen + self.every
        self._lock = threading.Lock()
        self.value = HistogramValue(self.bounds, (0,) * (len(self.bounds) + 1), 0.0, 0)

    def fold(self) -> None:
        with self._lock:
            total = self.appended()
            new = total - self.seen
            if new <= 0:
                return
            k = min(new, len(self.window))
            tail = newest(self.window, k)
            per = np.bincount(np.searchsorted(self._edges, tail, "left"),
                              minlength=len(self._counts))
            s = float(tail.sum()) * self.scale
            if k < new:  # lost from the window before a fold: the newest stand for them
                f = new / max(k, 1)
                scaled = (per * f).astype(np.int64)
                scaled[int(np.argmax(per))] += new - int(scaled.sum())
                per, s = scaled, s * f
            self._counts += per
            self._total += s
            self.seen = total
            self.next = total + self.every
            self.value = HistogramValue(self.bounds,
                                        tuple(int(c) for c in np.cumsum(self._counts)),
                                        self._total, total - self._first)

    def maybe_fold(self) -> None:
        """Fold if half the window is new (call after appending)."""
        if self.appended() >= self.next:
            self.fold()


#: Histogram bounds (Prometheus ``le``) of an epoch's pause, in seconds, and of its dirty pages.
PAUSE_BUCKETS_S = (10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3,
                   25e-3, 50e-3, 100e-3, 250e-3, 1.0)
DIRTY_PAGES_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144)


@dataclass(frozen=True, slots=True, kw_only=True)
class StatsSnapshot:
    elapsed_s: float
    epochs: int
    epochs_per_s: float
    dirty_pages_per_epoch: float
    pause_us_p50: float
    pause_us_p99: float
    pause_us_max: float
    harvest_us_p50: float
    bytes_total: int
    mb_per_s: float
    guest_progress_per_s: float
    resyncs: int
    budget_epochs: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


class EpochStats:
    """Accumulates per-epoch figures; ``snapshot()`` summarises the recent window.

    ``histograms``: also keep cumulative histograms of the pause and of the dirty pages of
    every epoch (``pause_hist``, ``dirty_hist``: see ``WindowHistogram``), folded from the
    window by the thread that records, every half window and at each ``snapshot``."""

    def __init__(self, window: int = 4096, *, histograms: bool = False) -> None:
        self.t0 = time.monotonic()
        self.epochs = 0
        self.resyncs = 0
        self.budget_epochs = 0
        self.bytes_total = 0
        self._pause: deque[float] = deque(maxlen=window)
        self._harvest: deque[float] = deque(maxlen=window)
        self._dirty: deque[int] = deque(maxlen=window)
        self._marks: deque[tuple[float, int, int, int]] = deque(maxlen=64)
        self._progress = 0
        self.pause_hist: WindowHistogram | None = None
        self.dirty_hist: WindowHistogram | None = None
        self._fold_at = 1 << 62  # (never, without histograms)
        #: (pause, dirty pages) as of the last fold, replaced whole: a reader on another
        #: thread sees both histograms of the same epochs.
        self.histograms: tuple[HistogramValue, HistogramValue] | None = None
        if histograms:
            self.pause_hist = WindowHistogram(self._pause, self._count, PAUSE_BUCKETS_S,
                                              scale=1e-6)
            self.dirty_hist = WindowHistogram(self._dirty, self._count, DIRTY_PAGES_BUCKETS)
            self._fold_at = self.pause_hist.next

    def _count(self) -> int:
        return self.epochs

    def fold(self) -> None:
        """Count the window's new values into the histograms (the recording thread only)."""
        if self.pause_hist is not None and self.dirty_hist is not None:
            self.pause_hist.fold()
            self.dirty_hist.fold()
            self.histograms = (self.pause_hist.value, self.dirty_hist.value)
            self._fold_at = self.pause_hist.next

    def record(self, *, pause_s: float, harvest_s: float, dirty_pages: int, nbytes: int = 0,
               resync: bool = False, budget: bool = False) -> None:
        self.epochs += 1
        self._pause.append(pause_s * 1e6)
        self._harvest.append(harvest_s * 1e6)
        self._dirty.append(dirty_pages)
        self.bytes_total += nbytes
        self.resyncs += int(resync)
        self.budget_epochs += int(budget)
        if self.epochs >= self._fold_at:
            self.fold()

    def record_many(self, *, pause_s: list[float], dirty_pages: int, nbytes: int) -> None:
        """``record`` for a batch of like epochs (no harvest, resync or full ring): at once,
        as the steady batch's bookkeeping runs when every call is slow."""
        n = len(pause_s)
        self.epochs += n
        self._pause.extend([p * 1e6 for p in pause_s])
        self._harvest.extend([0.0] * n)
        self._dirty.extend([dirty_pages] * n)
        self.bytes_total += nbytes * n
        if self.epochs >= self._fold_at:
            self.fold()

    def progress(self, value: int) -> None:
        """The guest's own progress counter (writes, steps, requests), read without pausing."""
        self._progress = value
        self._marks.append((time.monotonic(), self.epochs, self.bytes_total, value))

    def snapshot(self) -> StatsSnapshot:
        self.fold()
        now = time.monotonic()
        marks = list(self._marks)
        if len(marks) >= 2:
            (ta, ea, ba, pa), (tb, eb, bb, pb) = marks[max(0, len(marks) - 6)], marks[-1]
            dt = max(tb - ta, 1e-9)
            eps, mbps, gps = (eb - ea) / dt, (bb - ba) / dt / 1e6, (pb - pa) / dt
        else:
            dt = max(now - self.t0, 1e-9)
            eps, mbps, gps = self.epochs / dt, self.bytes_total / dt / 1e6, 0.0
        # (The epoch loop takes this several times a second, in its own time: fromiter, one
        # percentile call and a plain sum cost half of asarray, two percentiles and np.mean.)
        p = np.fromiter(self._pause, float, len(self._pause)) if self._pause else np.zeros(1)
        h = np.fromiter(self._harvest, float, len(self._harvest)) if self._harvest \
            else np.zeros(1)
        p50, p99 = (float(x) for x in np.percentile(p, [50, 99]))
        return StatsSnapshot(
            elapsed_s=now - self.t0, epochs=self.epochs, epochs_per_s=eps,
            dirty_pages_per_epoch=sum(self._dirty) / len(self._dirty) if self._dirty else 0.0,
            pause_us_p50=p50, pause_us_p99=p99,
            pause_us_max=float(p.max()), harvest_us_p50=float(np.percentile(h, 50)),
            bytes_total=self.bytes_total, mb_per_s=mbps, guest_progress_per_s=gps,
            resyncs=self.resyncs, budget_epochs=self.budget_epochs)
