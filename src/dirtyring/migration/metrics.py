"""Prometheus metrics of a migration source (``dirtyring migrate --metrics HOST:PORT``).

Built on ``replication/metrics.py`` (the families, the server, and why a collector that reads
the existing figures at scrape time costs the guest nothing); the target, ``dirtyring
receive``, is a standby and uses that module's ``StandbyCollector``. Read at scrape time from
:class:`~dirtyring.migration.source.Migration`: its state, the rounds it finished
(``RoundStats``, the same records as the JSON ``round`` events), the round on its way, and
the link's counters.

Metrics (all names start with ``dirtyring_migration_``):

- ``state{state}``: 1 for the current state (starting, precopy, stop_and_copy, switched_over,
  failed);
- ``rounds_total``: pre-copy rounds finished; ``round``: the index of the round on its way;
- ``pages_sent_total`` / ``sent_bytes_total``: pages and their raw bytes sent so far (per
  frame); ``wire_bytes_total``: bytes on the wire, counted per finished round;
- ``round_pages_sent``: pages the current round sent so far; ``round_dirty_pages``: pages the
  last finished round left to send (dirtied during it, or left writable by the bulk round);
- ``expected_downtime_seconds``: the last round's expected stop-and-copy time;
- ``bandwidth_bytes_per_second``: the link's end-to-end estimate;
- ``throttle_pages_per_second`` (ring: per vCPU, 0 = not throttled), ``throttle_duty``
  (bitmap: fraction of time the guest runs);
- ``ring_full_exits_total``; ``downtime_seconds``: the guest's downtime once switched over (0
  before).
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from ..replication.metrics import counter, gauge, states

MIGRATION_STATES = ("starting", "precopy", "stop_and_copy", "switched_over", "failed")


class MigrationCollector(Collector):
    """A :class:`~dirtyring.migration.source.Migration`'s metrics (read at scrape time)."""

    def __init__(self, migration: Any) -> None:
        self.mig = migration

    def collect(self) -> Iterator[Metric]:
        mig = self.mig
        net = mig.net
        rounds = list(mig.rounds)
        done = [r for r in rounds if r.kind != "final"]
        cur = mig.current
        last = done[-1] if done else None
        rep = mig.report
        yield states("migration_state", "1 for the migration's current state",
                     MIGRATION_STATES, mig.state)
        yield counter("migration_rounds", "Pre-copy rounds finished", len(done))
        yield gauge("migration_round", "Index of the round on its way (0: the bulk round)",
                    cur.index if cur is not None else 0)
        yield counter("migration_pages_sent", "Pages sent so far", net.sent_pages)
        yield counter("migration_sent_bytes", "Raw page bytes sent so far", net.sent_raw)
        yield counter("migration_wire_bytes", "Bytes on the wire, per finished round",
                      net.wire)
        yield gauge("migration_round_pages_sent", "Pages the current round sent so far",
                    cur.pages if cur is not None else 0)
        yield gauge("migration_round_dirty_pages", "Pages the last finished round left to "
                    "send", last.dirty_pages if last is not None else 0)
        yield gauge("migration_expected_downtime_seconds", "The last round's expected "
                    "stop-and-copy time, seconds",
                    last.expected_downtime_ms / 1e3 if last is not None else 0.0)
        yield gauge("migration_bandwidth_bytes_per_second", "The link's end-to-end bandwidth "
                    "estimate", net.bw)
        yield gauge("migration_throttle_pages_per_second", "Ring throttle per vCPU (0: not "
                    "throttled)", mig.pacer.target_pps)
        yield gauge("migration_throttle_duty", "Bitmap throttle: fraction of time the guest "
                    "runs (1: not throttled)", mig.policy.duty)
        yield counter("migration_ring_full_exits", "Ring-full exits (the throttle's pacing "
                      "points)", mig.track.exits)
        yield gauge("migration_downtime_seconds", "The guest's downtime once switched over "
                    "(0 before), seconds", rep.downtime_ms / 1e3 if rep is not None else 0.0)
