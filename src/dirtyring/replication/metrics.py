"""Prometheus metrics of a primary, a standby (or migration target) and the etcd arbiter,
served by ``--metrics HOST:PORT`` in the Prometheus text format through ``prometheus_client``.

Why here: the primary, the standby and the arbiter are replication's; a migration source is
replication that ends with a switchover, so ``migration/metrics.py`` builds on this module
(migration may import replication, never the other way round). The CLI only starts the server.

How it costs the epoch loop nothing
-----------------------------------
Nothing is recorded for the metrics. Each process registers one *collector* in a registry of its
own (never the global one); its ``collect()`` runs in the HTTP server's thread at scrape time
and reads the figures the statistics already keep: ``EpochStats`` (machine/stats.py), the
``OutputGate``, the uplink's statistics message, the standby's counters, the arbiter's lease.
Counters and gauges are plain attribute reads. The histograms must count every epoch, not a
sample, so they are fed from the windows the statistics already keep: ``WindowHistogram``
counts the window's newest values into cumulative buckets in batches, by the thread that
records them (every half window, ~2,000 epochs, and whenever the statistics are summarised for
the JSON ``stats`` event, every 0.5 s): one integer comparison per epoch and a numpy pass of
tens of µs per batch, after the guest was resumed. Observing each epoch into a
``prometheus_client.Histogram`` would instead cost a lock and a bucket search per epoch in
the loop. The histograms therefore lag the counters by up to 0.5 s (the last batch).
Measured (2026-12-06): ~45-55 ns more per recorded epoch, folds included (a fold of 2,048
epochs ~110 µs); ``bench replicate``'s 64-page cells unchanged within noise, scraped or not.
The ack round trip is measured in the uplink process, which folds its own window and sends the
bucket counts with its statistics (every 0.25 s).

Metrics (all names start with ``dirtyring_``)
---------------------------------------------
Primary (``protect``; a standby that re-protects the guest after its failover shows them too):

- ``epoch_pause_seconds`` (histogram): how long the guest was paused per checkpoint
  (harvest, gather, capture);
- ``epoch_dirty_pages`` (histogram): pages dirtied per epoch (checkpointed);
- ``ack_round_trip_seconds`` (histogram): checkpoint sent to standby's Ack received;
- ``output_delay_seconds`` (histogram): how long each piece of guest output was held until the
  checkpoint that produced it was acknowledged (0 when released at once);
- ``checkpoints_total``: checkpoints taken (committed ones: ``acked_epoch``);
- ``checkpoint_bytes_total``: page and state bytes captured; ``sent_bytes_total``: bytes the
  uplink wrote to the standby (after XOR, sparse encoding, compression, framing);
- ``resyncs_total`` (full copies after the first), ``budget_epochs_total`` (epochs ended early
  by the dirty budget, a full ring);
- ``output_released_total``, ``output_dropped_total`` (held output of epochs the standby never
  committed, dropped when fenced), ``output_violations_total`` (output released before its
  checkpoint was acknowledged: must stay 0);
- ``epoch``, ``sent_epoch``, ``acked_epoch`` (gauges): the last checkpoint taken, written to the
  standby, acknowledged by it;
- ``staging_bytes`` / ``staging_max_bytes``: what the staging area holds for the uplink now, at
  most;
- ``output_held`` (1/0): output waits (for the standby's Ack, or alone for a sure lease) instead
  of leaving as it is made; ``output_held_pieces``: pieces waiting now;
- ``guest_progress_total``: the guest's own progress counter (writes, steps, requests);
- ``primary_state{state}``: 1 for the current state, 0 for the others.

Standby (``standby``, and ``receive``, a migration target):

- ``standby_checkpoints_total``: checkpoints committed; ``standby_pages_total``: pages applied;
- ``received_bytes_total``: wire bytes received from primaries;
- ``rejected_frames_total``: frames or peers refused (unauthenticated or malformed frames, a
  peer not starting with Hello, a second primary, a stale fencing token);
- ``failovers_total``: takeovers done; ``verify_mismatches_total``: memory digest mismatches;
- ``standby_committed_epoch``, ``standby_staging_bytes``, ``standby_staging_max_bytes``,
  ``standby_consistent`` (1: a failover would resume a consistent checkpoint);
- ``output_held`` / ``output_held_pieces`` once live (with --etcd, output waits for a sure lease);
- ``standby_state{state}``: 1 for the current state.

The arbiter (either side, with ``--etcd``; read from etcd at scrape time):

- ``lease_info{group,holder,holder_host,holder_pid}`` (1): who holds the group's key now
  (``holder=""``: nobody, ``"unknown"``: etcd did not answer);
- ``lease_revision``: the key's create revision, the holder's fencing token (0: not held);
- ``lease_token``: this process's fencing token (0: it does not hold the key);
- ``lease_ttl_left_seconds``: how long this process's lease surely lasts, by its own clock;
- ``lease_held`` (1/0): this process holds the key; ``lease_may_release`` (1/0): it may release
  output without an acknowledgement now (lease sure for more than the margin);
- ``lease_etcd_up`` (1/0): etcd answered this scrape's read.
"""
from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import start_http_server
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, InfoMetricFamily, Metric)
from prometheus_client.registry import Collector, CollectorRegistry

