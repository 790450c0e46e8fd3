"""Bad peers on the standby's replication port: a wrong key, garbage, a truncated frame, a
corrupted checksum, a second primary. Each must be reported (protocol_error / rejected), must
leave the committed checkpoint alone, and must not stop the standby from following the real
primary or from failing over correctly afterwards."""
from __future__ import annotations

import os
import socket
import sys
from typing import Any

import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # repl_helpers sits beside the tests; works in any import mode
    sys.path.insert(0, _HERE)
from repl_helpers import (  # noqa: E402
    HB_CALM, HOST, PATIENCE, Proc, SlowStranger, Spawner, control, free_port, kv_missing, raw_peer,
    require, spawn, thread_count, wait_for, wait_port, wait_status, wait_threads,
)

from dirtyring.machine.config import MachineConfig  # noqa: E402
from dirtyring.wire import PROTOCOL_VERSION, Connection, Hello, HelloAck  # noqa: E402

__all__ = ["spawn"]  # the fixture, imported so pytest finds it

CONFIG = MachineConfig(guest="compute", data_slots=(4 << 20,)).to_json()


def hello_frame(key: bytes, config: bytes = CONFIG,
                version: int = PROTOCOL_VERSION) -> tuple[bytes, Connection]:
    conn = Connection("primary", key)
    return conn.send(Hello(role="primary", version=version, session_id=os.urandom(16),
                           config=config)), conn


