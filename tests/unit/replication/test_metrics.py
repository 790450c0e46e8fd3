"""The Prometheus collectors, without KVM: each reads the figures the statistics already keep
(an EpochStats, an OutputGate, the uplink's statistics, the standby's counters, the lease) and
the text they give parses with prometheus_client's own parser. The server: a private registry,
a clear error for a bad or busy address."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.request
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import REGISTRY, Collector, CollectorRegistry

from dirtyring.errors import DirtyringError
from dirtyring.machine.stats import EpochStats
from dirtyring.replication.arbiter import ArbiterUnavailable, Owner
from dirtyring.replication.metrics import (MetricsServer, PrimaryCollector, StandbyCollector,
                                           lease_families)
from dirtyring.replication.output_commit import OutputGate


def scrape(*collectors: Collector) -> dict[str, Any]:
    reg = CollectorRegistry(auto_describe=False)
    for c in collectors:
        reg.register(c)
    text = generate_latest(reg).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fams: dict[str, Any], name: str, suffix: str = "", **labels: str) -> float:
    for s in fams[name].samples:
        if s.name == name + suffix and all(s.labels.get(k) == v for k, v in labels.items()):
            return float(s.value)
    raise KeyError((name, suffix, labels))


def fake_primary(arbiter: Any = None) -> SimpleNamespace:
    st = EpochStats(histograms=True)
    for _ in range(10):
        st.record(pause_s=200e-6, harvest_s=50e-6, dirty_pages=64, nbytes=64 * 4096)
    st.record_many(pause_s=[20e-6] * 5, dirty_pages=64, nbytes=64 * 4096)
    st.snapshot()
    gate = OutputGate(lambda k, p, e: None)
    for epoch in (1, 2, 3):
        gate.emit("kv", epoch)
        gate.advance(epoch + 1)
    gate.commit(2)
    gate.statistics()
    wire = {"bytes_out": 12345, "sent_epoch": 14,
            "ack_hist": ((1e-3, 1e-2), (3, 4), 0.006, 4)}
    return SimpleNamespace(stats=st, gate=gate, _wire=wire, epoch=15, acked=13,
                           up=SimpleNamespace(staging_bytes=8192), max_staging_bytes=65536,
                           m=SimpleNamespace(progress=lambda: 4242), state="protected",
                           arbiter=arbiter)


def test_primary_metrics_are_read_from_the_existing_statistics() -> None:
    f = scrape(PrimaryCollector(fake_primary()))
    assert value(f, "dirtyring_checkpoints", "_total") == 15
    assert value(f, "dirtyring_epoch_pause_seconds", "_count") == 15
    assert value(f, "dirtyring_epoch_pause_seconds", "_bucket", le="2.5e-05") == 5
    assert value(f, "dirtyring_epoch_pause_seconds", "_bucket", le="0.00025") == 15
    assert abs(value(f, "dirtyring_epoch_pause_seconds", "_sum") - (10 * 200e-6 + 5 * 20e-6)) \
        < 1e-9
    assert value(f, "dirtyring_epoch_dirty_pages", "_bucket", le="64.0") == 15
    assert value(f, "dirtyring_ack_round_trip_seconds", "_bucket", le="0.001") == 3
    assert value(f, "dirtyring_ack_round_trip_seconds", "_bucket", le="+Inf") == 4
    assert value(f, "dirtyring_output_delay_seconds", "_count") == 2  # epochs 1, 2 released
    assert value(f, "dirtyring_output_released", "_total") == 2
    assert value(f, "dirtyring_output_held_pieces") == 1
    assert value(f, "dirtyring_output_held") == 1  # protected: output waits for acks
    assert value(f, "dirtyring_checkpoint_bytes", "_total") == 15 * 64 * 4096
    assert value(f, "dirtyring_sent_bytes", "_total") == 12345
    assert value(f, "dirtyring_acked_epoch") == 13 and value(f, "dirtyring_epoch") == 15
    assert value(f, "dirtyring_sent_epoch") == 14
    assert value(f, "dirtyring_staging_bytes") == 8192
    assert value(f, "dirtyring_guest_progress", "_total") == 4242
    assert value(f, "dirtyring_primary_state", state="protected") == 1
    assert value(f, "dirtyring_primary_state", state="degraded") == 0
    assert f["dirtyring_epoch_pause_seconds"].type == "histogram"
    assert f["dirtyring_checkpoints"].type == "counter"
    assert not any(n.startswith("dirtyring_lease") for n in f)  # no --etcd


def test_primary_before_its_first_statistics() -> None:
    p = fake_primary()
    p._wire = {}
    p.up = None
    p.state = "some_new_state"
    f = scrape(PrimaryCollector(p))
    assert value(f, "dirtyring_ack_round_trip_seconds", "_count") == 0
    assert value(f, "dirtyring_sent_bytes", "_total") == 0
    assert value(f, "dirtyring_primary_state", state="some_new_state") == 1


class FakeArbiter:
    group = "g1"

    def __init__(self, *, up: bool = True, holder: str = "", revision: int = 0) -> None:
        self.up, self.holder, self.revision = up, holder, revision
        self.token, self.lost = revision, ""

    def read(self) -> Owner:
        if not self.up:
            raise ArbiterUnavailable("no etcd member answered")
        return Owner(self.holder, self.revision, "")

    def ttl_left(self) -> float:
        return 2.5 if self.token else 0.0

    def may_release(self) -> bool:
        return bool(self.token)


def test_lease_metrics() -> None:
    holder = json.dumps({"who": "primary", "host": "h1", "pid": 77})
    a = FakeArbiter(holder=holder, revision=42)
    f = scrape(PrimaryCollector(fake_primary(a)))
    assert value(f, "dirtyring_lease_info", group="g1", holder="primary",
                 holder_host="h1", holder_pid="77") == 1
    assert value(f, "dirtyring_lease_revision") == 42
    assert value(f, "dirtyring_lease_token") == 42
    assert value(f, "dirtyring_lease_ttl_left_seconds") == 2.5
    assert value(f, "dirtyring_lease_held") == 1 and value(f, "dirtyring_lease_may_release") == 1
    assert value(f, "dirtyring_lease_etcd_up") == 1


def test_lease_metrics_with_etcd_unreachable() -> None:
    a = FakeArbiter(up=False)

    class Only(Collector):
        def collect(self) -> Any:
            return lease_families(a)  # type: ignore[arg-type]
    f = scrape(Only())
    assert value(f, "dirtyring_lease_info", holder="unknown") == 1
    assert value(f, "dirtyring_lease_etcd_up") == 0 and value(f, "dirtyring_lease_held") == 0


def fake_standby(**kw: Any) -> SimpleNamespace:
    d: dict[str, Any] = dict(epochs=7, pages=300, bytes_received=99999, rejected=2,
                             failovers=0, mismatches=0, committed_epoch=9, staging_bytes=0,
                             max_staging_bytes=4096, consistent=True, state="protected",
                             reprotected_by=None, etcd=None,
                             output_status=lambda: {"output_held": False,
                                                    "output_held_pieces": 0})
    d.update(kw)
    return SimpleNamespace(**d)


def test_standby_metrics() -> None:
    f = scrape(StandbyCollector(fake_standby()))
    assert value(f, "dirtyring_standby_checkpoints", "_total") == 7
    assert value(f, "dirtyring_received_bytes", "_total") == 99999
    assert value(f, "dirtyring_rejected_frames", "_total") == 2
    assert value(f, "dirtyring_failovers", "_total") == 0
    assert value(f, "dirtyring_standby_committed_epoch") == 9
    assert value(f, "dirtyring_standby_consistent") == 1
    assert value(f, "dirtyring_standby_state", state="protected") == 1
    assert "dirtyring_checkpoints" not in f  # no re-protection yet


def test_a_standby_that_reprotects_shows_its_primary_once() -> None:
    a = FakeArbiter(holder=json.dumps({"who": "standby"}), revision=50)
    sb = fake_standby(state="failed_over", failovers=1, reprotected_by=fake_primary(a),
                      etcd=a)
    f = scrape(StandbyCollector(sb))
    assert value(f, "dirtyring_failovers", "_total") == 1
    assert value(f, "dirtyring_checkpoints", "_total") == 15
    assert value(f, "dirtyring_lease_revision") == 50  # once (no duplicate families)


def test_the_server_serves_its_own_registry_and_errors_are_clear() -> None:
    srv = MetricsServer(("127.0.0.1", 0))
    try:
        srv.add(StandbyCollector(fake_standby()))
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/metrics", timeout=30) as r:
            text = r.read().decode()
        names = {f.name for f in text_string_to_metric_families(text)}
        assert "dirtyring_standby_checkpoints" in names
        assert "python_gc_objects_collected" not in names  # not the global registry
        assert not any(n.startswith("dirtyring") for n in
                       (f.name for f in REGISTRY.collect()))
        with pytest.raises(DirtyringError, match="cannot serve metrics on 127.0.0.1"):
            MetricsServer(("127.0.0.1", srv.port))  # in use
    finally:
        srv.close()
    with pytest.raises(DirtyringError, match="cannot serve metrics on 192.0.2.1"):
        MetricsServer(("192.0.2.1", 9))  # not an address of this host


def test_cli_bad_or_busy_metrics_address_is_one_line() -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "dirtyring.cli.main", *args],
                              capture_output=True, text=True, timeout=120)

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            listen = f"127.0.0.1:{s.getsockname()[1]}"  # (free: the error is the metrics')
        for args in (["protect", "dirtier", "--standby", "127.0.0.1:1", "--insecure"],
                     ["standby", "--listen", listen, "--insecure"],
                     ["migrate", "dirtier", "--to", "127.0.0.1:1", "--insecure"],
                     ["receive", "--listen", listen, "--insecure"]):
            for spec, needle in (("nonsense", "is not HOST:PORT"),
                                 (f"127.0.0.1:{port}", "cannot serve metrics")):
                p = run(*args, "--metrics", spec)
                err = [ln for ln in p.stderr.splitlines() if ln.strip()]
                assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
                assert len(err) == 1 and needle in err[0] and "error" in err[0], p.stderr
