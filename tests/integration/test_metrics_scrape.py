"""``--metrics HOST:PORT`` on real processes (issue 14 item 5, issue 16 item 3): a protected
guest and its standby, a migration and its target, and the lease with a real etcd member,
scraped over HTTP while they run and parsed with prometheus_client's own parser.

The scraped counters are compared with the JSON statistics the same process prints through
relations that hold whatever the host's speed (no timing asserts): a ``stats`` event is built
before its wall-clock ``t``, so a scrape that starts after ``t`` shows at least its count; the
``done`` event's count is final, so no scrape shows more; an acknowledgement follows a commit,
so the standby's committed epoch is at least the acknowledged epoch scraped before it.
"""
from __future__ import annotations

import os
import sys
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # repl_helpers sits beside the tests; works in any import mode
    sys.path.insert(0, _HERE)
from repl_helpers import (HB_CALM, HOST, PATIENCE, Spawner, addr, failover_cli,  # noqa: E402
                          free_port, spawn, wait_for, wait_port)

__all__ = ["spawn"]  # the fixture, imported so pytest finds it

Families = dict[str, Any]

PRIMARY_FAMILIES = (
    "dirtyring_epoch_pause_seconds", "dirtyring_epoch_dirty_pages",
    "dirtyring_ack_round_trip_seconds", "dirtyring_output_delay_seconds",
    "dirtyring_checkpoints", "dirtyring_checkpoint_bytes", "dirtyring_sent_bytes",
    "dirtyring_epoch", "dirtyring_acked_epoch", "dirtyring_staging_bytes",
    "dirtyring_output_held", "dirtyring_primary_state", "dirtyring_guest_progress")
STANDBY_FAMILIES = (
    "dirtyring_standby_checkpoints", "dirtyring_received_bytes", "dirtyring_rejected_frames",
    "dirtyring_failovers", "dirtyring_standby_committed_epoch", "dirtyring_standby_state",
    "dirtyring_standby_staging_bytes")


def scrape(port: int) -> Families:
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=PATIENCE) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(f: Families, name: str, suffix: str = "", **labels: str) -> float:
    for s in f[name].samples:
        if s.name == name + suffix and all(s.labels.get(k) == v for k, v in labels.items()):
            return float(s.value)
    raise KeyError((name, suffix, labels))


def scrape_when(port: int, pred: Any, timeout: float = PATIENCE) -> Families:
    """Scrape until ``pred(families)`` holds (a generous deadline, not a measurement)."""
    got: list[Families] = []

    def ok() -> bool:
        try:
            f = scrape(port)
        except OSError:
            return False
        got[:] = [f]
        try:
            return bool(pred(f))
        except KeyError:
            return False
    assert wait_for(ok, timeout, every=0.1), f"no scrape matched; last: {list(got[0]) if got else None}"
    return got[0]


