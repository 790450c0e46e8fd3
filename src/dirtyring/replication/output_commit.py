"""Output commit: guest output leaves the primary only after the standby acknowledged the
checkpoint that contains it (Remus's network buffering).

Output emitted while the guest runs in epoch N is produced by state that checkpoint N captures
(the vCPUs are parked before the capture), so it is tagged N and released on Ack(N). If the
standby is lost and the primary may go on alone (``alone``), everything held is released at
once, and from then on output leaves as it is made, but only while the primary's right to act
alone holds (its etcd lease, ``arbiter.py``): outside it, output is held, never dropped.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from ..machine.stats import WindowHistogram, newest

#: Receives released output: (kind, payload, epoch it belongs to).
Release = Callable[[str, Any, int], None]


#: Histogram bounds (Prometheus ``le``) of how long output was held, seconds.
DELAY_BUCKETS_S = (100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3,
                   250e-3, 1.0, 5.0)


@dataclass(frozen=True, slots=True, kw_only=True)
class OutputStats:
    held: int
    released: int
    max_released_epoch: int
    delay_ms_p50: float
    delay_ms_max: float


class OutputGate:
    def __init__(self, release: Release, *, hold: bool = True,
                 delivered: Callable[[str], None] | None = None) -> None:
        """``delivered(kind)``: called after each piece is released (a Linux program's stdio
        device then forgets that chunk: ``StdioDevice.delivered``)."""
        self.release = release
        self.delivered = delivered
        self.hold = hold
        self.open_epoch = 1
        self.committed = 0
        self._pending: deque[tuple[int, str, Any, float]] = deque()
        self._lock = threading.Lock()
        self._deliver = threading.Lock()  # held while releasing: output leaves in order
        self.released = 0
        self.max_released_epoch = 0
        self._delays: deque[float] = deque(maxlen=4096)
        #: Every piece's delay (held until its checkpoint was acknowledged), as a cumulative
        #: histogram for the metrics, folded from ``_delays`` (see ``WindowHistogram``).
        self.delay_hist = WindowHistogram(self._delays, self._released, DELAY_BUCKETS_S,
                                          scale=1e-3)
        self.violations = 0  # released output of an epoch not yet committed (must stay 0)
        self.dropped = 0
        #: Alone (no standby): may output leave now? None: always (``unhold``).
        self.may_release: Callable[[], bool] | None = None

    def emit(self, kind: str, payload: Any) -> None:
        """Called on vCPU threads for every piece of output."""
        with self._lock:
            epoch = self.open_epoch
            if self.hold or self._pending or (self.may_release is not None
                                              and not self.may_release()):
                self._pending.append((epoch, kind, payload, time.monotonic()))
                return
        with self._deliver:  # after anything a flush on another thread is still releasing
            self._out(kind, payload, epoch, 0.0)

    @property
    def held(self) -> int:
        """Pieces of output held now."""
        return len(self._pending)

    @property
    def waiting(self) -> bool:
        """Is any output held for an acknowledgement?"""
        return bool(self._pending)

    def advance(self, next_epoch: int) -> None:
        """The guest is paused and checkpoint ``next_epoch - 1`` captured: new output is newer."""
        with self._lock:
            self.open_epoch = next_epoch

    def commit(self, epoch: int) -> None:
        """Ack(epoch) arrived: release everything of epochs <= epoch, in order (also when two
        threads commit at once: the epoch loop and the ack reader)."""
        with self._deliver:
            out = []
            with self._lock:
                self.committed = max(self.committed, epoch)
                while self._pending and self._pending[0][0] <= epoch:
                    out.append(self._pending.popleft())
            now = time.monotonic()
            for e, kind, payload, t in out:
                self._out(kind, payload, e, now - t)

    def unhold(self, may_release: Callable[[], bool] | None = None) -> None:
        """The standby is gone and the primary may go on alone: release everything, hold no
        more, or only while ``may_release()`` says so (the lease): see ``flush``."""
        with self._lock:
            self.hold = False
            self.may_release = may_release
        self.flush()

    def flush(self) -> int:
        """Alone: release what was held while ``may_release()`` said no, if it says yes now.
        Returns how many pieces are still held."""
        with self._deliver:
            with self._lock:
                if self.hold or (self.may_release is not None and not self.may_release()):
                    return len(self._pending)
                out = list(self._pending)
                self._pending.clear()
            now = time.monotonic()
            for e, kind, payload, t in out:
                self._out(kind, payload, e, now - t)
        return 0

    @property
    def releasing(self) -> bool:
        """Does output leave without waiting (alone, and allowed now)?"""
        return not self.hold and (self.may_release is None or self.may_release())

    def drop(self) -> int:
        """Fenced (the standby took over): held output belongs to epochs the new copy never
        committed, so it must never be released. Returns how many pieces were dropped."""
        with self._lock:
            n = len(self._pending)
            self._pending.clear()
            self.dropped += n
            self.hold = True
            self.open_epoch = 1 << 62  # anything emitted later is held forever
        return n

    def _out(self, kind: str, payload: Any, epoch: int, delay: float) -> None:
        if self.hold and epoch > self.committed:
            self.violations += 1
        self._delays.append(delay * 1e3)
        self.released += 1  # (after the append: a fold never counts a value not yet there)
        self.max_released_epoch = max(self.max_released_epoch, epoch)
        if self.released >= self.delay_hist.next:
            self.delay_hist.fold()
        self.release(kind, payload, epoch)
        if self.delivered is not None:
            self.delivered(kind)

    def _released(self) -> int:
        return self.released

    def statistics(self) -> OutputStats:
        self.delay_hist.fold()
        d = sorted(newest(self._delays).tolist())  # (a copy: the ack reader may append)
        return OutputStats(held=len(self._pending), released=self.released,
                           max_released_epoch=self.max_released_epoch,
                           delay_ms_p50=d[len(d) // 2] if d else 0.0,
                           delay_ms_max=d[-1] if d else 0.0)
