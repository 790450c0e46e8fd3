"""The standby dies or hangs: the primary must notice (connection loss or heartbeat timeout),
say "degraded", release the output it held, and keep its guest running unprotected."""
from __future__ import annotations

import os
import signal
import sys
import time

import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # repl_helpers sits beside the tests; works in any import mode
    sys.path.insert(0, _HERE)
from repl_helpers import Spawner, free_port, require, spawn  # noqa: E402

__all__ = ["spawn"]  # the fixture, imported so pytest finds it


def _degraded_stats(pr: object, since: int) -> list[dict]:
    return [e for e in pr.events[since:]  # type: ignore[attr-defined]
            if e.get("event") == "stats" and e.get("state") == "degraded"]


@pytest.mark.parametrize("how", ["kill9", "sigstop"])
def test_standby_lost_primary_goes_degraded_and_guest_keeps_running(spawn: Spawner,
                                                                    how: str) -> None:
    """kill -9: the primary sees the connection drop. SIGSTOP: the socket stays open and only
    the heartbeat timeout (0.5 s here) can tell."""
    sport = free_port()
    sb = spawn.standby(sport)
    pr = spawn.primary("compute", sport, hb_timeout="0.5s")
    require(pr.wait_event("protected", 60) is not None, pr.describe())
    time.sleep(0.3)
    t0 = time.monotonic()
    if how == "kill9":
        sb.kill9()
    else:
        sb.signal(signal.SIGSTOP)  # ended (SIGCONT + SIGTERM, then SIGKILL) by the fixture
    deg = pr.wait_event("degraded", 10)
    assert deg is not None, pr.describe()
    took = deg["_rx"] - t0
    if how == "sigstop":
        assert "no frame from the standby" in deg["reason"], deg
        assert took >= 0.4, f"degraded after {took:.2f} s, before the 0.5 s heartbeat timeout"
    assert took < 5.0, f"noticed the lost standby only after {took:.1f} s"
    mark = pr.mark()
    # Keeps running unprotected: periodic stats in state "degraded" with the guest progressing.
    end = time.monotonic() + 10
    while time.monotonic() < end and len(_degraded_stats(pr, mark)) < 8:
        time.sleep(0.1)
    stats = _degraded_stats(pr, mark)
    assert len(stats) >= 8, pr.describe()
    assert pr.alive(), pr.describe()
    assert all(s["guest_progress_per_s"] > 0 for s in stats[-3:]), \
        [s["guest_progress_per_s"] for s in stats]
    if "guest_progress" in stats[0]:  # the absolute counter, where the stats carry it
        prog = [s["guest_progress"] for s in stats]
        assert all(b > a for a, b in zip(prog, prog[1:])), prog
    assert stats[-1]["elapsed_s"] > stats[0]["elapsed_s"]
    assert stats[-1]["output_held"] == 0
    assert not pr.of("fenced") and not pr.of("guest_crashed"), pr.describe()


def test_standby_killed_kv_clients_keep_getting_answers(spawn: Spawner) -> None:
    """Held output is released when the standby dies, and new requests are answered."""
    sport, kv = free_port(), free_port()
    sb = spawn.standby(sport)
    pr = spawn.primary("kvstore", sport, serve=kv, hb_timeout="0.5s")
    load = spawn.kv_load(kv, clients=3)
    try:
        require(pr.wait_event("protected", 60) is not None, pr.describe())
        require(load.wait_acked(50, 20), "no write acknowledged while protected")
        sb.kill9()
        assert pr.wait_event("degraded", 10) is not None, pr.describe()
        n = load.count()
        assert load.wait_acked(n + 300, 15), (n, load.count(), pr.describe())
        assert pr.alive()
    finally:
        acked, epochs = load.finish()
    assert not load.bad, load.bad[:5]
    assert acked