from ..errors import DirtyringError
from ..machine.stats import HistogramValue
from .arbiter import Arbiter, ArbiterUnavailable

PREFIX = "dirtyring_"
PRIMARY_STATES = ("starting", "syncing", "protected", "degraded", "fenced", "stopping")
STANDBY_STATES = ("waiting", "following", "protected", "waiting_for_lease", "stale",
                  "failed_over", "failed", "fenced")


# --- families --------------------------------------------------------------------------------
def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(PREFIX + name, doc, value=value)


def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, doc, value=value)


def histogram(name: str, doc: str, v: HistogramValue | None) -> HistogramMetricFamily:
    """A cumulative histogram family from a ``HistogramValue`` (None: empty)."""
    if v is None:
        return HistogramMetricFamily(PREFIX + name, doc, buckets=[("+Inf", 0)], sum_value=0)
    buckets = [(_le(b), c) for b, c in zip(v.bounds, v.counts)]
    buckets.append(("+Inf", v.n))
    return HistogramMetricFamily(PREFIX + name, doc, buckets=buckets, sum_value=v.total)


def _le(bound: float) -> str:
    return repr(float(bound))


def states(name: str, doc: str, known: Sequence[str], current: str) -> GaugeMetricFamily:
    """One sample per state, 1 for ``current`` (an unknown state gets its own sample)."""
    g = GaugeMetricFamily(PREFIX + name, doc, labels=["state"])
    for s in (*known, *(() if current in known else (current,))):
        g.add_metric([s], 1.0 if s == current else 0.0)
    return g


def _hist_from_wire(t: Any) -> HistogramValue | None:
    """The uplink's ``ack_hist``: (bounds, cumulative counts, total, n), pickled."""
    if not t:
        return None
    bounds, counts, total, n = t
    return HistogramValue(tuple(bounds), tuple(counts), float(total), int(n))


