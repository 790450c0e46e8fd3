"""Re-protection after failover (`dirtyring standby --reprotect HOST:PORT`), on real KVM over
loopback: the primary dies, standby A takes over and protects the guest with standby B; then A
dies too and B takes over. Every key-value write any client saw acknowledged, by the first
primary or by A, must be in B's guest, and A must not have released an acknowledgement before
B had committed its epoch."""
from __future__ import annotations

import os
import sys

import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # repl_helpers sits beside the tests; works in any import mode
    sys.path.insert(0, _HERE)
from repl_helpers import (  # noqa: E402
    Spawner, addr, control, free_port, kv_missing, require, spawn, wait_port,
)

__all__ = ["spawn"]  # the fixture, imported so pytest finds it


@pytest.mark.slow
def test_standby_that_took_over_reprotects_and_its_standby_keeps_every_write(
        spawn: Spawner) -> None:
    ports = {k: free_port() for k in ("a", "b", "kv1", "kv2", "kv3", "ctl")}
    b = spawn.standby(ports["b"], serve=ports["kv3"])
    a = spawn.standby(ports["a"], "--reprotect", addr(ports["b"]), serve=ports["kv2"],
                      control=ports["ctl"])
    assert control(ports["ctl"])["reprotect"] is None  # still only a standby
    p = spawn.primary("kvstore", ports["a"], serve=ports["kv1"])
    p.need_event("protected", 30)
    load1 = spawn.kv_load(ports["kv1"])
    require(load1.wait_acked(200, 20), "no write acknowledged by the first primary")
    p.kill9()
    acked1, _ = load1.finish()

    a.need_event("failover_done", 15)
    after = a.mark()
    assert a.wait_event("reprotect_started", 30, start=after) is not None, a.describe()
    prot = a.wait_event("protected", 30, start=after)
    assert prot is not None, "A never got protected by B: " + a.describe()
    assert b.wait_event("protected", 10) is not None, b.describe()
    st = control(ports["ctl"])
    assert st["state"] == "failed_over" and st["reprotect"]["state"] == "protected", st
    assert st["reprotect"]["standby"] == addr(ports["b"]), st
    wait_port(ports["kv2"], 10)
    missing = kv_missing(ports["kv2"], acked1)
    assert not missing, f"A lost {len(missing)} writes the first primary acknowledged"

    load2 = spawn.kv_load(ports["kv2"])
    require(load2.wait_acked(200, 20), "no write acknowledged by the re-protected guest")
    a.kill9()
    acked2, epochs2 = load2.finish()

    done = b.need_event("failover_done", 15)
    committed = int(done["epoch"])
    too_new = sorted(e for e in epochs2 if e > committed)
    assert not too_new, (f"A released {len(too_new)} acknowledgements of epochs {too_new[:5]} "
                         f"that B had not committed (B resumed from epoch {committed})")
    assert b.wait_event("serving", 15) is not None, b.describe()
    wait_port(ports["kv3"], 10)
    missing = kv_missing(ports["kv3"], {**acked1, **acked2})
    assert not missing, (f"B lost {len(missing)} of {len(acked1) + len(acked2)} acknowledged "
                         f"writes (keys {missing[:10]})")
    assert not load1.bad and not load2.bad, (load1.bad + load2.bad)[:5]


@pytest.mark.slow
def test_reprotect_waits_for_a_late_standby_and_runs_the_guest_meanwhile(spawn: Spawner) -> None:
    ports = {k: free_port() for k in ("a", "b", "kv2")}
    a = spawn.standby(ports["a"], "--reprotect", addr(ports["b"]), serve=ports["kv2"])
    p = spawn.primary("dirtier", ports["a"], "--pattern", "hot")
    p.need_event("protected", 30)
    p.kill9()
    a.need_event("failover_done", 15)
    waiting = a.wait_event("reprotect_waiting", 15)
    assert waiting is not None and "cannot connect" in waiting["reason"], a.describe()
    b = spawn.standby(ports["b"])  # the new standby comes up only now
    after = a.mark()
    assert a.wait_event("protected", 30, start=after) is not None, a.describe()
    assert b.wait_event("protected", 10) is not None, b.describe()
    assert a.alive(), a.describe()
