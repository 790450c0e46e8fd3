"""The kvstore guest behind the paravirtual KV device: PUT/GET semantics, ring wrap with a host-side
queue, refusal of bad requests, a full table, and a table that survives capture/restore."""
from __future__ import annotations

import collections
import time
from typing import Any

import numpy as np
import pytest

from dirtyring._bindings import _uapi as U
from dirtyring.guests.protocol import (KV_BAD_OP, KV_FULL, KV_GET, KV_HEADER_OFFSETS,
                                       KV_NOT_FOUND, KV_OK, KV_PUT, KV_RING, GuestParams)
from dirtyring.machine import layout
from dirtyring.machine.config import MachineConfig
from dirtyring.machine.devices.kv import KvRequest, KvResponse
from dirtyring.machine.vm import Machine

MiB = 1 << 20
M64 = (1 << 64) - 1


def kv_config(**kw: Any) -> MachineConfig:
    kw.setdefault("tracker", "none")
    kw.setdefault("data_slots", (MiB,))
    return MachineConfig(guest="kvstore", params=GuestParams(), **kw)


def boot(machines: list[Machine], cfg: MachineConfig) -> Machine:
    m = Machine(cfg)
    machines.append(m)
    return m


def responses(m: Machine) -> list[KvResponse]:
    return [p for k, p in m.outputs if k == "kv"]


def wait_responses(m: Machine, n: int, timeout: float = 30.0) -> list[KvResponse]:
    deadline = time.monotonic() + timeout
    while len(responses(m)) < n:
        m.check()
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(responses(m))} of {n} kv responses after {timeout} s")
        time.sleep(0.002)
    return responses(m)


def wait_in_doorbell(m: Machine, timeout: float = 30.0) -> None:
    """Wait until vCPU 0 (the server) is back in the doorbell with nothing to do.

    Call it once every response the test waits for is in: the server's last exit was then its
    ``out PORT_KV_DONE``, and the only exit it makes next is the ``in PORT_KV_WAIT`` of the
    doorbell (which the device keeps answering "nothing new" while the ring is empty). So one
    more I/O exit is the event itself, on any host, instead of a sleep that guesses how long the
    guest takes to get there.
    """
    r = m.runners[0]
    seen = r.exits[U.KVM_EXIT_IO]
    deadline = time.monotonic() + timeout
    while r.exits[U.KVM_EXIT_IO] == seen:
        m.check()
        if time.monotonic() > deadline:
            raise AssertionError(f"vCPU 0 made no I/O exit in {timeout} s after its last response")
        time.sleep(0.001)


class Client:
    """Submits requests with fresh ids and waits for their responses, in order."""

    def __init__(self, m: Machine, first_id: int = 1) -> None:
        self.m = m
        self.next_id = first_id

    def submit(self, op: int, key: int, value: int = 0) -> int:
        rid = self.next_id
        self.next_id += 1
        self.m.kv.submit(KvRequest(id=rid, op=op, key=key, value=value))
        return rid

    def call(self, ops: list[tuple[int, int, int]]) -> list[KvResponse]:
        have = len(responses(self.m))
        ids = [self.submit(*op) for op in ops]
        got = wait_responses(self.m, have + len(ops))[have:]
        assert [r.id for r in got] == ids  # one response per request, in order
        return got

    def put(self, key: int, value: int) -> KvResponse:
        return self.call([(KV_PUT, key, value)])[0]

    def get(self, key: int) -> KvResponse:
        return self.call([(KV_GET, key, 0)])[0]


def header(m: Machine) -> dict[str, int]:
    assert m.memory is not None
    return {k: m.memory.read_u64(layout.QUEUE_GPA + off) for k, off in KV_HEADER_OFFSETS.items()}


# --- tests ----------------------------------------------------------------------------------------
def test_put_get_not_found_and_overwrite(machines: list[Machine]) -> None:
    m = boot(machines, kv_config())
    c = Client(m)
    r = c.put(42, 4200)
    assert (r.status, r.key, r.value) == (KV_OK, 42, 4200)
    r = c.get(42)
    assert (r.status, r.key, r.value) == (KV_OK, 42, 4200)
    r = c.get(43)
    assert (r.status, r.key, r.value) == (KV_NOT_FOUND, 43, 0)
    r = c.put(42, 17)  # overwrite
    assert (r.status, r.value) == (KV_OK, 17)
    assert c.get(42).value == 17
    # Extreme keys and values, value 0 is a value like any other.
    for key, value in [(1, 0), (M64, M64), (1 << 63, 12345)]:
        assert c.put(key, value).status == KV_OK
    for key, value in [(1, 0), (M64, M64), (1 << 63, 12345)]:
        r = c.get(key)
        assert (r.status, r.key, r.value) == (KV_OK, key, value)
    assert c.get(42).value == 17
    assert m.crashed is None and not m.finished
    assert m.kv.submitted == m.kv.completed == c.next_id - 1
    assert m.status(0, "progress") == c.next_id - 1


