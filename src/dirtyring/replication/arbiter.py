"""One live copy, always: the right to release output, held as a key in etcd.

Why etcd, and why this client
-----------------------------
A primary and its standby cannot tell a dead peer from a cut link, so something outside both
must decide which copy may act. We use the distributed store a user would run anyway, etcd
(Debian's ``etcd-server``, 3.4), through its JSON gateway with ``etcd3gw``: it is maintained,
synchronous (this code runs in plain threads and in the uplink's signal handler, where an
asyncio client such as aetcd would need a loop of its own), and needs no grpc or protobuf
(python-etcd3, the other well-known client, is unmaintained and breaks on protobuf 4). One
request is ~1 ms on loopback (``expectations.md``), so the crash path pays one round trip.

The keys (``/dirtyring/<group>/...``)
-------------------------------------
- ``owner``: who may release output, bound to the holder's lease. It is only ever *created* in a
  transaction that checks it is absent, so its create revision names one tenure: that revision
  is the **fencing token** (it travels in the replication handshake).
- ``replica``: the session id of the standby that may take over, or empty. The primary writes it
  (only while it holds ``owner``) when a standby joins, and empties it *before* releasing any
  output the standby does not have (it lost its standby and goes on alone). A standby takes
  ``owner`` only in a transaction that also checks ``replica`` still names it: a standby whose
  copy went stale can never go live, so no acknowledged write is ever lost by a failover.

The rules this gives (``primary.py`` and ``standby.py`` apply them)
--------------------------------------------------------------------
- A standby goes live only after it created ``owner`` (the primary's lease was revoked, by its
  uplink when the primary died, or ran out).
- A protected primary releases output on the standby's acknowledgement: a standby acknowledges
  only while it follows, so it is not live then.
- A primary without its standby releases output only while its lease is surely live by its own
  monotonic clock: the lease's TTL counted from *before* the keep-alive that granted it was
  sent, less a safety margin. Past that it holds output (never drops it) until the lease is
  renewed; if the lease is gone, it has lost ``owner`` and fences itself.
"""
from __future__ import annotations

import base64
import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlsplit

from ..errors import DirtyringError

#: Lease time to live, seconds. etcd's minimum is about 2 s; a lost host costs this long.
DEFAULT_TTL = 3
#: The primary stops releasing output this long before its lease could have run out.
DEFAULT_MARGIN = 1.0
#: How often the holder renews its lease (well inside TTL - margin).
RENEW_EVERY = 0.4
#: One etcd request's time limit: a member that does not answer is skipped for the next.
REQUEST_TIMEOUT = 0.5
#: How often a standby waiting for ``owner`` asks again.
POLL_EVERY = 0.02


class ArbiterUnavailable(DirtyringError):
    """No etcd member answered: nothing may be decided (waiting is the safe side).

    Example::

        try:
            token = arbiter.acquire(wait=5.0)
        except dirtyring.ArbiterUnavailable as e:
            raise SystemExit(f"etcd unreachable: {e}")
    """


def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def _unb64(s: str | None) -> str:
    return base64.b64decode(s).decode(errors="replace") if s else ""


def parse_endpoints(spec: str) -> list[tuple[str, str, int]]:
    """``URL[,URL...]`` (``http://host:port`` or ``host:port``) -> (protocol, host, port)."""
    out = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        u = urlsplit(item if "://" in item else f"http://{item}")
        if u.scheme not in ("http", "https") or not u.hostname:
            raise DirtyringError(f"bad etcd endpoint {item!r}: expected http://HOST:PORT")
        try:
            port = u.port or 2379
        except ValueError:
            raise DirtyringError(f"bad etcd endpoint {item!r}: bad port") from None
        out.append((u.scheme, u.hostname, port))
    if not out:
        raise DirtyringError("--etcd needs at least one endpoint (http://HOST:PORT)")
    return out


@dataclass(frozen=True, slots=True)
class Owner:
    """What ``owner`` says now (empty holder: nobody holds it)."""

    holder: str
    revision: int
    replica: str


