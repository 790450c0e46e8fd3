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
    HB_CALM, HB_DETECT, HOST, PATIENCE, Chain, KvLoad, Spawner, StandbyThread, control,
    failover_cli, free_port, kv_missing, kv_value, require, rng_from_env, spawn, wait_for,
    wait_port, wait_status,
)

from dirtyring.replication.kvservice import KvClient  # noqa: E402

__all__ = ["spawn"]  # the fixture, imported so pytest finds it

REPORT_EVERY = 100_000  # GuestParams.report_every default: the compute guest reports this often


def _kv_pair(spawn: Spawner, *extra: str,
             clients: int = 3) -> tuple[Any, Any, KvLoad, dict[str, int]]:
    ports = {"repl": free_port(), "ctl": free_port(), "kv1": free_port(), "kv2": free_port()}
    sb = spawn.standby(ports["repl"], control=ports["ctl"], serve=ports["kv2"], hb_timeout=HB_CALM)
    pr = spawn.primary("kvstore", ports["repl"], *extra, serve=ports["kv1"], hb_timeout=HB_CALM)
    load = spawn.kv_load(ports["kv1"], clients=clients)
    return sb, pr, load, ports


def _check_kv_after_failover(sb: Any, load: KvLoad, ports: dict[str, int],
                             done: dict[str, Any]) -> tuple[dict[int, int], list[int]]:
    """The standby serves, has every acknowledged write, released nothing uncommitted, and its
    guest still takes new writes."""
    acked, epochs = load.finish()
    committed = int(done["epoch"])
    assert sb.wait_event("serving", PATIENCE) is not None, sb.describe()
    wait_port(ports["kv2"], PATIENCE)
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
#: When the primary dies, counted from the first write acknowledged to a client: at once, a few
#: ms later, or after a second or so of load.
KILL_POINTS = ["at-first-ack", "early", "early", "mid", "mid", "mid-hotset"]


@pytest.mark.slow
@pytest.mark.parametrize("run", range(len(KILL_POINTS)),
                         ids=[f"{i}-{p}" for i, p in enumerate(KILL_POINTS)])
def test_kill9_primary_kvstore_no_acknowledged_write_lost(spawn: Spawner, run: int) -> None:
    """Every kill point comes after a write was acknowledged (waited for, however long that
    takes): "no acknowledged write lost" must be about real acknowledgements, never an empty
    set."""
    point, _, variant = KILL_POINTS[run].partition("-hot")
    rng = rng_from_env(f"kill9-kv-{run}")
    delay = {"at-first-ack": 0.0, "early": rng.uniform(0.005, 0.15),
             "mid": rng.uniform(0.4, 1.5)}[point]
    sb, pr, load, ports = _kv_pair(spawn, *(HOTSET if variant else []))
    assert pr.wait_event("protected", PATIENCE) is not None, \
        ([e["reason"] for e in pr.of("degraded")], sb.of("primary_lost"), pr.describe())
    assert load.wait_acked(1, PATIENCE), ("no write acknowledged while protected",
                                          pr.describe())
    if delay:
        time.sleep(delay)  # the kill point (a schedule, not a synchronisation)
    pr.kill9()
    done = sb.wait_event("failover_done", PATIENCE)
    assert done is not None, sb.describe()
    assert not sb.of("failover_impossible")
    lost = sb.of("primary_lost")
    assert lost and lost[0]["committed_epoch"] == done["epoch"], (lost, done)
    assert done["epoch"] >= 2  # at least the first consistent checkpoint
    st = control(ports["ctl"])
    assert st["state"] == "failed_over" and st["committed_epoch"] == done["epoch"], st
    acked, _ = _check_kv_after_failover(sb, load, ports, done)
    print(f"{point}: killed {delay * 1e3:.0f} ms after the first acknowledgement; committed "
          f"epoch {done['epoch']}; {len(acked)} acknowledged writes all present")
    assert acked, "no acknowledged write: the check above proved nothing"


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
    s = StandbyThread(port, spawn.key, heartbeat_timeout=float(HB_CALM[:-1]))
    try:
        pr = spawn.primary("compute", port, "--vcpus", str(vcpus), *extra, memory="4M",
                           hb_timeout=HB_CALM)
        require(pr.wait_event("protected", PATIENCE) is not None, pr.describe())
        if when == "mid":
            time.sleep(rng.uniform(0.3, 1.0))
        if extra:  # the batch carries the checkpoints the standby will resume from
            assert wait_for(lambda: any(e.get("steady_pauses", 0) > 100
                                        for e in pr.of("stats")), PATIENCE), \
                (pr.of("stats")[-1:], pr.describe())
        assert s.output == [], "the standby's guest ran before any failover"
        pr.kill9()
        assert s.wait(lambda: s.of("failover_done") != [] or s.of("failover_impossible") != [],
                      PATIENCE), s.events
        assert s.of("failover_done"), s.events
        m = s.sb.machine
        assert m is not None
        start = s.at_failover
        assert len(start) == vcpus, "failover_started was not seen"

        def reports(v: int) -> list[tuple[int, int]]:
            with s.lock:
                return [(p[1], p[2]) for _, k, p in s.output if k == "report" and p[0] == v]

        # Reports from the taken-over guest: three per vCPU, consecutive, chain-exact.
        assert s.wait(lambda: all(len(reports(v)) >= 3 for v in range(vcpus)), PATIENCE), \
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
        assert p1 > sum(start.values()), (start, p1)
        assert wait_for(lambda: m.progress() > p1), (p1, m.progress(), m.crashed)
        assert m.crashed is None
    finally:
        for p in spawn.procs:
            p.end()
        s.close()