def test_more_requests_in_flight_than_the_ring_holds(machines: list[Machine]) -> None:
    m = boot(machines, kv_config())
    c = Client(m)
    n = 8 * KV_RING + 37
    keys = [(k * 0x9E3779B97F4A7C15) & M64 or 1 for k in range(1, n + 1)]
    puts = c.call([(KV_PUT, k, i) for i, k in enumerate(keys)])
    assert all(r.status == KV_OK for r in puts)
    gets = c.call([(KV_GET, k, 0) for k in keys] + [(KV_GET, 5, 0)])
    assert [(r.status, r.key, r.value) for r in gets[:-1]] == \
        [(KV_OK, k, i) for i, k in enumerate(keys)]
    assert gets[-1].status == KV_NOT_FOUND
    total = 2 * n + 1
    h = header(m)
    assert h == {"req_prod": total, "req_cons": total, "resp_prod": total, "resp_cons": total}
    assert m.kv.submitted == m.kv.completed == total
    assert len(m.kv._pending) == 0


def test_interleaved_overwrites_keep_the_last_value(machines: list[Machine]) -> None:
    m = boot(machines, kv_config())
    c = Client(m)
    ops = []
    for rnd in range(5):
        ops += [(KV_PUT, key, rnd * 1000 + key) for key in range(1, 60)]
        ops += [(KV_GET, key, 0) for key in range(1, 60, 7)]
    got = c.call(ops)
    # Each GET sees the PUT of its own round (requests are served in order).
    for op, r in zip(ops, got):
        assert r.status == KV_OK
        if op[0] == KV_GET:
            rnd = (r.value - r.key) // 1000
            assert r.value == rnd * 1000 + r.key
    final = c.call([(KV_GET, key, 0) for key in range(1, 60)])
    assert [r.value for r in final] == [4000 + key for key in range(1, 60)]


def test_bad_requests(machines: list[Machine]) -> None:
    with pytest.raises(ValueError):
        KvRequest(id=1, op=KV_PUT, key=0, value=1)
    m = boot(machines, kv_config())
    c = Client(m)
    assert c.put(9, 90).status == KV_OK
    # Smuggle requests past KvRequest's checks: the guest must refuse them itself.
    bad_key = KvRequest(id=500, op=KV_PUT, key=9, value=1)
    object.__setattr__(bad_key, "key", 0)
    bad_op = KvRequest(id=501, op=KV_GET, key=9)
    object.__setattr__(bad_op, "op", 7)
    have = len(responses(m))
    m.kv.submit(bad_key)
    m.kv.submit(bad_op)
    r1, r2 = wait_responses(m, have + 2)[have:]
    assert (r1.id, r1.status, r1.value) == (500, KV_BAD_OP, 0)
    assert (r2.id, r2.status, r2.value) == (501, KV_BAD_OP, 0)
    # Nothing changed, and the device goes on serving.
    assert c.get(9).value == 90
    assert c.get(0xABC).status == KV_NOT_FOUND


def test_full_table(machines: list[Machine]) -> None:
    """One data page holds 4096 / 16 = 256 slots."""
    m = boot(machines, kv_config(data_slots=(layout.PAGE,)))
    c = Client(m)
    cap = layout.PAGE // 16
    puts = c.call([(KV_PUT, k, k * 2) for k in range(1, cap + 1)])
    assert all(r.status == KV_OK for r in puts)
    r = c.put(cap + 1, 1)
    assert (r.status, r.value) == (KV_FULL, 0)
    assert c.get(cap + 1).status == KV_NOT_FOUND
    assert c.put(7, 777).status == KV_OK  # overwriting still works
    got = c.call([(KV_GET, k, 0) for k in range(1, cap + 1)])
    assert [r.value for r in got] == [777 if k == 7 else k * 2 for k in range(1, cap + 1)]


def test_stop_finishes_an_idle_guest(machines: list[Machine]) -> None:
    m = boot(machines, kv_config())
    c = Client(m)
    assert c.put(1, 2).status == KV_OK
    wait_in_doorbell(m)  # idle there: only the stop field (and its wake) can end it
    assert not m.finished
    m.stop_guest()
    assert m.wait_stopped(30.0)
    assert m.crashed is None
    assert m.finished and m.runners[0].exit_code == 0


