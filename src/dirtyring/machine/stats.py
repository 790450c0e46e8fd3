"""One statistics record for every epoch-driven job (tracking runs, replication, snapshots,
migration): counts, rates and pause-time percentiles over a sliding window."""
from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict, dataclass

import numpy as np


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
    """Accumulates per-epoch figures; ``snapshot()`` summarises the recent window."""

    def __init__(self, window: int = 4096) -> None:
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

    def record(self, *, pause_s: float, harvest_s: float, dirty_pages: int, nbytes: int = 0,
               resync: bool = False, budget: bool = False) -> None:
        self.epochs += 1
        self._pause.append(pause_s * 1e6)
        self._harvest.append(harvest_s * 1e6)
        self._dirty.append(dirty_pages)
        self.bytes_total += nbytes
        self.resyncs += int(resync)
        self.budget_epochs += int(budget)

    def record_many(self, *, pause_s: list[float], dirty_pages: int, nbytes: int) -> None:
        """``record`` for a batch of like epochs (no harvest, resync or full ring): at once,
        as the steady batch's bookkeeping runs when every call is slow."""
        n = len(pause_s)
        self.epochs += n
        self._pause.extend([p * 1e6 for p in pause_s])
        self._harvest.extend([0.0] * n)
        self._dirty.extend([dirty_pages] * n)
        self.bytes_total += nbytes * n

    def progress(self, value: int) -> None:
        """The guest's own progress counter (writes, steps, requests), read without pausing."""
        self._progress = value
        self._marks.append((time.monotonic(), self.epochs, self.bytes_total, value))

    def snapshot(self) -> StatsSnapshot:
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