def test_kill9_primary_compute_progress_visible_from_standby_cli(spawn: Spawner) -> None:
    """After a kill -9 failover, the taken-over guest's progress shows through the standby's
    CLI: the control port's status carries a guest_progress that grows, and the guest's
    reports come out as events with growing steps (its guest never ran before the failover)."""
    sport, cport = free_port(), free_port()
    sb = spawn.standby(sport, control=cport, hb_timeout=HB_CALM)
    pr = spawn.primary("compute", sport, memory="4M", hb_timeout=HB_CALM)
    require(pr.wait_event("protected", PATIENCE) is not None, pr.describe())
    wait_status(cport, lambda st: st["consistent"], PATIENCE)
    require(not sb.of("report"), sb.describe())
    pr.kill9()
    sb.need_event("failover_done", PATIENCE)
    first = wait_status(cport, lambda st: st["state"] == "failed_over", PATIENCE)
    wait_status(cport, lambda st: st["guest_progress"] > first["guest_progress"], PATIENCE)
    assert sb.wait_count("report", 2, PATIENCE), sb.describe()
    steps = [e["step"] for e in sb.of("report")]
    assert steps[1] > steps[0] > 0, steps


# --- output committed before the first consistent checkpoint ----------------------------------
def test_no_output_released_before_first_consistent_checkpoint(spawn: Spawner) -> None:
    """Clients that write from the moment the primary's port opens: every acknowledgement must
    belong to a checkpoint the standby can fail over to (>= its first consistent epoch)."""
    sb, pr, load, _ = _kv_pair(spawn, clients=4)
    require(pr.wait_event("protected", PATIENCE) is not None, pr.describe())
    prot = sb.need_event("protected", PATIENCE)
    require(load.wait_acked(50, PATIENCE), "no load")
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
    assert pr.wait_event("protected", PATIENCE) is not None, pr.describe()
    assert load.wait_acked(20, PATIENCE)
    before = failover_cli(ports["ctl"], status_only=True, env=spawn.env)
    assert before["state"] == "protected" and before["consistent"] is True, before
    out = failover_cli(ports["ctl"], env=spawn.env)          # `dirtyring failover HOST:PORT`
    assert out["state"] == "failed_over", out
    assert out["committed_epoch"] >= before["committed_epoch"]
    done = sb.wait_event("failover_done", PATIENCE)
    assert done is not None and done["epoch"] == out["committed_epoch"], (done, out)
    started = sb.of("failover_started")
    assert started and "manual" in started[0]["reason"], started
    # The primary heard Failover, paused its guest and stops by itself.
    fenced = pr.wait_event("fenced", PATIENCE)
    assert fenced is not None, pr.describe()
    assert "took over" in fenced["reason"], fenced
    assert pr.wait_exit(PATIENCE) == 0, pr.describe()
    # Paused and stopping: no more epochs or stats after the fence.
    after_fence = pr.events[pr.events.index(fenced) + 1:]
    assert [e for e in after_fence if e["event"] == "stats"] == [], after_fence
    assert pr.of("done") and pr.of("done")[-1]["state"] != "protected"
    # The new primary serves clients.
    load.finish()
    assert sb.wait_event("serving", PATIENCE) is not None, sb.describe()
    wait_port(ports["kv2"], PATIENCE)
    c = KvClient((HOST, ports["kv2"]), timeout=10)
    try:
        assert c.call("put", 99, 7)["status"] == "ok"
        assert c.call("get", 99)["value"] == 7
    finally:
        c.close()


