"""Failover over real KVM and loopback TCP, with the primary killed (-9) at random moments or
told to stand down by `dirtyring failover`.

The key-value guest is the proof that output commit works: clients write unique keys to the
primary; after the standby takes over, every write a client saw acknowledged must be in the
standby's guest, and no acknowledgement may carry an epoch the standby had not committed when it
took over. The compute guest is the proof that the standby resumes the exact vCPU + memory state:
its hash chain, reported after the failover, must equal the chain recomputed from scratch.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # repl_helpers sits beside the tests; works in any import mode
    sys.path.insert(0, _HERE)
from repl_helpers import (  # noqa: E402
    HOST, Chain, KvLoad, Spawner, StandbyThread, control, failover_cli, free_port, kv_missing,
    kv_value, require, rng_from_env, spawn, wait_port,
)

from dirtyring.products.kvservice import KvClient  # noqa: E402

__all__ = ["spawn"]  # the fixture, imported so pytest finds it

REPORT_EVERY = 100_000  # GuestParams.report_every default: the compute guest reports this often


def _kv_pair(spawn: Spawner, *extra: str,
             clients: int = 3) -> tuple[Any, Any, KvLoad, dict[str, int]]:
    ports = {"repl": free_port(), "ctl": free_port(), "kv1": free_port(), "kv2": free_port()}
    sb = spawn.standby(ports["repl"], control=ports["ctl"], serve=ports["kv2"])
    pr = spawn.primary("kvstore", ports["repl"], *extra, serve=ports["kv1"])
    load = spawn.kv_load(ports["kv1"], clients=clients)
    return sb, pr, load, ports


def _check_kv_after_failover(sb: Any, load: KvLoad, ports: dict[str, int],
                             done: dict[str, Any]) -> tuple[dict[int, int], list[int]]:
    """The standby serves, has every acknowledged write, released nothing uncommitted, and its
    guest still takes new writes."""
    acked, epochs = load.finish()
    committed = int(done["epoch"])
    assert sb.wait_event("serving", 15) is not None, sb.describe()
    wait_port(ports["kv2"], 10)
    too_new = sorted(e for e in epochs if e > committed)
    assert not too_new, (f"{len(too_new)} acknowledgements carry epochs {too_new[:10]} newer "
                         f"than the standby's committed epoch {committed} at failover")
    missing = kv_missing(ports["kv2"], acked)
    assert not missing, (f"{len(missing)} of {len(acked)} acknowledged writes are missing on "
                         f"the standby (keys {missing[:10]}), committed epoch {committed}")
    c = KvClient((HOST, ports["kv2"]), timeout=10)
    try:  # the taken-over guest is alive and serving new requests
        key = 10**12 + 7
        assert c.call("put", key, kv_value(key))["status"] == "ok"
        r = c.call("get", key)
        assert r["status"] == "ok" and r["value"] == kv_value(key), r
    finally:
        c.close()
    assert not load.bad, load.bad[:5]
    return acked, epochs


# --- kill -9 the primary ----------------------------------------------------------------------
#: The hot-set tracker at 150 µs epochs: the native steady batch runs the epochs. A loaded
#: key-value guest does I/O in nearly every one, which stops a batch at the exit: the epoch is
#: then finished in Python (requests, responses, output gate) and checkpointed the ordinary
#: way. The compute guest's batches complete most of its checkpoints (checked below).
HOTSET = ["--tracker", "hotset", "--interval", "150us"]
KILL_POINTS = ["at-protected", "early", "early", "mid", "mid", "mid-hotset"]


@pytest.mark.slow
@pytest.mark.parametrize("run", range(len(KILL_POINTS)),
                         ids=[f"{i}-{p}" for i, p in enumerate(KILL_POINTS)])
def test_kill9_primary_kvstore_no_acknowledged_write_lost(spawn: Spawner, run: int) -> None:
    point, _, variant = KILL_POINTS[run].partition("-hot")
    rng = rng_from_env(f"kill9-kv-{run}")
    delay = {"at-protected": 0.0, "early": rng.uniform(0.005, 0.15),
             "mid": rng.uniform(0.4, 1.5)}[point]
    sb, pr, load, ports = _kv_pair(spawn, *(HOTSET if variant else []))
    assert pr.wait_event("protected", 60) is not None, pr.describe()
    if delay:
        time.sleep(delay)
    pr.kill9()
    done = sb.wait_event("failover_done", 15)
    assert done is not None, sb.describe()
    assert not sb.of("failover_impossible")
    lost = sb.of("primary_lost")
    assert lost and lost[0]["committed_epoch"] == done["epoch"], (lost, done)
    assert done["epoch"] >= 2  # at least the first consistent checkpoint
    st = control(ports["ctl"])
    assert st["state"] == "failed_over" and st["committed_epoch"] == done["epoch"], st
    acked, _ = _check_kv_after_failover(sb, load, ports, done)
    print(f"{point}: killed {delay * 1e3:.0f} ms after protected; committed epoch "
          f"{done['epoch']}; {len(acked)} acknowledged writes all present")
    if point == "mid":
        assert acked, "no write was acknowledged in a mid-run kill: the load never ran"


@pytest.mark.slow
@pytest.mark.parametrize("when,vcpus,extra", [("at-protected", 1, []), ("mid", 1, []),
                                              ("mid", 2, []), ("mid", 1, HOTSET)],
                         ids=["at-protected", "mid", "mid-2vcpu", "mid-hotset"])
def test_kill9_primary_compute_guest_continues_exact_chain(spawn: Spawner, tmp_path: Any,
                                                           when: str, vcpus: int,
                                                           extra: list[str]) -> None:
    """Primary (CLI) runs the compute guest; the standby runs in this process so the reports of
    its guest after the takeover can be checked: each (step, hash) it reports must equal the hash
    chain recomputed from the seed, and its progress must keep growing."""
    chain = Chain(str(tmp_path))
    rng = rng_from_env(f"kill9-compute-{when}-{vcpus}")
    port = free_port()
    s = StandbyThread(port, spawn.key, heartbeat_timeout=0.5)
    try:
        pr = spawn.primary("compute", port, "--vcpus", str(vcpus), *extra, memory="4M")
        require(pr.wait_event("protected", 60) is not None, pr.describe())
        if when == "mid":
            time.sleep(rng.uniform(0.3, 1.0))
        if extra:  # the batch carries the checkpoints the standby will resume from
            deadline = time.monotonic() + 10
            while not any(e.get("steady_pauses", 0) > 100 for e in pr.of("stats")):
                assert time.monotonic() < deadline, pr.of("stats")[-1:]
                time.sleep(0.05)
        assert s.output == [], "the standby's guest ran before any failover"
        pr.kill9()
        assert s.wait(lambda: s.of("failover_done") != [] or s.of("failover_impossible") != [],
                      15), s.events
        assert s.of("failover_done"), s.events
        m = s.sb.machine
        assert m is not None
        start = s.at_failover
        assert len(start) == vcpus, "failover_started was not seen"

        def reports(v: int) -> list[tuple[int, int]]:
            with s.lock:
                return [(p[1], p[2]) for _, k, p in s.output if k == "report" and p[0] == v]

        # Reports from the taken-over guest: three per vCPU, consecutive, chain-exact.
        assert s.wait(lambda: all(len(reports(v)) >= 3 for v in range(vcpus)), 30), \
            (s.output[-3:], m.progress(), m.crashed)
        for v in range(vcpus):
            got = reports(v)
            steps = [i for i, _ in got]
            # The first report is the next multiple of REPORT_EVERY after the committed step (or
            # that step itself, when the checkpoint fell between the store and the report).
            assert steps[0] % REPORT_EVERY == 0, steps[:3]
            assert start[v] <= steps[0] <= start[v] + REPORT_EVERY, (v, start[v], steps[:3])
            assert all(b - a == REPORT_EVERY for a, b in zip(steps, steps[1:])), steps[:10]
            for i, h in sorted(got[:2]):  # the chain's own values, recomputed from the seed
                assert h == chain(1, i), f"vCPU {v} at step {i}: hash {h:#x} is not the chain's"
        p1 = m.progress()
        time.sleep(0.3)
        p2 = m.progress()
        assert p2 > p1 > sum(start.values()), (start, p1, p2)
        assert m.crashed is None
    finally:
        for p in spawn.procs:
            p.end()
        s.close()


def test_kill9_primary_compute_progress_visible_from_standby_cli(spawn: Spawner) -> None:
    sport, cport = free_port(), free_port()
    sb = spawn.standby(sport, control=cport)
    pr = spawn.primary("compute", sport, memory="4M")
    require(pr.wait_event("protected", 60) is not None, pr.describe())
    time.sleep(0.2)
    pr.kill9()
    done = sb.need_event("failover_done", 15)
    time.sleep(1.5)
    st = control(cport)
    after = sb.events[sb.events.index(done) + 1:]
    visible = [e for e in after if e.get("event") in ("report", "output", "stats", "progress")]
    assert visible or "progress" in st, (sb.kinds(), st)


# --- output committed before the first consistent checkpoint ----------------------------------
def test_no_output_released_before_first_consistent_checkpoint(spawn: Spawner) -> None:
    """Clients that write from the moment the primary's port opens: every acknowledgement must
    belong to a checkpoint the standby can fail over to (>= its first consistent epoch)."""
    sb, pr, load, _ = _kv_pair(spawn, clients=4)
    require(pr.wait_event("protected", 60) is not None, pr.describe())
    prot = sb.need_event("protected", 10)
    require(load.wait_acked(50, 20), "no load")
    acked, epochs = load.finish()
    early = sorted(e for e in epochs if e < prot["epoch"])
    assert not early, (f"{len(early)} acknowledgements belong to epochs {early[:8]} before the "
                       f"standby's first consistent epoch {prot['epoch']}")


# --- manual failover ---------------------------------------------------------------------------
def test_manual_failover_standby_takes_over_and_primary_is_fenced(spawn: Spawner) -> None:
    """`dirtyring failover`: the standby resumes, sends Failover, and the primary pauses its guest
    ('fenced') and exits. (The uplink reports the Failover it read before any send error it
    hits afterwards, and the degraded loop checks ``fenced`` too: no second live copy.)"""
    sb, pr, load, ports = _kv_pair(spawn)
    assert pr.wait_event("protected", 60) is not None, pr.describe()
    assert load.wait_acked(20, 20)
    before = failover_cli(ports["ctl"], status_only=True, env=spawn.env)
    assert before["state"] == "protected" and before["consistent"] is True, before
    out = failover_cli(ports["ctl"], env=spawn.env)          # `dirtyring failover HOST:PORT`
    assert out["state"] == "failed_over", out
    assert out["committed_epoch"] >= before["committed_epoch"]
    done = sb.wait_event("failover_done", 10)
    assert done is not None and done["epoch"] == out["committed_epoch"], (done, out)
    started = sb.of("failover_started")
    assert started and "manual" in started[0]["reason"], started
    # The primary heard Failover, paused its guest and stops by itself.
    fenced = pr.wait_event("fenced", 10)
    assert fenced is not None, pr.describe()
    assert "took over" in fenced["reason"], fenced
    assert pr.wait_exit(15) == 0, pr.describe()
    # Paused and stopping: no more epochs or stats after the fence.
    after_fence = pr.events[pr.events.index(fenced) + 1:]
    assert [e for e in after_fence if e["event"] == "stats"] == [], after_fence
    assert pr.of("done") and pr.of("done")[-1]["state"] != "protected"
    # The new primary serves clients.
    load.finish()
    assert sb.wait_event("serving", 10) is not None, sb.describe()
    wait_port(ports["kv2"], 10)
    c = KvClient((HOST, ports["kv2"]), timeout=10)
    try:
        assert c.call("put", 99, 7)["status"] == "ok"
        assert c.call("get", 99)["value"] == 7
    finally:
        c.close()


def test_manual_failover_keeps_every_acknowledged_write(spawn: Spawner) -> None:
    sb, pr, load, ports = _kv_pair(spawn, clients=4)
    require(pr.wait_event("protected", 60) is not None, pr.describe())
    require(load.wait_acked(200, 30), "no load")
    out = failover_cli(ports["ctl"], env=spawn.env)
    require(out["state"] == "failed_over", str(out))
    require(pr.wait_event("fenced", 10) is not None, pr.describe())
    done = sb.need_event("failover_done", 10)
    pr.wait_exit(15)
    _check_kv_after_failover(sb, load, ports, done)


def test_fenced_primary_does_not_claim_to_run_degraded(spawn: Spawner) -> None:
    sport, cport = free_port(), free_port()
    sb = spawn.standby(sport, control=cport)
    pr = spawn.primary("compute", sport)
    require(pr.wait_event("protected", 60) is not None, pr.describe())
    require(failover_cli(cport, env=spawn.env)["state"] == "failed_over")
    require(sb.of("failover_done"), sb.describe())
    require(pr.wait_event("fenced", 10) is not None or pr.of("degraded"), pr.describe())
    pr.wait_exit(5)
    assert pr.of("degraded") == [], pr.of("degraded")
    assert all(d["state"] != "degraded" for d in pr.of("done")), pr.of("done")


# --- a stalled primary (partition-like) ---------------------------------------------------------
def test_stalled_primary_is_fenced_when_it_wakes(spawn: Spawner) -> None:
    """SIGSTOP the primary past the heartbeat timeout: the standby takes over; when the primary
    resumes it must stand down (fenced), not run on as a second live copy."""
    sport, cport = free_port(), free_port()
    sb = spawn.standby(sport, control=cport)
    pr = spawn.primary("compute", sport)
    assert pr.wait_event("protected", 60) is not None, pr.describe()
    time.sleep(0.3)
    pr.signal(signal.SIGSTOP)
    try:
        done = sb.wait_event("failover_done", 10)
        assert done is not None, sb.describe()
        assert "no frame" in sb.of("primary_lost")[0]["reason"], sb.of("primary_lost")
    finally:
        pr.signal(signal.SIGCONT)
    fenced = pr.wait_event("fenced", 10)
    assert fenced is not None, ("the resumed primary was not fenced: " + pr.describe())
    assert pr.wait_exit(15) is not None, pr.describe()
    assert control(cport)["state"] == "failed_over"


# --- graceful stop of the primary ---------------------------------------------------------------
def test_graceful_primary_stop_does_not_trigger_failover(spawn: Spawner) -> None:
    """The standby stalls (SIGSTOP, shorter than every heartbeat timeout) before the primary's
    --seconds run ends and stays stalled until the primary has exited. Flow control keeps what
    is sent but unacknowledged within the socket buffers, so the Goodbye still goes out after
    the last complete epoch; epochs held back meanwhile are never sent (their output was never
    released), and the standby commits exactly what the primary reports as sent."""
    sport, cport = free_port(), free_port()
    sb = spawn.standby(sport, control=cport, hb_timeout="10s")
    pr = spawn.primary("compute", sport, "--seconds", "2.5", memory="4M", hb_timeout="10s")
    require(pr.wait_event("protected", 60) is not None, pr.describe())
    time.sleep(1.0)
    sb.signal(signal.SIGSTOP)
    try:
        rc = pr.wait_exit(30)
    finally:
        sb.signal(signal.SIGCONT)
    require(rc == 0, pr.describe())
    require(not pr.of("degraded"), pr.describe())   # it did say goodbye, it did not lose us
    done = pr.of("done")[-1]
    lost = sb.need_event("primary_lost", 20)
    time.sleep(0.5)
    assert "goodbye" in lost["reason"], lost
    assert not sb.of("failover_started"), sb.describe()
    st = control(cport)
    assert st["state"] != "failed_over", st
    assert st["committed_epoch"] == done["sent_epoch"] > 0, (st, done)
    assert done["acked"] <= done["sent_epoch"] <= done["epoch"], done


# --- split-brain guard --------------------------------------------------------------------------
@pytest.mark.parametrize("grant", [False, True], ids=["refused", "granted"])
def test_arbiter_decides_whether_an_automatic_failover_goes_live(spawn: Spawner, tmp_path: Any,
                                                                 grant: bool) -> None:
    """`--arbiter CMD` runs before an automatic failover; only exit status 0 lets the standby go
    live. The command sees the committed epoch and the reason."""
    seen = tmp_path / "arbiter.txt"
    code = (f"import os, sys; open({str(seen)!r}, 'w').write(os.environ['DIRTYRING_EPOCH'] + "
            f"' ' + os.environ['DIRTYRING_REASON']); sys.exit({0 if grant else 3})")
    sport, cport = free_port(), free_port()
    sb = spawn.standby(sport, "--arbiter", f"{sys.executable} -c \"{code}\"", control=cport)
    pr = spawn.primary("compute", sport)
    require(pr.wait_event("protected", 60) is not None, pr.describe())
    time.sleep(0.3)
    pr.kill9()
    if grant:
        assert sb.wait_event("failover_done", 15) is not None, sb.describe()
        assert sb.of("lease_granted"), sb.describe()
    else:
        refused = sb.wait_event("failover_refused", 15)
        assert refused is not None, sb.describe()
        assert "exit status 3" in refused["detail"], refused
        time.sleep(0.5)
        assert not sb.of("failover_started"), sb.describe()
        st = control(cport)
        assert st["state"] != "failed_over" and st["consistent"], st
    epoch, _, reason = seen.read_text().partition(" ")
    assert int(epoch) == sb.of("primary_lost")[0]["committed_epoch"] > 0
    assert reason == sb.of("primary_lost")[0]["reason"]
