"""The key-value front end's decisions, without KVM: a fake device stands in for the guest (it
keeps the table in a dict), the service and its clients are real, over loopback.

- an answer leaves only when its output is released (output commit), once, to the client that
  asked, with the client's own id and the epoch it was released for;
- a malformed request is answered with an error and the connection stays usable;
- ``missing_writes`` names exactly the keys whose acknowledged value is not served.
"""
from __future__ import annotations

import json
import select
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from dirtyring.guests.protocol import KV_GET, KV_PUT
from dirtyring.machine.devices import KvRequest, KvResponse
from dirtyring.replication.kvservice import KvClient, KvService, missing_writes

OK, NOT_FOUND = 0, 1


class FakeDevice:
    """The guest's table in a dict. With ``hold``, answers wait for :meth:`answer_all` (as
    output waits for the standby's ack); otherwise they are released at once, for ``epoch``."""

    def __init__(self, hold: bool = False) -> None:
        self.svc: KvService | None = None
        self.table: dict[int, int] = {}
        self.hold = hold
        self.epoch = 3
        self.pending: list[KvResponse] = []
        self.submitted: list[KvRequest] = []
        self.cv = threading.Condition()

    def submit(self, req: KvRequest) -> None:
        if req.op == KV_PUT:
            self.table[req.key] = req.value
            resp = KvResponse(id=req.id, status=OK, key=req.key, value=req.value)
        else:
            assert req.op == KV_GET
            v = self.table.get(req.key)
            resp = KvResponse(id=req.id, status=OK if v is not None else NOT_FOUND,
                              key=req.key, value=v or 0)
        with self.cv:
            self.submitted.append(req)
            self.cv.notify_all()
        if self.hold:
            self.pending.append(resp)
        else:
            assert self.svc is not None
            self.svc.release("kv", resp, self.epoch)

    def wait_submitted(self, n: int) -> None:
        with self.cv:
            assert self.cv.wait_for(lambda: len(self.submitted) >= n, 30)

    def answer_all(self, epoch: int) -> list[KvResponse]:
        assert self.svc is not None
        out, self.pending = self.pending, []
        for r in out:
            self.svc.release("kv", r, epoch)
        return out


@pytest.fixture
def service() -> Iterator[Any]:
    made: list[tuple[KvService, list[KvClient]]] = []

    def make(hold: bool = False) -> tuple[FakeDevice, KvService, Any]:
        dev = FakeDevice(hold)
        svc = KvService(dev, ("127.0.0.1", 0))  # type: ignore[arg-type]
        dev.svc = svc
        clients: list[KvClient] = []
        made.append((svc, clients))
        addr = svc._sock.getsockname()

        def client() -> KvClient:
            c = KvClient(addr, timeout=30)
            clients.append(c)
            return c
        return dev, svc, client

    yield make
    for svc, clients in made:
        for c in clients:
            c.close()
        svc.close()


def nothing_to_read(c: KvClient) -> bool:
    """No answer has arrived (none can: the service writes only on release)."""
    r, _, _ = select.select([c.sock], [], [], 0.2)
    return not r and not c._buf


def test_put_then_get_round_trip_carries_the_clients_id_and_the_epoch(service: Any) -> None:
    dev, _, client = service()
    c = client()
    c.send({"id": "mine-1", "op": "put", "key": 5, "value": 77})
    assert c.recv() == {"id": "mine-1", "status": "ok", "key": 5, "value": 77, "epoch": 3}
    dev.epoch = 4
    c.send({"id": [1, 2], "op": "get", "key": 5})
    assert c.recv() == {"id": [1, 2], "status": "ok", "key": 5, "value": 77, "epoch": 4}
    r = c.call("get", 6)
    assert r["status"] == "not_found" and r["key"] == 6


def test_an_answer_leaves_only_when_released_and_only_once(service: Any) -> None:
    dev, svc, client = service(hold=True)
    c = client()
    c.send({"id": 1, "op": "put", "key": 9, "value": 1})
    dev.wait_submitted(1)
    assert nothing_to_read(c)  # executed by the guest, but not released
    # Other kinds of output and unknown ids go nowhere.
    svc.release("console", "hello", 5)
    svc.release("kv", KvResponse(id=999, status=OK, key=1, value=1), 5)
    assert nothing_to_read(c)
    (resp,) = dev.answer_all(epoch=8)
    assert c.recv() == {"id": 1, "status": "ok", "key": 9, "value": 1, "epoch": 8}
    svc.release("kv", resp, 9)  # released twice: delivered once
    c.send({"id": 2, "op": "get", "key": 9})
    dev.wait_submitted(2)
    dev.answer_all(epoch=10)
    assert c.recv()["id"] == 2


def test_answers_go_to_the_client_that_asked(service: Any) -> None:
    dev, _, client = service(hold=True)
    a, b = client(), client()
    a.send({"id": "a", "op": "put", "key": 1, "value": 10})
    dev.wait_submitted(1)
    b.send({"id": "b", "op": "put", "key": 2, "value": 20})
    dev.wait_submitted(2)
    dev.answer_all(epoch=5)
    ra, rb = a.recv(), b.recv()
    assert (ra["id"], ra["key"], rb["id"], rb["key"]) == ("a", 1, "b", 2)


@pytest.mark.parametrize("line", [
    b"this is not json",
    json.dumps({"id": 7, "op": "delete", "key": 1}).encode(),
    json.dumps({"id": 7, "op": "put"}).encode(),
    json.dumps({"id": 7, "op": "put", "key": 0, "value": 1}).encode(),
    json.dumps({"id": 7, "op": "put", "key": 1, "value": -1}).encode(),
    json.dumps({"id": 7, "op": "get", "key": "x"}).encode(),
    json.dumps([1, 2]).encode(),
], ids=["not-json", "unknown-op", "no-key", "key-0", "negative-value", "key-not-int",
        "not-an-object"])
def test_a_bad_request_gets_an_error_and_the_connection_stays_usable(
        service: Any, line: bytes) -> None:
    dev, _, client = service()
    c = client()
    c.sock.sendall(line + b"\n")
    r = c.recv()
    assert set(r) == {"id", "error"} and r["error"].startswith("bad request"), r
    assert r["id"] in (7, None)
    assert not dev.submitted  # nothing reached the guest
    assert c.call("put", 3, 4)["status"] == "ok"


def test_missing_writes_names_exactly_the_lost_or_wrong_keys(service: Any) -> None:
    dev, svc, _ = service()
    dev.table.update({1: 11, 2: 22, 3: 0})
    addr = svc._sock.getsockname()
    assert missing_writes(addr, {1: 11, 2: 22, 3: 0}) == []
    assert missing_writes(addr, {1: 11, 2: 23, 4: 44, 3: 0}) == [2, 4]


def test_closing_the_service_ends_its_clients_connections(service: Any) -> None:
    _, svc, client = service()
    c = client()
    addr = svc._sock.getsockname()
    assert c.call("put", 1, 1)["status"] == "ok"
    svc.close()
    with pytest.raises((ConnectionError, OSError)):
        c.call("get", 1)
    svc.thread.join(30)  # its accept loop notices within its 0.2 s poll
    assert not svc.thread.is_alive()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(addr, timeout=5).close()