@dataclass(frozen=True, slots=True, kw_only=True)
class TakeOver:
    """A standby's attempt at ``owner``: won (token set), or why not."""

    token: int = 0
    holder: str = ""  # who holds it now (keep waiting)
    stale: bool = False  # ``replica`` no longer names us: never go live


class Arbiter:
    """This process's side of one group's keys in etcd.

    ``who`` names this copy in ``owner`` (shown by ``status``). Thread-safe: the epoch loop
    asks :meth:`may_release`, a renewal thread keeps the lease, other threads take, mark and
    read.

    Example::

        arb = dirtyring.Arbiter("http://127.0.0.1:2379", "db1", who="primary")
        token = arb.acquire(wait=4.0)            # the fencing token (the key's revision)
        p = dirtyring.protect(m, sb_addr, key, arbiter=arb)
    """

    def __init__(self, endpoints: str | list[tuple[str, str, int]], group: str, *, who: str,
                 ttl: int = DEFAULT_TTL, margin: float = DEFAULT_MARGIN,
                 on_lost: Callable[[str], None] | None = None) -> None:
        import etcd3gw  # (imported here: only a process with --etcd pays for it)
        if not group or "/" in group:
            raise DirtyringError(f"bad group name {group!r} (--name): no '/', not empty")
        if ttl < 2 or margin <= 0 or margin >= ttl - 2 * RENEW_EVERY:
            raise DirtyringError(f"lease TTL {ttl} s with margin {margin:g} s leaves no time to "
                                 "renew: use a TTL of at least 2 s and a smaller margin")
        self.endpoints = parse_endpoints(endpoints) if isinstance(endpoints, str) else endpoints
        self.group = group
        self.who = who
        self.ttl = ttl
        self.margin = margin
        self.on_lost = on_lost or (lambda reason: None)
        self.owner_key = f"/dirtyring/{group}/owner"
        self.replica_key = f"/dirtyring/{group}/replica"
        self._clients = [etcd3gw.Etcd3Client(host=h, port=p, protocol=proto, api_path="/v3/",
                                             timeout=REQUEST_TIMEOUT)
                         for proto, h, p in self.endpoints]
        self._errors = (etcd3gw.exceptions.Etcd3Exception, OSError, ValueError, KeyError)
        self._current = 0
        self._lock = threading.Lock()
        self.lease_id = 0
        self.token = 0  # create revision of our ``owner`` (0: we do not hold it)
        self.valid_until = 0.0  # monotonic: our lease is surely live before this
        self.lost = ""  # why we no longer hold ``owner`` (empty: we may hold it)
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._spare: tuple[int, float] | None = None  # a standby's lease, ready to use

    # --- requests ----------------------------------------------------------------------------------
    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """One request, to the member that last answered, then to each other one in turn."""
        n = len(self._clients)
        last: Exception | None = None
        for i in range(n):
            k = (self._current + i) % n
            c = self._clients[k]
            try:
                got = c.post(c.get_url(path), json=body)
                self._current = k
                return dict(got)
            except self._errors as e:
                last = e
        raise ArbiterUnavailable(f"no etcd member answered ({len(self._clients)} tried): "
                                 f"{type(last).__name__}: {str(last)[:200]}")

    def _txn(self, compare: list[dict[str, Any]], success: list[dict[str, Any]],
             failure: list[dict[str, Any]]) -> dict[str, Any]:
        return self._post("/kv/txn", {"compare": compare, "success": success,
                                      "failure": failure})

    def _grant(self) -> tuple[int, float]:
        t0 = time.monotonic()
        got = self._post("/lease/grant", {"TTL": self.ttl, "ID": 0})
        return int(got["ID"]), t0 + int(got["TTL"])

    def _range_ops(self) -> list[dict[str, Any]]:
        return [{"request_range": {"key": _b64(self.owner_key)}},
                {"request_range": {"key": _b64(self.replica_key)}}]

    @staticmethod
    def _kv(resp: dict[str, Any]) -> tuple[str, int]:
        kvs = resp.get("response_range", {}).get("kvs") or []
        if not kvs:
            return "", 0
        return _unb64(kvs[0].get("value")), int(kvs[0].get("create_revision", 0))

    def read(self) -> Owner:
        """Who holds ``owner`` now, its revision, and the replica named."""
        got = self._txn([], self._range_ops(), [])
        (holder, rev), (replica, _) = (self._kv(r) for r in got.get("responses", []))
        return Owner(holder, rev, replica)

    # --- the primary's side -------------------------------------------------------------------
    def acquire(self, wait: float) -> int:
        """Create ``owner`` (absent) under a new lease, clearing ``replica``; wait up to ``wait``
        seconds for a holder's lease to end. Returns the fencing token."""
        deadline = time.monotonic() + wait
        seen = ""
        while True:
            lease, valid = self._grant()
            got = self._txn(
                [{"key": _b64(self.owner_key), "target": "CREATE", "result": "EQUAL",
                  "create_revision": 0}],
                [{"request_put": {"key": _b64(self.owner_key), "value": _b64(self._value()),
                                  "lease": lease}},
                 {"request_put": {"key": _b64(self.replica_key), "value": ""}}],
                self._range_ops())
            if got.get("succeeded"):
                self._won(lease, valid, int(got["header"]["revision"]))
                return self.token
            self._revoke(lease)
            seen = self._kv(got["responses"][0])[0] or seen
            if time.monotonic() >= deadline:
                raise DirtyringError(
                    f"group {self.group!r} is held by {seen or 'another copy'} in etcd: another "
                    f"copy of this guest is live (stop it, or wait {self.ttl} s for its lease to "
                    "end if it died)")
            time.sleep(POLL_EVERY * 5)

    def set_replica(self, replica: str) -> bool:
        """Name the standby that may take over (empty: none may). Only while we hold
        ``owner``; False if we do not (we lost it: fence)."""
        got = self._txn(
            [{"key": _b64(self.owner_key), "target": "CREATE", "result": "EQUAL",
              "create_revision": self.token}],
            [{"request_put": {"key": _b64(self.replica_key), "value": _b64(replica)}}], [])
        if not got.get("succeeded"):
            self._lose("another copy holds the group's key in etcd")
            return False
        return True

    def may_release(self) -> bool:
        """May output leave now without a standby's acknowledgement: we hold ``owner`` and our
        lease is surely live for ``margin`` more seconds (our own clock)."""
        return not self.lost and time.monotonic() < self.valid_until - self.margin

    def ttl_left(self) -> float:
        return max(0.0, self.valid_until - time.monotonic()) if self.token and not self.lost \
            else 0.0

    # --- the standby's side -------------------------------------------------------------------
    def prepare(self) -> None:
        """A standby: have a lease ready, so taking over costs one transaction."""
        now = time.monotonic()
        if self._spare and now < self._spare[1] - self.ttl / 2:
            return
        old, self._spare = self._spare, self._grant()
        if old:
            self._revoke(old[0])

    def take_over(self, replica: str) -> TakeOver:
        """Try once to create ``owner`` as the standby named ``replica``."""
        self.prepare()
        assert self._spare is not None
        lease, valid = self._spare
        got = self._txn(
            [{"key": _b64(self.owner_key), "target": "CREATE", "result": "EQUAL",
              "create_revision": 0},
             {"key": _b64(self.replica_key), "target": "VALUE", "result": "EQUAL",
              "value": _b64(replica)}],
            [{"request_put": {"key": _b64(self.owner_key), "value": _b64(self._value()),
                              "lease": lease}},
             {"request_put": {"key": _b64(self.replica_key), "value": ""}}],
            self._range_ops())
        if got.get("succeeded"):
            self._spare = None
            self._won(lease, valid, int(got["header"]["revision"]))
            return TakeOver(token=self.token)
        (holder, _), (named, _) = (self._kv(r) for r in got.get("responses", []))
        return TakeOver(holder=holder, stale=named != replica)

    # --- the lease ------------------------------------------------------------------------------
    def _value(self) -> str:
        return json.dumps({"who": self.who, "host": socket.gethostname(), "pid": os.getpid()})

    def _won(self, lease: int, valid: float, token: int) -> None:
        with self._lock:
            self.lease_id, self.valid_until, self.token, self.lost = lease, valid, token, ""
        if self._renewer is None:
            self._renewer = threading.Thread(target=self._renew, name="etcd-lease", daemon=True)
            self._renewer.start()

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_EVERY):
            if self.lost or not self.lease_id:
                continue
            t0 = time.monotonic()
            try:
                got = self._post("/lease/keepalive", {"ID": self.lease_id})
            except ArbiterUnavailable:
                continue  # (the lease runs out by our clock; output is held meanwhile)
            ttl = int(got.get("result", {}).get("TTL", -1))
            if ttl <= 0:
                self._lose(f"our etcd lease ended (no renewal reached etcd for {self.ttl} s)")
            else:
                with self._lock:
                    self.valid_until = max(self.valid_until, t0 + ttl)

    def _lose(self, reason: str) -> None:
        with self._lock:
            if self.lost:
                return
            self.lost = reason
        self.on_lost(reason)

    def _revoke(self, lease: int) -> None:
        try:
            self._post("/kv/lease/revoke", {"ID": lease})
        except ArbiterUnavailable:
            pass  # (it runs out)

    def release(self) -> None:
        """Give ``owner`` up now (a planned stop, or fenced): the standby need not wait."""
        self._stop.set()
        lease, self.lease_id = self.lease_id, 0
        if lease:
            self._revoke(lease)
        if self._spare:
            self._revoke(self._spare[0])
            self._spare = None
        with self._lock:
            self.valid_until = 0.0
            self.lost = self.lost or "released"

    def status(self) -> dict[str, Any]:
        """For status replies and events: who holds the key, its revision, our TTL left."""
        try:
            o = self.read()
            holder: Any = json.loads(o.holder) if o.holder else None
            rev, replica = o.revision, o.replica
        except (ArbiterUnavailable, ValueError):
            holder, rev, replica = "unknown (etcd unreachable)", 0, ""
        return {"group": self.group, "holder": holder, "revision": rev,
                "replica": replica, "ours": bool(self.token) and not self.lost,
                "token": self.token, "ttl_left_s": round(self.ttl_left(), 3),
                "may_release": self.may_release(), "lost": self.lost}

    def handoff(self) -> dict[str, Any]:
        """What the uplink process needs to revoke our lease the moment we die."""
        return {"endpoints": [list(e) for e in self.endpoints], "lease": self.lease_id}


class Revoker:
    """The uplink's way to revoke its primary's lease the moment the primary dies, so the
    standby need not wait for it to run out. Built at the uplink's start (importing the client
    and connecting then, not while the standby waits); errors are ignored (it runs out)."""

    def __init__(self, handoff: dict[str, Any]) -> None:
        import etcd3gw
        self.lease = int(handoff["lease"])
        self._clients = [etcd3gw.Etcd3Client(host=h, port=int(p), protocol=proto,
                                             api_path="/v3/", timeout=REQUEST_TIMEOUT)
                         for proto, h, p in handoff.get("endpoints", [])]
        for c in self._clients[:1]:  # open a connection now (kept alive by the session)
            try:
                c.post(c.get_url("/maintenance/status"), json={})
            except Exception:  # noqa: BLE001  (only a warm-up)
                pass

    def revoke(self) -> bool:
        """One request per member, in turn, until one answers."""
        for c in self._clients:
            try:
                c.post(c.get_url("/kv/lease/revoke"), json={"ID": self.lease})
                return True
            except Exception:  # noqa: BLE001  (dying: anything else would delay the failover)
                continue
        return False
