"""Live migration's options, figures and error: plain data, shared by the source's modules,
the CLI and the bench (see ``migrate.py`` for how a migration runs)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import ConfigError
from ..errors import MigrationError as MigrationError  # noqa: F401  (moved to errors)

PAGE = 4096


@dataclass(frozen=True, slots=True, kw_only=True)
class MigrationOptions:
    """How a live migration runs: downtime and bandwidth limits, timeout, rounds, throttling.

    Example::

        opt = dirtyring.MigrationOptions(downtime_limit=0.05, bandwidth_limit=100e6,
                                         timeout=10.0)
        rep = dirtyring.migrate(m, target, key, options=opt)
    """

    downtime_limit: float = 0.3      # seconds; the stop-and-copy never expects more
    bandwidth_limit: float = 0.0     # bytes/s on the wire, 0 = unlimited
    timeout: float = 30.0            # total; at the timeout the migration stops and copies anyway
    max_rounds: int = 30
    throttle: bool = True
    settle: bool = True              # under the limit, go on while rounds shrink towards the aim
    #: With ``settle``, the downtime the last round aims at, as a fraction of the limit. When
    #: rounds stop halving above it, dirtying vCPUs are throttled for a round to get there.
    settle_aim: float = 0.1
    #: Write-protect every page before the bulk round (classic pre-copy). Off by default: pages
    #: the guest keeps writing stay writable while the bulk round runs (the guest keeps its
    #: speed) and are sent again in round 1 with everything else found writable.
    arm_bulk: bool = False
    verify: bool = False             # the last epoch carries the memory digest (target checks it)
    compress_level: int = 0          # zlib is slower than loopback here; >0 for slow links
    rearm: str = "round"             # ring: "round" (deferred re-arm) or "harvest" (kernel's)
    chunk_pages: int = 1024          # pages per Pages frame (less at low bandwidth limits)
    epoch_pages: int = 8192          # data pages per epoch: what the target stages at a time
    heartbeat_interval: float = 0.1
    heartbeat_timeout: float = 10.0  # also bounds a blocked send: a target commits big epochs

    def __post_init__(self) -> None:
        if self.downtime_limit <= 0 or self.timeout <= 0 or self.max_rounds < 1:
            raise ConfigError("downtime limit, timeout and max rounds must be positive")
        if self.bandwidth_limit < 0:
            raise ConfigError("the bandwidth limit must be positive (0: unlimited)")
        if not 0 < self.settle_aim <= 1:
            raise ConfigError("settle_aim is a fraction of the downtime limit: 0 < aim <= 1")
        if self.chunk_pages < 1 or self.epoch_pages < 1:
            raise ConfigError("chunk_pages and epoch_pages must be positive")
        if self.rearm not in ("round", "harvest"):
            raise ConfigError(f"rearm must be 'round' or 'harvest', not {self.rearm!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundStats:
    """One pre-copy round (or the final stop-and-copy, ``kind="final"``)."""

    round: int
    kind: str
    pages_sent: int
    seconds: float
    mb_per_s: float               # page data (raw) per second of sending
    wire_mb: float
    dirty_pages: int              # to send next: newly dirty during the round, or left writable
    dirty_mb_per_s: float
    expected_downtime_ms: float
    throttle_pages_per_s: float   # ring: per-vCPU target, 0 = not throttled
    throttle_duty: float          # bitmap: fraction of time the guest runs, 1 = not throttled
    ring_full_exits: int
    guest_progress_per_s: float
    throttle_sleep_s: float = 0.0  # time the vCPU slept for the throttle during the round
    armed: bool = True            # every write of the round was tracked (the bulk round: not)


@dataclass(frozen=True, slots=True, kw_only=True)
class MigrationReport:
    """What a migration did: why it stopped, each round, total time, downtime, bytes.

    Example::

        rep = dirtyring.migrate(m, target, key)
        print(rep.stop_reason, len(rep.rounds), rep.total_s, rep.downtime_ms)
        json.dumps(rep.as_dict())
    """

    stop_reason: str              # converged | timeout | max_rounds | guest_stopped
    rounds: tuple[RoundStats, ...]
    total_s: float
    downtime_ms: float            # source paused .. target's "resumed" received
    final_pages: int
    pages_sent: int
    bytes_sent: int               # page data (raw)
    wire_bytes: int
    bandwidth_mb_s: float         # estimate at the switchover
    throttled: bool
    tracker: str
    pause_t: float                # wall clock of the pause (compare with the target's resume)
    source_state: str = "paused"
    final_digest: str = ""
    progress_before: int = 0
    progress_at_pause: int = 0
    extras: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rounds"] = [asdict(r) for r in self.rounds]
        return d
