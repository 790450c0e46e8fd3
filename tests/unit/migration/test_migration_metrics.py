"""The migration source's Prometheus collector, without KVM: read from a Migration's state,
its finished rounds (the same RoundStats as the JSON ``round`` events) and its link."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from dirtyring.migration.metrics import MigrationCollector
from dirtyring.migration.types import RoundStats


def rs(index: int, kind: str, dirty: int) -> RoundStats:
    return RoundStats(round=index, kind=kind, pages_sent=1000, seconds=0.5, mb_per_s=8.0,
                      wire_mb=4.0, dirty_pages=dirty, dirty_mb_per_s=1.0,
                      expected_downtime_ms=12.0, throttle_pages_per_s=0.0, throttle_duty=1.0,
                      ring_full_exits=3, guest_progress_per_s=1e6)


def scrape(mig: Any) -> dict[str, float]:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(MigrationCollector(mig))
    text = generate_latest(reg).decode()
    return {(s.name + "".join(f"{{{k}={v}}}" for k, v in sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_migration_metrics() -> None:
    mig = SimpleNamespace(
        state="precopy", rounds=[rs(0, "full", 500), rs(1, "delta", 40)],
        current=SimpleNamespace(index=2, pages=17), report=None,
        net=SimpleNamespace(sent_pages=2017, sent_raw=2017 * 4096, wire=8_000_000,
                            bw=50e6),
        pacer=SimpleNamespace(target_pps=0.0), policy=SimpleNamespace(duty=1.0),
        track=SimpleNamespace(exits=6))
    v = scrape(mig)
    assert v["dirtyring_migration_state{state=precopy}"] == 1
    assert v["dirtyring_migration_state{state=switched_over}"] == 0
    assert v["dirtyring_migration_rounds_total"] == 2
    assert v["dirtyring_migration_round"] == 2
    assert v["dirtyring_migration_pages_sent_total"] == 2017
    assert v["dirtyring_migration_sent_bytes_total"] == 2017 * 4096
    assert v["dirtyring_migration_round_pages_sent"] == 17
    assert v["dirtyring_migration_round_dirty_pages"] == 40
    assert v["dirtyring_migration_expected_downtime_seconds"] == 0.012
    assert v["dirtyring_migration_bandwidth_bytes_per_second"] == 50e6
    assert v["dirtyring_migration_ring_full_exits_total"] == 6
    assert v["dirtyring_migration_downtime_seconds"] == 0
    mig.state, mig.report = "switched_over", SimpleNamespace(downtime_ms=35.0)
    mig.rounds.append(rs(2, "final", 0))
    v = scrape(mig)
    assert v["dirtyring_migration_rounds_total"] == 2  # the stop-and-copy is not a round
    assert v["dirtyring_migration_downtime_seconds"] == 0.035
    assert v["dirtyring_migration_state{state=switched_over}"] == 1


def test_before_the_first_round() -> None:
    mig = SimpleNamespace(state="starting", rounds=[], current=None, report=None,
                          net=SimpleNamespace(sent_pages=0, sent_raw=0, wire=0, bw=0.0),
                          pacer=SimpleNamespace(target_pps=0.0),
                          policy=SimpleNamespace(duty=1.0), track=SimpleNamespace(exits=0))
    v = scrape(mig)
    assert v["dirtyring_migration_state{state=starting}"] == 1
    assert v["dirtyring_migration_rounds_total"] == 0
