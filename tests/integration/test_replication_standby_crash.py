"""kill -9 of the standby in the middle of a commit.

The standby's test hook (``DIRTYRING_TEST_PAUSE_IN_COMMIT``, see ``replication/standby.py``) stops
it deterministically halfway through committing a delta epoch E: E's pages are in its memory,
E's state and number are not committed, and E is not acknowledged. There it is killed (-9).
Then:

- while it hung there, the primary released no output of epoch E or later (E was never
  acknowledged), and did not give up on a standby that still sent heartbeats;
- after the kill the primary goes degraded (connection lost), with E unacknowledged, releases
  what it held and keeps serving its clients, unprotected;
- a standby restarted on the same address syncs a primary from scratch cleanly: with --verify
  every commit's memory digest matches the primary's, and after that primary is killed the
  restarted standby takes over holding every write a client saw acknowledged.

The degraded primary itself does not reconnect (it runs on unprotected); the restarted standby
is synced by a new primary. Deadlines are generous; nothing here depends on speed.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # repl_helpers sits beside the tests; works in any import mode
    sys.path.insert(0, _HERE)
from repl_helpers import (Spawner, env_added, free_port, kv_missing, require,  # noqa: E402
                          spawn, wait_file, wait_status)

__all__ = ["spawn"]  # the fixture, imported so pytest finds it

#: Heartbeat timeouts long enough that only a lost connection can end anything here, even on a
#: loaded host, where a primary was seen silent for 3.5 s while starting (a kill -9 is seen as
#: a lost connection at once).
HB = "30s"


def test_standby_killed_mid_commit_primary_degrades_and_restarted_standby_resyncs(
        spawn: Spawner, tmp_path: Path) -> None:
    sport, kv1, kv2, kv3, ctl = (free_port() for _ in range(5))
    marker = str(tmp_path / "in-commit")
    with env_added(spawn, {"DIRTYRING_TEST_PAUSE_IN_COMMIT": marker}):
        sb = spawn.standby(sport, hb_timeout=HB)
    pr = spawn.primary("kvstore", sport, serve=kv1, hb_timeout=HB)
    load = spawn.kv_load(kv1, clients=3)
    require(pr.wait_event("protected", 120) is not None, pr.describe())
    require(load.wait_acked(50, 60), "no write acknowledged while protected")

    # Stop the standby in the middle of its next delta commit.
    Path(marker + ".arm").touch()
    epoch = int(wait_file(marker, 60, sb))
    with load.lock:
        released = list(load.epochs)
    assert sb.alive() and pr.alive(), (sb.describe(), pr.describe())
    assert not pr.of("degraded"), pr.describe()  # a hung commit is not a lost standby
    assert released and max(released) < epoch, (max(released), epoch)
    n_before = load.count()

    sb.kill9()
    deg = pr.wait_event("degraded", 60)
    assert deg is not None, pr.describe()
    assert "no frame" not in deg["reason"], deg  # the connection's loss, not a timeout
    assert deg["last_acked"] < epoch, (deg, epoch)
    # Unprotected from now on, and the clients are served: held answers released, new
    # requests answered.
    assert load.wait_acked(n_before + 200, 60), (n_before, load.count(), pr.describe())
    assert pr.alive() and not pr.of("fenced") and not pr.of("guest_crashed"), pr.describe()
    deg_stats = pr.wait_event("stats", 30, lambda e: e.get("state") == "degraded")
    assert deg_stats is not None and deg_stats["output_held"] == 0, pr.describe()
    acked1, _ = load.finish()
    assert not load.bad, load.bad[:5]
    assert acked1

    # A standby restarted on the same address, no hook, checking every commit's digest.
    sb2 = spawn.standby(sport, "--verify", control=ctl, serve=kv2, hb_timeout=HB)
    pr2 = spawn.primary("kvstore", sport, "--verify", serve=kv3, hb_timeout=HB)
    load2 = spawn.kv_load(kv3, clients=3)
    require(pr2.wait_event("protected", 120) is not None, pr2.describe())
    require(load2.wait_acked(50, 60), "no write acknowledged by the second primary")
    st = wait_status(ctl, lambda s: s["consistent"] and s["epochs"] >= 50, 120)
    assert st["mismatches"] == 0, st
    pr2.kill9()
    done = sb2.wait_event("failover_done", 60)
    assert done is not None, sb2.describe()
    acked2, epochs2 = load2.finish()
    assert acked2 and not load2.bad, load2.bad[:5]
    assert max(epochs2) <= done["epoch"], (max(epochs2), done)
    require(sb2.wait_event("serving", 60) is not None, sb2.describe())
    assert kv_missing(kv2, acked2) == []
    assert not sb2.of("verify_mismatch"), sb2.describe()