# --- collectors -------------------------------------------------------------------------------
class PrimaryCollector(Collector):
    """A :class:`~dirtyring.replication.primary.Primary`'s metrics (duck-typed: any object
    with its attributes; this module is imported by nothing the epoch loop runs)."""

    def __init__(self, primary: Any) -> None:
        self.p = primary

    def collect(self) -> Iterator[Metric]:
        p = self.p
        st = p.stats
        gate = p.gate
        w: dict[str, Any] = p._wire  # (replaced whole by the uplink's reader thread)
        pause, dirty = st.histograms or (None, None)
        yield histogram("epoch_pause_seconds", "Guest paused per checkpoint (harvest, gather, "
                        "capture), seconds", pause)
        yield histogram("epoch_dirty_pages", "Pages dirtied per epoch (checkpointed)", dirty)
        yield histogram("ack_round_trip_seconds", "Checkpoint sent to the standby's "
                        "acknowledgement, seconds", _hist_from_wire(w.get("ack_hist")))
        yield histogram("output_delay_seconds", "Guest output held until its checkpoint was "
                        "acknowledged, seconds", gate.delay_hist.value)
        yield counter("checkpoints", "Checkpoints taken by the epoch loop", st.epochs)
        yield counter("checkpoint_bytes", "Page and machine-state bytes captured in "
                      "checkpoints", st.bytes_total)
        yield counter("sent_bytes", "Bytes written to the standby (encoded, on the wire)",
                      int(w.get("bytes_out", 0)))
        yield counter("resyncs", "Full copies taken after the first (resynchronisation)",
                      st.resyncs)
        yield counter("budget_epochs", "Epochs ended early by the dirty budget (full ring)",
                      st.budget_epochs)
        yield counter("output_released", "Pieces of guest output released", gate.released)
        yield counter("output_dropped", "Held output dropped when fenced (its epochs were "
                      "never committed)", gate.dropped)
        yield counter("output_violations", "Output released before its checkpoint was "
                      "acknowledged (must stay 0)", gate.violations)
        yield gauge("epoch", "Last checkpoint taken", p.epoch)
        yield gauge("sent_epoch", "Last checkpoint written to the standby in full",
                    int(w.get("sent_epoch", 0)))
        yield gauge("acked_epoch", "Last checkpoint the standby acknowledged (committed)",
                    p.acked)
        up = p.up
        yield gauge("staging_bytes", "Bytes in the staging area, waiting for the uplink",
                    up.staging_bytes if up is not None else 0)
        yield gauge("staging_max_bytes", "Most bytes the staging area held",
                    p.max_staging_bytes)
        yield gauge("output_held", "1 if output waits (for the standby's acknowledgement, or "
                    "for a sure lease) instead of leaving as it is made", 0 if gate.releasing
                    else 1)
        yield gauge("output_held_pieces", "Pieces of guest output held now",
                    gate.held)
        try:
            progress = p.m.progress()
        except Exception:  # noqa: BLE001  (the machine is being closed)
            progress = 0
        yield counter("guest_progress", "The guest's own progress counter (writes, steps, "
                      "requests)", progress)
        yield states("primary_state", "1 for the primary's current state", PRIMARY_STATES,
                     p.state)
        if p.arbiter is not None:
            yield from lease_families(p.arbiter)


class StandbyCollector(Collector):
    """A :class:`~dirtyring.replication.standby.Standby`'s metrics (also a migration target's);
    once it re-protects the guest it took over, that primary's metrics too."""

    def __init__(self, standby: Any) -> None:
        self.sb = standby

    def collect(self) -> Iterator[Metric]:
        sb = self.sb
        yield counter("standby_checkpoints", "Checkpoints committed", sb.epochs)
        yield counter("standby_pages", "Pages applied to the standby's memory", sb.pages)
        yield counter("received_bytes", "Bytes received from primaries (on the wire)",
                      sb.bytes_received)
        yield counter("rejected_frames", "Frames or peers refused (bad or unauthenticated "
                      "frames, no Hello, a second primary, a stale fencing token)", sb.rejected)
        yield counter("failovers", "Takeovers done by this standby", sb.failovers)
        yield counter("verify_mismatches", "Memory digest mismatches after a commit",
                      sb.mismatches)
        yield gauge("standby_committed_epoch", "Last epoch committed", sb.committed_epoch)
        yield gauge("standby_staging_bytes", "Bytes staged for the epoch being received",
                    sb.staging_bytes)
        yield gauge("standby_staging_max_bytes", "Most bytes staged for one epoch",
                    sb.max_staging_bytes)
        yield gauge("standby_consistent", "1 if a failover would resume a consistent "
                    "checkpoint", 1 if sb.consistent else 0)
        out = sb.output_status()
        yield gauge("output_held", "1 if the live guest's output waits (for a sure lease)",
                    1 if out["output_held"] else 0)
        yield gauge("output_held_pieces", "Pieces of guest output held now",
                    out["output_held_pieces"])
        yield states("standby_state", "1 for the standby's current state", STANDBY_STATES,
                     sb.state)
        prim = sb.reprotected_by
        if prim is not None:
            # (its own arbiter is ours: the same key, shown once)
            for fam in PrimaryCollector(prim).collect():
                if not fam.name.startswith(PREFIX + "lease_") and \
                        fam.name not in (PREFIX + "output_held", PREFIX + "output_held_pieces"):
                    yield fam
        if sb.etcd is not None:
            yield from lease_families(sb.etcd)