def test_a_protected_guest_and_its_standby_are_scraped(spawn: Spawner) -> None:
    sport, smet, pmet, cport = free_port(), free_port(), free_port(), free_port()
    sb = spawn.standby(sport, "--metrics", addr(smet), control=cport, hb_timeout=HB_CALM)
    assert sb.wait_event("metrics", PATIENCE) is not None, sb.describe()
    pr = spawn.primary("dirtier", sport, "--metrics", addr(pmet), hb_timeout=HB_CALM)
    pr.need_event("protected", PATIENCE)
    wait_port(pmet, PATIENCE)
    assert pr.of("metrics") and pr.of("metrics")[0]["addr"] == addr(pmet)

    # Two scrapes, each started after a stats event was printed: never less than it says.
    first = pr.need_event("stats", PATIENCE, lambda e: e["state"] == "protected")
    events = pr.of("stats")  # (all printed before the scrape starts)
    a = scrape(pmet)
    for name in PRIMARY_FAMILIES:
        assert name in a, (name, sorted(a))
    assert a["dirtyring_epoch_pause_seconds"].type == "histogram"
    assert a["dirtyring_checkpoints"].type == "counter"
    assert value(a, "dirtyring_primary_state", state="protected") == 1
    assert value(a, "dirtyring_checkpoints", "_total") >= first["epochs"]
    assert value(a, "dirtyring_acked_epoch") >= first["acked"]
    assert value(a, "dirtyring_guest_progress", "_total") >= first["guest_progress"]
    # The histograms are folded at least at every stats event: they hold every epoch of the
    # event before the last one printed before the scrape.
    if len(events) >= 2:
        assert value(a, "dirtyring_epoch_pause_seconds", "_count") >= events[-2]["epochs"]
    assert value(a, "dirtyring_epoch_pause_seconds", "_count") <= \
        value(a, "dirtyring_checkpoints", "_total")
    assert value(a, "dirtyring_epoch_dirty_pages", "_count") == \
        value(a, "dirtyring_epoch_pause_seconds", "_count")

    # The standby, scraped after the primary: it committed at least what was acknowledged.
    s = scrape(smet)
    for name in STANDBY_FAMILIES:
        assert name in s, (name, sorted(s))
    assert value(s, "dirtyring_standby_committed_epoch") >= value(a, "dirtyring_acked_epoch")
    assert value(s, "dirtyring_standby_checkpoints", "_total") > 0
    assert value(s, "dirtyring_received_bytes", "_total") > 0
    assert value(s, "dirtyring_failovers", "_total") == 0
    assert value(s, "dirtyring_standby_state", state="protected") == 1

    # The counter grows: a later scrape (after a later stats event) shows more checkpoints.
    mark = len(pr.of("stats"))
    later = pr.need_event("stats", PATIENCE, lambda e: len(pr.of("stats")) > mark + 1
                          and e["epochs"] > value(a, "dirtyring_checkpoints", "_total"))
    b = scrape(pmet)
    assert value(b, "dirtyring_checkpoints", "_total") >= later["epochs"] > \
        value(a, "dirtyring_checkpoints", "_total")
    assert value(b, "dirtyring_sent_bytes", "_total") > value(a, "dirtyring_sent_bytes", "_total")
    assert value(b, "dirtyring_ack_round_trip_seconds", "_count") > 0
    pr.signal(15)
    assert pr.wait_exit(PATIENCE) == 0, pr.describe()
    done = pr.of("done")[-1]
    assert value(b, "dirtyring_checkpoints", "_total") <= done["epochs"]
    # So the checkpoints counted between the two scrapes are within what the JSON statistics
    # counted from the event before the first scrape to the end, and at least what they
    # counted from the first scrape to the event before the second.
    between = value(b, "dirtyring_checkpoints", "_total") - \
        value(a, "dirtyring_checkpoints", "_total")
    assert later["epochs"] - value(a, "dirtyring_checkpoints", "_total") <= between <= \
        done["epochs"] - first["epochs"]
    assert value(b, "dirtyring_checkpoint_bytes", "_total") <= done["bytes_total"]
    assert value(b, "dirtyring_output_violations", "_total") == 0
    # The standby's own statistics (its control port) agree with its counters.
    s2 = scrape(smet)
    st = failover_cli(cport, status_only=True)
    assert value(s2, "dirtyring_standby_checkpoints", "_total") <= st["epochs"]
    assert value(s2, "dirtyring_received_bytes", "_total") <= st["bytes_received"]
    assert st["output_held"] is False and st["failovers"] == 0


def test_a_migration_and_its_target_are_scraped(spawn: Spawner) -> None:
    port, smet, rmet = free_port(), free_port(), free_port()
    rx = spawn("receive", "receive", "--listen", addr(port), "--json", "--metrics",
               addr(rmet))
    assert rx.wait_event("listening", PATIENCE) is not None, rx.describe()
    # A paced link keeps the source in pre-copy for seconds: long enough to scrape it.
    src = spawn("migrate", "migrate", "dirtier", "--to", addr(port), "--json", "--metrics",
                addr(smet), "--memory", "16M", "--pattern", "random", "--rate", "20000",
                "--bandwidth-limit", "4", "--warmup", "0", "--timeout", f"{3 * PATIENCE:g}s")
    f = scrape_when(smet, lambda f: value(f, "dirtyring_migration_pages_sent", "_total") > 0)
    for name in ("dirtyring_migration_state", "dirtyring_migration_rounds",
                 "dirtyring_migration_pages_sent", "dirtyring_migration_sent_bytes",
                 "dirtyring_migration_round_dirty_pages", "dirtyring_migration_downtime_seconds"):
        assert name in f, (name, sorted(f))
    assert value(f, "dirtyring_migration_state", state="precopy") + \
        value(f, "dirtyring_migration_state", state="stop_and_copy") == 1
    assert value(f, "dirtyring_migration_sent_bytes", "_total") > 0
    g = scrape_when(rmet, lambda g: value(g, "dirtyring_standby_checkpoints", "_total") > 0)
    assert value(g, "dirtyring_received_bytes", "_total") > 0
    assert src.wait_exit(3 * PATIENCE + PATIENCE) == 0, src.describe()
    rep = src.of("report")[-1]
    assert value(f, "dirtyring_migration_pages_sent", "_total") <= rep["pages_sent"]
    # The target resumed the guest: a takeover, as a standby's failover.
    assert rx.wait_event("migrated", PATIENCE) is not None, rx.describe()
    h = scrape(rmet)
    assert value(h, "dirtyring_failovers", "_total") == 1
    assert value(h, "dirtyring_standby_state", state="failed_over") == 1
    assert value(h, "dirtyring_standby_committed_epoch") >= \
        value(g, "dirtyring_standby_committed_epoch")
    rx.signal(15)
    assert rx.wait_exit(PATIENCE) == 0, rx.describe()