def test_manual_failover_keeps_every_acknowledged_write(spawn: Spawner) -> None:
    sb, pr, load, ports = _kv_pair(spawn, clients=4)
    require(pr.wait_event("protected", PATIENCE) is not None, pr.describe())
    require(load.wait_acked(200, PATIENCE), "no load")
    out = failover_cli(ports["ctl"], env=spawn.env)
    require(out["state"] == "failed_over", str(out))
    require(pr.wait_event("fenced", PATIENCE) is not None, pr.describe())
    done = sb.need_event("failover_done", PATIENCE)
    pr.wait_exit(PATIENCE)
    _check_kv_after_failover(sb, load, ports, done)


def test_fenced_primary_does_not_claim_to_run_degraded(spawn: Spawner) -> None:
    sport, cport = free_port(), free_port()
    sb = spawn.standby(sport, control=cport, hb_timeout=HB_CALM)
    pr = spawn.primary("compute", sport, hb_timeout=HB_CALM)
    require(pr.wait_event("protected", PATIENCE) is not None, pr.describe())
    require(failover_cli(cport, env=spawn.env)["state"] == "failed_over")
    require(sb.of("failover_done"), sb.describe())
    require(pr.wait_event("fenced", PATIENCE) is not None or pr.of("degraded"), pr.describe())
    pr.wait_exit(5)
    assert pr.of("degraded") == [], pr.of("degraded")
    assert all(d["state"] != "degraded" for d in pr.of("done")), pr.of("done")


# --- a stalled primary (partition-like) ---------------------------------------------------------
def test_stalled_primary_is_fenced_when_it_wakes(spawn: Spawner) -> None:
    """SIGSTOP the primary past the heartbeat timeout: the standby takes over; when the primary
    resumes it must stand down (fenced), not run on as a second live copy."""
    sport, cport = free_port(), free_port()
    sb = spawn.standby(sport, control=cport, hb_timeout=HB_DETECT)
    pr = spawn.primary("compute", sport, hb_timeout=HB_CALM)
    assert pr.wait_event("protected", PATIENCE) is not None, pr.describe()
    wait_status(cport, lambda st: st["consistent"], PATIENCE)
    pr.signal(signal.SIGSTOP)
    try:
        done = sb.wait_event("failover_done", PATIENCE)
        assert done is not None, sb.describe()
        assert "no frame" in sb.of("primary_lost")[0]["reason"], sb.of("primary_lost")
    finally:
        pr.signal(signal.SIGCONT)
    fenced = pr.wait_event("fenced", PATIENCE)
    assert fenced is not None, ("the resumed primary was not fenced: " + pr.describe())
    assert pr.wait_exit(PATIENCE) is not None, pr.describe()
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
    require(pr.wait_event("protected", PATIENCE) is not None, pr.describe())
    time.sleep(1.0)
    sb.signal(signal.SIGSTOP)
    try:
        rc = pr.wait_exit(30)
    finally:
        sb.signal(signal.SIGCONT)
    require(rc == 0, pr.describe())
    require(not pr.of("degraded"), pr.describe())   # it did say goodbye, it did not lose us
    done = pr.of("done")[-1]
    lost = sb.need_event("primary_lost", PATIENCE)
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
    sb = spawn.standby(sport, "--arbiter", f"{sys.executable} -c \"{code}\"", control=cport,
                       hb_timeout=HB_CALM)
    pr = spawn.primary("compute", sport, hb_timeout=HB_CALM)
    require(pr.wait_event("protected", PATIENCE) is not None, pr.describe())
    wait_status(cport, lambda st: st["consistent"], PATIENCE)
    pr.kill9()
    if grant:
        assert sb.wait_event("failover_done", PATIENCE) is not None, sb.describe()
        assert sb.of("lease_granted"), sb.describe()
    else:
        refused = sb.wait_event("failover_refused", PATIENCE)
        assert refused is not None, sb.describe()
        assert "exit status 3" in refused["detail"], refused
        # What it did about the refusal: it says it waits on.
        assert sb.wait_event("waiting", PATIENCE, start=sb.events.index(refused)) is not None, \
            sb.describe()
        assert not sb.of("failover_started"), sb.describe()
        st = control(cport)
        assert st["state"] != "failed_over" and st["consistent"], st
    epoch, _, reason = seen.read_text().partition(" ")
    assert int(epoch) == sb.of("primary_lost")[0]["committed_epoch"] > 0
    assert reason == sb.of("primary_lost")[0]["reason"]
