"""A TCP front end for the key-value guest: JSON lines in, JSON lines out.

Request:  {"id": <any>, "op": "put"|"get", "key": <1..2^64-1>, "value": <0..2^64-1>}
Response: {"id": ..., "status": "ok"|"not_found"|"full"|"bad_op", "key": k, "value": v,
           "epoch": <checkpoint the answer belongs to>}   or   {"id": ..., "error": "..."}

Responses are guest output: on a protected primary they pass the output gate, so a client only
ever sees an answer whose checkpoint the standby has committed.
"""
from __future__ import annotations

import itertools
import json
import socket
import threading
from typing import Any

from ..guests.protocol import KV_GET, KV_PUT
from ..machine.devices import KvDevice, KvRequest, KvResponse
from .transport import listen

STATUS = {0: "ok", 1: "not_found", 2: "full", 3: "bad_op"}


class KvService:
    def __init__(self, device: KvDevice, addr: tuple[str, int]) -> None:
        self.device = device
        self.addr = addr
        self._ids = itertools.count(1)
        self._waiting: dict[int, tuple[socket.socket, Any]] = {}
        self._lock = threading.Lock()
        self._sock = listen(addr)
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._clients: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, name="kv-accept", daemon=True)
        self.thread.start()

    def release(self, kind: str, payload: Any, epoch: int) -> None:
        """Output sink end: deliver a released KvResponse to its client."""
        if kind != "kv" or not isinstance(payload, KvResponse):
            return
        with self._lock:
            who = self._waiting.pop(payload.id, None)
        if who is None:
            return
        sock, cid = who
        line = {"id": cid, "status": STATUS.get(payload.status, str(payload.status)),
                "key": payload.key, "value": payload.value, "epoch": epoch}
        try:
            sock.sendall((json.dumps(line) + "\n").encode())
        except OSError:
            pass

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                c, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._clients.append(c)
            threading.Thread(target=self._client, args=(c,), daemon=True).start()

    def _client(self, c: socket.socket) -> None:
        buf = b""
        try:
            while not self._stop.is_set():
                data = c.recv(65536)
                if not data:
                    return
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        self._request(c, line)
        except OSError:
            return

    def _request(self, c: socket.socket, line: bytes) -> None:
        cid = None
        try:
            r = json.loads(line)
            cid = r.get("id")
            op = {"put": KV_PUT, "get": KV_GET}[r["op"]]
            rid = next(self._ids) & 0xFFFFFFFF
            req = KvRequest(id=rid, op=op, key=int(r["key"]), value=int(r.get("value", 0)))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            msg = {"id": cid, "error": f"bad request: {e}"}
            try:
                c.sendall((json.dumps(msg) + "\n").encode())
            except OSError:
                pass
            return
        with self._lock:
            self._waiting[rid] = (c, cid)
        self.device.submit(req)

    def close(self) -> None:
        self._stop.set()
        self._sock.close()
        for c in self._clients:
            try:
                c.close()
            except OSError:
                pass


class KvClient:
    """A blocking JSON-lines client for KvService (demo, tests, benchmarks)."""

    def __init__(self, addr: tuple[str, int], timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(addr, timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = b""

    def send(self, req: dict[str, Any]) -> None:
        self.sock.sendall((json.dumps(req) + "\n").encode())

    def recv(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the key-value server closed the connection")
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        out: dict[str, Any] = json.loads(line)
        return out

    def call(self, op: str, key: int, value: int = 0) -> dict[str, Any]:
        self.send({"id": 0, "op": op, "key": key, "value": value})
        return self.recv()

    def close(self) -> None:
        self.sock.close()


def missing_writes(addr: tuple[str, int], acked: dict[int, int],
                   timeout: float = 30.0) -> list[int]:
    """Keys whose acknowledged value the key-value server at ``addr`` does not return: the
    proof, after a failover, that no write a client saw acknowledged was lost."""
    c = KvClient(addr, timeout=timeout)
    missing = []
    try:
        for k, v in acked.items():
            r = c.call("get", k)
            if r.get("status") != "ok" or r.get("value") != v:
                missing.append(k)
    finally:
        c.close()
    return missing