def lease_families(a: Arbiter) -> Iterator[Metric]:
    """The group's key in etcd, read now (one request), and this process's lease."""
    info = InfoMetricFamily(PREFIX + "lease", "Who holds the group's key in etcd (holder "
                            "\"\": nobody; \"unknown\": etcd did not answer)",
                            labels=["group"])
    try:
        o = a.read()
        up, rev = True, o.revision
        try:
            h = json.loads(o.holder) if o.holder else {}
        except ValueError:
            h = {"who": o.holder}
        holder = {"holder": str(h.get("who", "")), "holder_host": str(h.get("host", "")),
                  "holder_pid": str(h.get("pid", ""))}
    except ArbiterUnavailable:
        up, rev = False, 0
        holder = {"holder": "unknown", "holder_host": "", "holder_pid": ""}
    info.add_metric([a.group], holder)
    yield info
    yield gauge("lease_revision", "Create revision of the group's key in etcd: the holder's "
                "fencing token (0: nobody holds it)", rev)
    yield gauge("lease_token", "This process's fencing token (0: it does not hold the key)",
                a.token if not a.lost else 0)
    yield gauge("lease_ttl_left_seconds", "How long this process's lease surely lasts, by "
                "its own clock, seconds", a.ttl_left())
    yield gauge("lease_held", "1 if this process holds the group's key",
                1 if a.token and not a.lost else 0)
    yield gauge("lease_may_release", "1 if this process may release output without an "
                "acknowledgement now (its lease is sure beyond the margin)",
                1 if a.may_release() else 0)
    yield gauge("lease_etcd_up", "1 if etcd answered this scrape's read", 1 if up else 0)


# --- the server -----------------------------------------------------------------------------
class _Collectors(Collector):
    """The collectors of one process, behind one lock: ``remove`` waits for a scrape in
    progress, so nothing is read from an object (a machine's memory) once it is closed."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.items: list[Collector] = []

    def collect(self) -> Iterator[Metric]:
        with self.lock:
            out = [m for c in self.items for m in c.collect()]
        return iter(out)


class MetricsServer:
    """The HTTP endpoint of one process: a registry of its own (never the global one, so
    nothing else a library registers there shows up), served on a thread of its own."""

    def __init__(self, addr: tuple[str, int], collectors: Iterable[Collector] = ()) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._all = _Collectors()
        self._all.items.extend(collectors)
        self.registry.register(self._all)
        self.addr = addr
        try:
            self._server, self._thread = start_http_server(addr[1], addr[0],
                                                           registry=self.registry)
        except OSError as e:
            raise DirtyringError(f"cannot serve metrics on {addr[0]}:{addr[1]}: "
                                 f"{e.strerror or e}") from None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def add(self, collector: Collector) -> None:
        with self._all.lock:
            self._all.items.append(collector)

    def remove(self, collector: Collector) -> None:
        """Stop showing ``collector`` (returns once no scrape reads it any more)."""
        with self._all.lock:
            if collector in self._all.items:
                self._all.items.remove(collector)

    def close(self) -> None:
        with self._all.lock:
            self._all.items.clear()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