def bad_peers(key: bytes) -> dict[str, tuple[bytes, bool, str]]:
    """name -> (bytes to send, half-close after sending, what the standby's error must say)."""
    good, _ = hello_frame(key)
    wrong_key, _ = hello_frame(os.urandom(32))
    bad_crc = bytearray(good)
    bad_crc[20] ^= 0xFF                     # the header's crc32 field (offset 20, 4 bytes)
    return {
        "wrong-key": (wrong_key, False, "authentication failed"),
        "garbage": (b"GET / HTTP/1.1\r\nHost: standby\r\n\r\n" + os.urandom(64), False,
                    "bad magic"),
        "truncated-then-eof": (good[:len(good) // 2], True, "truncated frame"),
        "corrupted-checksum": (bytes(bad_crc), False, "crc32 mismatch"),
    }


def test_bad_peers_while_standby_waits(spawn: Spawner) -> None:
    """Before any primary: each bad peer is a protocol_error naming the problem; the standby
    stays empty and waiting, and then serves the real primary and fails over normally."""
    sport, cport = free_port(), free_port()
    sb = spawn.standby(sport, control=cport, hb_timeout=HB_CALM)
    idle = thread_count(sb.pid)  # listening, no connection: each peer's thread comes and goes
    for i, (name, (data, eof, says)) in enumerate(bad_peers(spawn.key).items(), start=1):
        reply = raw_peer(sport, data, eof=eof)
        assert reply == b"", f"{name}: the standby answered {reply[:40]!r}"
        assert sb.wait_count("protocol_error", i, 10), f"{name}: no protocol_error; " \
            + sb.describe()
        err = sb.of("protocol_error")[i - 1]["error"]
        assert says in err, f"{name}: error {err!r} does not say {says!r}"
        st = control(cport)
        assert st["state"] == "waiting", (name, st)
        assert st["committed_epoch"] == 0 and st["consistent"] is False, (name, st)
        assert st["rejected"] == i, (name, st)
        assert sb.alive(), sb.describe()
        # The connection's thread reports before it returns; wait until it has returned, so the
        # next peer meets a standby that is done with this one.
        wait_threads(sb.pid, idle)
    assert not sb.of("standby_vm_created") and not sb.of("failover_impossible"), sb.describe()

    # A primary of another replication protocol (another release): refused at the handshake,
    # with the reason, rather than at the first event it sends that this standby cannot read.
    data, conn = hello_frame(spawn.key, version=PROTOCOL_VERSION - 1)
    conn.receive_data(raw_peer(sport, data))
    ack = conn.next_event()
    assert isinstance(ack, HelloAck) and ack.accepted is False, ack
    assert f"protocol {PROTOCOL_VERSION - 1}" in ack.reason and "release" in ack.reason, ack
    assert sb.wait_count("rejected", 1, 10), sb.describe()
    assert control(cport)["state"] == "waiting" and not sb.of("standby_vm_created")
    # That Hello took the single follower slot: its thread reports "rejected" before it lets go
    # of the slot, and a primary arriving in between would be refused as "already follows a
    # primary". The thread's end is the slot's release.
    wait_threads(sb.pid, idle)

    pr = spawn.primary("compute", sport, hb_timeout=HB_CALM)
    assert pr.wait_event("protected", PATIENCE) is not None, pr.describe() + sb.describe()
    # Something to take over: a consistent checkpoint past the first full epoch.
    wait_status(cport, lambda st: st["consistent"] and st["committed_epoch"] >= 2, PATIENCE)
    pr.kill9()
    done = sb.wait_event("failover_done", 15)
    assert done is not None and done["epoch"] >= 2, sb.describe()


def test_bad_peers_and_second_primary_while_following(spawn: Spawner) -> None:
    """While a primary is being followed, every other connection is refused ('rejected'); a
    second primary gets HelloAck(accepted=False) with the reason. The committed checkpoint keeps
    advancing from the real primary only, and failover afterwards keeps every acknowledged
    write."""
    ports = {"repl": free_port(), "ctl": free_port(), "kv1": free_port(), "kv2": free_port()}
    sb = spawn.standby(ports["repl"], control=ports["ctl"], serve=ports["kv2"], hb_timeout=HB_CALM)
    pr = spawn.primary("kvstore", ports["repl"], serve=ports["kv1"], hb_timeout=HB_CALM)
    load = spawn.kv_load(ports["kv1"], clients=2)
    try:
        require(pr.wait_event("protected", 60) is not None, pr.describe())
        require(load.wait_acked(20, 20), "no write acknowledged")
        before = control(ports["ctl"])
        assert before["state"] == "protected" and before["consistent"] is True, before
        n = 0
        for name, (data, eof, _) in bad_peers(spawn.key).items():
            reply = raw_peer(ports["repl"], data, eof=eof)
            # Dropped before authentication: no answer, no follower slot taken (reported as a
            # protocol_error where the bytes were malformed).
            assert reply == b"", f"{name}: the standby answered {reply[:40]!r}"

        # A second primary, by hand: a well-formed Hello with the right key.
        data, conn = hello_frame(spawn.key)
        reply = raw_peer(ports["repl"], data)
        n += 1
        conn.receive_data(reply)
        ack = conn.next_event()
        assert isinstance(ack, HelloAck), (ack, reply[:60])
        assert ack.accepted is False and "already follows a primary" in ack.reason, ack

        # A second primary, the real command: it must give up with a clear message.
        second: Proc = spawn.primary("kvstore", ports["repl"])
        rc = second.wait_exit(30)
        n += 1
        assert rc not in (None, 0), second.describe()
        assert any("refused" in line and "already follows a primary" in line
                   for line in second.stderr), second.stderr
        assert sb.wait_count("rejected", n, 10), sb.describe()

        rejected = sb.of("rejected")
        assert len(rejected) == n and all(e["reason"] for e in rejected), rejected
        after = control(ports["ctl"])
        assert after["state"] == "protected" and after["consistent"] is True, after
        assert after["committed_epoch"] > before["committed_epoch"], (before, after)
        assert after["rejected"] >= n and after["mismatches"] == 0, after
        assert not pr.of("degraded") and pr.alive(), pr.describe()
        acked_before = load.count()
        assert load.wait_acked(acked_before + 20, 20), "the real primary stopped committing"

        pr.kill9()
        done = sb.wait_event("failover_done", 15)
        assert done is not None, sb.describe()
        assert done["epoch"] >= after["committed_epoch"]
    finally:
        acked, epochs = load.finish()
    assert sb.wait_event("serving", 15) is not None, sb.describe()
    wait_port(ports["kv2"], 10)
    assert max(epochs) <= done["epoch"], (max(epochs), done)
    assert kv_missing(ports["kv2"], acked) == []


def _stranger(kind: str, port: int, key: bytes) -> None:
    if kind == "connect-and-close":
        socket.create_connection((HOST, port), timeout=5).close()
    elif kind == "silent-peer":
        raw_peer(port, b"", hold=1.0, read_reply=0.5)
    elif kind == "hello-bad-config":
        data, _ = hello_frame(key, config=b'{"guest": "no-such-guest"}')
        raw_peer(port, data)


@pytest.mark.parametrize("kind", ["connect-and-close", "silent-peer", "hello-bad-config"])
def test_stranger_does_not_kill_waiting_standby(spawn: Spawner, kind: str) -> None:
    sport, cport = free_port(), free_port()
    sb = spawn.standby(sport, control=cport, hb_timeout=HB_CALM)
    idle = thread_count(sb.pid)
    _stranger(kind, sport, spawn.key)
    wait_threads(sb.pid, idle)  # the standby is done with the stranger (its thread returned)
    assert not sb.of("failover_impossible"), sb.describe()
    assert sb.alive(), sb.describe()
    st: dict[str, Any] = control(cport)
    assert st["state"] == "waiting" and st["committed_epoch"] == 0, st
    pr = spawn.primary("compute", sport, hb_timeout=HB_CALM)
    assert pr.wait_event("protected", PATIENCE) is not None, pr.describe() + sb.describe()


def test_unauthenticated_peer_does_not_lock_out_the_real_primary(spawn: Spawner) -> None:
    """A peer that connected first and never authenticates must not keep the real primary out:
    the primary is protected while that peer is still connected, mid-frame. (A silent peer
    would not do: the standby drops it after a fixed wait, and on a slow host the primary may
    only arrive after that.)"""
    sport = free_port()
    sb = spawn.standby(sport, hb_timeout=HB_CALM)
    idle = thread_count(sb.pid)
    with SlowStranger(sport) as stranger:
        # The standby accepted the stranger and is reading its frame on a thread of its own.
        assert wait_for(lambda: thread_count(sb.pid) > idle), sb.describe()
        pr = spawn.primary("compute", sport, hb_timeout=HB_CALM)
        ok = pr.wait_event("protected", PATIENCE)
        refused = [line for line in pr.stderr if "refused" in line]
        assert ok is not None, f"real primary turned away: {refused or pr.describe()}"
        assert not stranger.dropped(), "the standby dropped the stranger before the primary " \
            "got in: this run does not show that a stranger cannot lock the primary out"
        assert not sb.of("rejected"), sb.describe()
    assert sb.alive()