def test_table_survives_capture_and_restore(machines: list[Machine]) -> None:
    m1 = boot(machines, kv_config(tracker="ring"))
    c1 = Client(m1)
    keys = list(range(1000, 1300))
    assert all(r.status == KV_OK for r in c1.call([(KV_PUT, k, k ^ 0x5A5A) for k in keys]))
    m1.pause_all()
    # Requests submitted while paused wait in the host-side queue: part of the device state.
    queued = [c1.submit(KV_GET, k) for k in (1000, 1001, 99)]
    state = m1.capture_state()
    assert m1.memory is not None
    memory = [s.view.copy() for s in m1.memory.slots]

    m2 = Machine(MachineConfig.from_json(state.config), boot=False)
    machines.append(m2)
    assert m2.memory is not None
    for s, a in zip(m2.memory.slots, memory):
        s.view[:] = a
    m2.restore_state(state)
    m2.resume_all()
    got = wait_responses(m2, len(queued))
    assert [(r.id, r.status, r.value) for r in got] == \
        [(queued[0], KV_OK, 1000 ^ 0x5A5A), (queued[1], KV_OK, 1001 ^ 0x5A5A),
         (queued[2], KV_NOT_FOUND, 0)]
    c2 = Client(m2, first_id=c1.next_id)
    gets = c2.call([(KV_GET, k, 0) for k in keys])
    assert [(r.status, r.value) for r in gets] == [(KV_OK, k ^ 0x5A5A) for k in keys]
    # The restored table takes new writes like the original would.
    assert c2.put(5000, 1).status == KV_OK and c2.get(5000).value == 1
    assert m2.crashed is None
    # The original, resumed, answers its queued requests the same way.
    m1.resume_all()
    got1 = [r for r in wait_responses(m1, len(keys) + len(queued)) if r.id in queued]
    assert [(r.id, r.status, r.value) for r in got1] == [(r.id, r.status, r.value) for r in got]


def test_restored_table_memory_is_identical(machines: list[Machine]) -> None:
    """The table lives in the data slot: after restore it is byte-for-byte the captured one."""
    m1 = boot(machines, kv_config())
    c1 = Client(m1)
    c1.call([(KV_PUT, k, k * k) for k in range(1, 200)])
    m1.pause_all()
    assert m1.memory is not None
    table = m1.memory.slots[1].view.copy()
    assert np.count_nonzero(table.view(np.uint64)[0::2]) == 199  # 199 occupied slots
    state = m1.capture_state()
    m2 = Machine(MachineConfig.from_json(state.config), boot=False)
    machines.append(m2)
    assert m2.memory is not None
    for s, a in zip(m2.memory.slots, m1.memory.slots):
        s.view[:] = a.view
    m2.restore_state(state)
    m2.resume_all()
    c2 = Client(m2, first_id=c1.next_id)
    assert [r.value for r in c2.call([(KV_GET, k, 0) for k in range(1, 200)])] == \
        [k * k for k in range(1, 200)]
    m2.pause_all()
    assert np.array_equal(m2.memory.slots[1].view, table)  # GETs do not write the table


def test_two_vcpus_answer_each_request_once(machines: list[Machine]) -> None:
    """Regression: every vCPU used to serve the one request ring unsynchronised, so req_cons
    overtook req_prod and both vCPUs spun on garbage (seen: req_prod 512, req_cons 216506793).
    A 64 MiB table makes most PUTs touch a fresh page, which slows a pass over the ring enough
    for a second server to collide; bursts of 2 rings' worth exposed it every time.

    Each burst waits for its answers and for the server to be idle in the doorbell again (the
    events themselves, however slow the host); the guest is then stopped, so every response it
    will ever send, duplicates included, is in before the counts are checked."""
    m = boot(machines, kv_config(vcpus=2, data_slots=(64 * MiB,)))
    n = 0
    for _ in range(20):
        for _ in range(2 * KV_RING):
            m.kv.submit(KvRequest(id=n, op=KV_PUT, key=n + 1, value=n))
            n += 1
        wait_responses(m, n)
        wait_in_doorbell(m)  # idle before the next burst, as in the regression
    m.stop_guest()
    assert m.wait_stopped(30.0), "the guest did not finish after the stop field"
    ids = collections.Counter(r.id for r in responses(m))
    assert m.crashed is None
    assert sorted(ids) == list(range(n)), f"{n - len(ids)} of {n} requests never answered"
    assert max(ids.values()) == 1, f"{sum(v > 1 for v in ids.values())} answered twice"
    assert m.status(0, "progress") == n
    assert m.status(1, "progress") == 0  # vCPU 1 does not serve the queue