@pytest.fixture(scope="module")
def etcd() -> Iterator[str]:
    from dirtyring.bench.etcd_member import EtcdMember
    with EtcdMember() as member:
        yield member.url


@pytest.mark.slow
def test_the_lease_is_scraped_and_in_the_status(spawn: Spawner, etcd: str) -> None:
    ttl = 3
    group = f"metrics-{time.monotonic_ns()}"
    ea = ["--etcd", etcd, "--name", group, "--lease-ttl", str(ttl)]
    sport, smet, pmet, cport = free_port(), free_port(), free_port(), free_port()
    sb = spawn.standby(sport, *ea, "--metrics", addr(smet), control=cport, hb_timeout=HB_CALM)
    pr = spawn.primary("dirtier", sport, *ea, "--metrics", addr(pmet), hb_timeout=HB_CALM)
    granted = pr.need_event("lease_granted", PATIENCE)
    pr.need_event("protected", PATIENCE)
    token = granted["revision"]
    assert token > 0
    f = scrape_when(pmet, lambda f: value(f, "dirtyring_lease_etcd_up") == 1)
    assert value(f, "dirtyring_lease_revision") == token
    assert value(f, "dirtyring_lease_token") == token
    assert 0 < value(f, "dirtyring_lease_ttl_left_seconds") <= ttl
    assert value(f, "dirtyring_lease_held") == 1
    assert value(f, "dirtyring_lease_info", group=group, holder="primary",
                 holder_pid=str(pr.pid)) == 1
    assert value(f, "dirtyring_output_held") == 1  # protected: output waits for acks
    s = scrape_when(smet, lambda s: value(s, "dirtyring_lease_etcd_up") == 1)
    assert value(s, "dirtyring_lease_revision") == token
    assert value(s, "dirtyring_lease_held") == 0 and value(s, "dirtyring_lease_token") == 0
    assert value(s, "dirtyring_lease_info", group=group, holder="primary") == 1
    # failover --status says the same: holder, revision, TTL left, whether output is held.
    st = failover_cli(cport, status_only=True)
    lease = st["lease"]
    assert lease["holder"]["who"] == "primary" and lease["revision"] == token
    assert lease["ttl_left_s"] == 0 and lease["ours"] is False  # the standby holds nothing
    assert st["output_held"] is False and st["output_held_pieces"] == 0
    # and the primary's JSON statistics carry its side of the lease.
    e = pr.need_event("stats", PATIENCE, lambda e: "lease" in e)
    assert e["lease"]["revision"] == token and 0 < e["lease"]["ttl_left_s"] <= ttl
    assert e["lease"]["holder"] == "primary" and e["lease"]["output_held"] is True

    # The primary dies: its uplink revokes the lease, the standby takes the key and goes live.
    pr.kill9()
    done = sb.need_event("failover_done", PATIENCE)
    assert done["lease"]["revision"] > token and done["lease"]["holder"] == "standby"
    assert 0 < done["lease"]["ttl_left_s"] <= ttl
    s = scrape_when(smet, lambda s: value(s, "dirtyring_lease_held") == 1)
    assert value(s, "dirtyring_lease_revision") == value(s, "dirtyring_lease_token") == \
        done["lease"]["revision"]
    assert 0 < value(s, "dirtyring_lease_ttl_left_seconds") <= ttl
    assert value(s, "dirtyring_lease_info", group=group, holder="standby",
                 holder_pid=str(sb.pid)) == 1
    assert value(s, "dirtyring_failovers", "_total") == 1
    assert value(s, "dirtyring_standby_state", state="failed_over") == 1
    # Live with its lease sure: output leaves as it is made (held only while unsure).
    assert wait_for(lambda: failover_cli(cport, status_only=True)["output_held"] is False)
    st = failover_cli(cport, status_only=True)
    assert st["lease"]["ours"] is True and st["lease"]["revision"] == done["lease"]["revision"]
    assert st["failovers"] == 1

