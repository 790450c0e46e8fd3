"""``dirtyring migrate`` and ``dirtyring receive`` as real processes on loopback.

The commands run through ``python -m dirtyring.cli.main``, i.e. ``dirtyring`` itself. Every
process is ended by its PID whatever the test does.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
from repl_helpers import CLI as MCLI  # noqa: E402
from repl_helpers import PATIENCE, Proc, addr, child_env, free_port, new_key  # noqa: E402

#: The source's --timeout (stop and copy anyway): long enough that on any host pre-copy ends
#: because it converged (the policy throttles the guest until it does), not because time ran
#: out; the run itself takes about a second on a quick host.
MIGRATION_TIMEOUT = 3 * PATIENCE


class Procs:
    def __init__(self) -> None:
        self.key = new_key()
        self.env = child_env(self.key)
        self.procs: list[Proc] = []

    def receive(self, port: int, *extra: str, env: dict[str, str] | None = None) -> Proc:
        p = Proc("receive", ["receive", "--listen", addr(port), "--json", *extra],
                  env or self.env)
        self.procs.append(p)
        assert p.wait_event("listening", 30) is not None, p.describe()
        return p

    def migrate(self, port: int, *extra: str, env: dict[str, str] | None = None) -> Proc:
        p = Proc("migrate", ["migrate", "dirtier", "--to", addr(port), "--json", *extra],
                  env or self.env)
        self.procs.append(p)
        return p

    def close(self) -> None:
        for p in reversed(self.procs):
            p.end()


@pytest.fixture
def procs() -> Iterator[Procs]:
    s = Procs()
    try:
        yield s
    finally:
        s.close()


@pytest.mark.parametrize("tracker", ["ring", "bitmap"])
def test_cli_migration_switches_over_and_the_guest_runs_on(procs: Procs, tracker: str) -> None:
    port = free_port()
    rx = procs.receive(port, "--verify")  # runs the guest on until SIGTERM (below)
    src = procs.migrate(port, "--verify", "--tracker", tracker, "--memory", "16M",
                        "--pattern", "random", "--rate", "30000", "--warmup", "300ms",
                        "--timeout", f"{MIGRATION_TIMEOUT:g}s")
    assert src.wait_exit(MIGRATION_TIMEOUT + PATIENCE) == 0, src.describe()
    rep = src.of("report")
    assert rep, src.describe()
    r = rep[-1]
    assert r["source_state"] == "paused" and r["tracker"] == tracker
    assert r["stop_reason"] == "converged" and r["downtime_ms"] > 0
    rounds = src.of("round")
    assert rounds and rounds[0]["kind"] == "full"
    for e in rounds:  # per-round statistics the live view shows
        for k in ("dirty_pages", "dirty_mb_per_s", "pages_sent", "mb_per_s",
                  "expected_downtime_ms"):
            assert k in e
    # It runs on the target: two reports of its progress, the second one further on.
    migrated = rx.wait_event("migrated", PATIENCE)
    assert migrated is not None, rx.describe()
    first = rx.wait_event("running", PATIENCE)
    assert first is not None, rx.describe()
    assert rx.wait_event("running", PATIENCE, lambda e: e["progress"] > first["progress"]) \
        is not None, [e["progress"] for e in rx.of("running")]
    rx.signal(signal.SIGTERM)
    assert rx.wait_exit(PATIENCE) == 0, rx.describe()
    assert not rx.of("verify_mismatch"), rx.of("verify_mismatch")
    done = rx.of("failover_done")
    assert done and done[0]["resumed_t"] >= r["pause_t"], (done, r["pause_t"])
    assert migrated["progress"] >= r["progress_at_pause"]
    final = rx.of("report")[-1]
    assert final["mismatches"] == 0 and final["guest"] == "running"
    assert final["state"] == "failed_over" and final["consistent"] is True
    assert final["progress"] > r["progress_at_pause"]


def test_cli_wrong_key_fails_clearly_and_the_target_waits_on(procs: Procs) -> None:
    port = free_port()
    rx = procs.receive(port, "--run-for", "300ms")
    bad = child_env(new_key())
    src = procs.migrate(port, "--memory", "8M", env=bad)
    assert src.wait_exit(60) == 1, src.describe()
    err = "\n".join(src.stderr)
    assert "error" in err and ("handshake" in err or "closed" in err), err
    assert "still running on the source" in err, err
    assert rx.wait_event("protocol_error", 10) is not None, rx.describe()
    assert "authentication failed" in rx.of("protocol_error")[0]["error"]
    assert not rx.of("standby_vm_created") and rx.alive()
    # The target is untouched and still takes a real migration.
    good = procs.migrate(port, "--memory", "8M")
    assert good.wait_exit(60) == 0, good.describe()
    assert rx.wait_exit(30) == 0, rx.describe()
    assert rx.of("failover_done")


def test_cli_source_dying_midway_leaves_the_target_stopped(procs: Procs) -> None:
    """A source killed after some rounds: the target never resumes a half-copied guest; it
    says the incoming migration failed and exits non-zero."""
    port = free_port()
    rx = procs.receive(port, "--heartbeat-timeout", "2s")
    # A paced link and a tight limit keep it in pre-copy long enough to kill it.
    # (Its --timeout, the stop-and-copy however far it got, is far beyond the kill.)
    src = procs.migrate(port, "--memory", "64M", "--pattern", "random", "--rate", "0",
                        "--bandwidth-limit", "1", "--downtime-limit", "5ms", "--no-throttle",
                        "--timeout", f"{MIGRATION_TIMEOUT:g}s")
    assert src.wait_event("round", PATIENCE) is not None, src.describe()
    assert not src.of("stop_and_copy"), src.describe()
    src.kill9()
    assert rx.wait_exit(PATIENCE) == 1, rx.describe()
    assert any("incoming migration failed" in line for line in rx.stderr), rx.stderr
    # No consistent state ever arrived, and the half-copied guest was never resumed.
    assert not rx.of("protected"), rx.describe()
    assert not rx.of("failover_done") and not rx.of("failover_started")
    assert rx.of("primary_lost")


def test_cli_usage_errors_are_one_line(procs: Procs) -> None:
    r = subprocess.run([*MCLI, "migrate", "dirtier", "--to", "nowhere"], capture_output=True,
                       text=True, timeout=60, env=procs.env)
    assert r.returncode != 0
    assert "HOST:PORT" in r.stderr and "Traceback" not in r.stderr
    env = dict(procs.env)
    env.pop("DIRTYRING_KEY")
    r = subprocess.run([*MCLI, "receive", "--listen", f"127.0.0.1:{free_port()}"],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 1 and "no shared key" in r.stderr and "Traceback" not in r.stderr
    port = free_port()  # nothing listens there
    t0 = time.monotonic()
    r = subprocess.run([*MCLI, "migrate", "dirtier", "--to", f"127.0.0.1:{port}", "--memory",
                        "4M", "--warmup", "0"], capture_output=True, text=True, timeout=60,
                       env=procs.env)
    assert r.returncode == 1 and "cannot connect" in r.stderr, r.stderr
    assert time.monotonic() - t0 < 30
