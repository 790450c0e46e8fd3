"""Coexistence (issue 4, part 4): on one host, at the same time, one guest runs under
replication with the dirty ring (``dirtyring standby`` + ``dirtyring protect``, verify mode)
while another guest migrates with the bitmap (``dirtyring receive`` + ``dirtyring migrate
--tracker bitmap``, verify mode). Both must succeed: the standby goes on committing verified
epochs throughout, and the migration switches over with equal memory."""
from __future__ import annotations

import os
import signal
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
from repl_helpers import Spawner, control, free_port, spawn  # noqa: E402
from test_migrate_cli import Procs, procs  # noqa: E402

__all__ = ["spawn", "procs"]  # fixtures


def test_replication_with_the_ring_and_migration_with_the_bitmap_at_once(
        spawn: Spawner, procs: Procs) -> None:
    sport, cport = free_port(), free_port()
    sb = spawn.standby(sport, "--verify", control=cport, hb_timeout="3s")
    pr = spawn.primary("dirtier", sport, "--verify", "--tracker", "ring", "--pattern", "random",
                       "--rate", "20000", memory="4M", hb_timeout="3s")
    assert pr.wait_event("protected", 60) is not None, pr.describe()
    before = control(cport)
    assert before["state"] == "protected"

    mport = free_port()
    rx = procs.receive(mport, "--verify", "--run-for", "1s")
    src = procs.migrate(mport, "--verify", "--tracker", "bitmap", "--memory", "32M",
                        "--pattern", "sequential", "--rate", "40000", "--warmup", "300ms")
    during = []
    end = time.monotonic() + 120
    while src.alive() and time.monotonic() < end:
        during.append(control(cport)["committed_epoch"])
        time.sleep(0.2)
    assert src.wait_exit(10) == 0, src.describe()
    after = control(cport)

    # The migration: switched over, memory verified equal by the target, source paused.
    rep = src.of("report")[-1]
    assert rep["tracker"] == "bitmap" and rep["source_state"] == "paused"
    assert rx.wait_exit(30) == 0, rx.describe()
    assert rx.of("failover_done") and not rx.of("verify_mismatch"), rx.describe()
    assert rx.of("report")[-1]["mismatches"] == 0
    running = [e["progress"] for e in rx.of("running")]
    assert len(running) >= 2 and running[-1] > running[0]

    # The replication: protected throughout, committing verified epochs all along.
    assert pr.alive() and not pr.of("degraded"), pr.describe()
    assert after["state"] == "protected" and after["consistent"] is True, after
    assert after["mismatches"] == 0 and after["committed_epoch"] > before["committed_epoch"]
    assert len(during) >= 2 and during[-1] > during[0], during
    assert not sb.of("verify_mismatch")

    pr.signal(signal.SIGTERM)
    assert pr.wait_exit(30) is not None, pr.describe()
    done = pr.of("done")
    assert done and done[-1]["resyncs"] == 0 and done[-1]["output_violations"] == 0
    assert not pr.of("resync_requested")
