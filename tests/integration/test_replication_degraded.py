"""The standby dies or hangs: the primary must notice (connection loss or heartbeat timeout),
say "degraded", release the output it held, and keep its guest running unprotected."""
from __future__ import annotations

import os
import signal
import sys

import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # repl_helpers sits beside the tests; works in any import mode
    sys.path.insert(0, _HERE)
from repl_helpers import (  # noqa: E402
    HB_CALM, HB_DETECT, PATIENCE, Spawner, free_port, require, spawn,
)

__all__ = ["spawn"]  # the fixture, imported so pytest finds it


def _degraded_stats(pr: object, since: int) -> list[dict]:
    return [e for e in pr.events[since:]  # type: ignore[attr-defined]
            if e.get("event") == "stats" and e.get("state") == "degraded"]


@pytest.mark.parametrize("how", ["kill9", "sigstop"])
def test_standby_lost_primary_goes_degraded_and_guest_keeps_running(spawn: Spawner,
                                                                    how: str) -> None:
    """kill -9: the primary sees the connection drop. SIGSTOP: the socket stays open and only
    the heartbeat timeout (HB_DETECT here) can tell: the reason names the silence the uplink
    measured (a receive timeout of exactly that long), which a wall-clock bound taken in this
    process could not check on a loaded host."""
    sport = free_port()
    sb = spawn.standby(sport, hb_timeout=HB_CALM)
    pr = spawn.primary("compute", sport, hb_timeout=HB_DETECT)
    require(pr.wait_event("protected", PATIENCE) is not None, pr.describe())
    # The standby acknowledges commits: the pair runs protected right before the loss.
    require(pr.wait_event("stats", PATIENCE, lambda e: e["state"] == "protected"
                          and e["acked"] >= 2) is not None, pr.describe())
    require(not pr.of("degraded"), pr.describe())
    mark = pr.mark()
    if how == "kill9":
        sb.kill9()
    else:
        sb.signal(signal.SIGSTOP)  # ended (SIGCONT + SIGTERM, then SIGKILL) by the fixture
    deg = pr.wait_event("degraded", PATIENCE, start=mark)
    assert deg is not None, pr.describe()
    if how == "sigstop":
        assert deg["reason"] == f"no frame from the standby for {HB_DETECT[:-1]} s", deg
    mark = pr.mark()
    # Keeps running unprotected: periodic stats in state "degraded" with the guest progressing.
    assert pr.wait_event("stats", PATIENCE, lambda e: len(_degraded_stats(pr, mark)) >= 8,
                         start=mark) is not None, pr.describe()
    stats = _degraded_stats(pr, mark)
    assert pr.alive(), pr.describe()
    assert all(s["guest_progress_per_s"] > 0 for s in stats[-3:]), \
        [s["guest_progress_per_s"] for s in stats]
    # The absolute counter: every degraded stats line carries it, and it keeps growing.
    assert all("guest_progress" in s for s in stats), stats[0]
    prog = [s["guest_progress"] for s in stats]
    assert all(b > a for a, b in zip(prog, prog[1:])), prog
    assert stats[-1]["elapsed_s"] > stats[0]["elapsed_s"]
    assert stats[-1]["output_held"] == 0
    assert not pr.of("fenced") and not pr.of("guest_crashed"), pr.describe()


def test_standby_killed_kv_clients_keep_getting_answers(spawn: Spawner) -> None:
    """Held output is released when the standby dies, and new requests are answered."""
    sport, kv = free_port(), free_port()
    sb = spawn.standby(sport, hb_timeout=HB_CALM)
    pr = spawn.primary("kvstore", sport, serve=kv, hb_timeout=HB_CALM)
    load = spawn.kv_load(kv, clients=3)
    try:
        require(pr.wait_event("protected", PATIENCE) is not None, pr.describe())
        require(load.wait_acked(50, PATIENCE), "no write acknowledged while protected")
        sb.kill9()
        assert pr.wait_event("degraded", PATIENCE) is not None, pr.describe()
        n = load.count()
        assert load.wait_acked(n + 300, PATIENCE), (n, load.count(), pr.describe())
        assert pr.alive()
    finally:
        acked, epochs = load.finish()
    assert not load.bad, load.bad[:5]
    assert acked
