"""The Remus standby: keep a VM of the primary's configuration that does not run, commit each
checkpoint atomically, and take over when the primary fails.

Theory of operation
-------------------
Pages and machine state of an epoch go to *staging* as they arrive (an epoch comes either as
EpochBegin, Pages, MachineBlob, EpochEnd, or whole as one Checkpoint). Only its end commits:
the staged runs are written into the (never-running) VM's memory and the state record becomes the
committed state; then we Ack. A connection that breaks mid-epoch leaves committed memory and
state exactly as they were: staging is simply dropped. The first epoch is a live full copy
with no state; the standby is *consistent* (able to fail over) from the first committed epoch
that carries machine state. In verify mode the memory digest after each commit must equal the
digest the primary computed for the paused guest; a mismatch is reported, the standby becomes
inconsistent and asks for a full resync (Resync), and it never fails over to that state.

Failover (connection lost, no frame within the heartbeat timeout, or a manual command): load the
committed state into the vCPUs and resume them; the guest carries on from the last commit.
"""
from __future__ import annotations

import os
import shlex
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .._bindings.mapping import keep_freed_memory
from ..errors import ConfigError, ProtocolError, TruncatedStream
from ..machine.config import MachineConfig
from ..machine.state import MachineState
from ..machine.vcpu import install_kick_handler
from ..machine.vm import Machine
from ..wire import (STANDBY, Ack, Checkpoint, Connection, EpochBegin, EpochEnd, Failover,
                    Goodbye, Heartbeat, Hello, HelloAck, MachineBlob, Pages,
                    PROTOCOL_VERSION)
from ..wire import Resync as ResyncEvent
from .arbiter import POLL_EVERY, Arbiter, ArbiterUnavailable
from ..machine.checkpoint import apply_runs
from .transport import Link, LinkClosed, listen, tune

EventSink = Callable[[dict[str, Any]], None]
#: How long a newcomer may take to send its Hello, seconds.
HELLO_TIMEOUT = 30.0

#: A TEST HOOK, never set in production: ``DIRTYRING_TEST_PAUSE_IN_COMMIT=PATH``. Once a file
#: ``PATH.arm`` exists, the next commit of a delta epoch stops halfway: its pages are written
#: into memory, but its state and epoch number are not committed and it is not acknowledged.
#: There the standby writes the epoch's number to PATH and blocks for good, so that a test can
#: kill -9 it exactly in the middle of a commit
#: (tests/integration/test_replication_standby_crash.py). Read once, at import.
_TEST_PAUSE_IN_COMMIT = os.environ.get("DIRTYRING_TEST_PAUSE_IN_COMMIT", "")


def _test_pause_in_commit(epoch: int, kind: str) -> None:
    """The test hook above: a no-op until ``PATH.arm`` exists, and for a full epoch."""
    path = _TEST_PAUSE_IN_COMMIT
    if kind != "delta" or not os.path.exists(path + ".arm"):
        return
    with open(path + ".tmp", "w") as f:
        f.write(str(epoch))
    os.replace(path + ".tmp", path)  # whole, for the test polling for it
    threading.Event().wait()  # until the test kills this process


@dataclass(frozen=True, slots=True)
class _StreamEnd:
    """How a primary's stream ended: why, and whether it said goodbye (``graceful``: no
    failover), asked us to take over (``switchover``) or sent garbage (``broken``)."""

    reason: str
    graceful: bool = False
    switchover: bool = False
    broken: bool = False


class Standby:
    """The Remus standby (see the module docstring); :func:`dirtyring.standby` serves one.

    Example::

        sb = dirtyring.Standby(("0.0.0.0", 7000), key, on_event=print)
        stop = threading.Event()
        threading.Thread(target=sb.serve, args=(stop,), daemon=True).start()
        ...
        sb.request_failover()
        print(sb.status()["state"])
    """

    def __init__(self, listen_addr: tuple[str, int], key: bytes, *, insecure: bool = False,
                 heartbeat_timeout: float = 1.0, heartbeat_interval: float = 0.1,
                 verify: bool = False, auto_failover: bool = True,
                 arbiter: str | None = None, arbiter_timeout: float = 5.0,
                 on_event: EventSink | None = None,
                 sink: Callable[[str, Any], None] | None = None,
                 etcd: Arbiter | None = None) -> None:
        """``etcd``: the group's key (``arbiter.py``): every failover, automatic or manual,
        first takes it, and a standby the primary went on without never goes live."""
        install_kick_handler()  # the standby VM is built later, on the connection's thread
        keep_freed_memory()  # before the first frame: decoding allocates per checkpoint
        self.addr = listen_addr
        self.key = key
        self.insecure = insecure
        self.hb_timeout = heartbeat_timeout
        self.hb_interval = heartbeat_interval
        self.verify = verify
        self.auto_failover = auto_failover
        self.arbiter = shlex.split(arbiter) if arbiter else None
        self.arbiter_timeout = arbiter_timeout
        self.on_event = on_event or (lambda e: None)
        self.sink = sink
        self.machine: Machine | None = None
        self.config: MachineConfig | None = None
        self.committed_epoch = 0
        self.committed_state: bytes | None = None
        self.consistent_epoch = 0
        self.consistent = False
        self.state = "waiting"
        self.failover_requested = threading.Event()
        self._failover_lock = threading.Lock()
        self.failed_over = threading.Event()
        self.failover_detected_at = 0.0
        self.failover_done_at = 0.0
        self.resumed_wall = 0.0
        self.epochs = 0
        self.mismatches = 0
        self.rejected = 0
        self.pages = 0
        self.failovers = 0  # takeovers done (0 or 1: a standby goes live once)
        self._bytes_lock = threading.Lock()
        self._bytes_past = 0  # received on followed connections that have ended
        #: The gate of the guest's output once live (the CLI's, with --etcd: output leaves
        #: only while the lease surely holds); shown by ``status`` and the metrics.
        self.output: Any = None
        self._busy = threading.Lock()
        self._staged: list[tuple[Any, ...]] = []
        self._staged_state: bytes | None = None
        self._staged_epoch = 0
        self._staged_kind = "delta"
        self.staging_bytes = 0
        self.max_staging_bytes = 0
        self._listener: socket.socket | None = None
        self._link: Link | None = None
        self.etcd = etcd
        self._replica = ""  # our name in etcd's ``replica`` key: the primary's session id
        #: The fencing token of the primary we follow (the highest seen; 0: no arbiter).
        self.token = 0
        self._closed = threading.Event()
        #: The last epoch committed and not yet acknowledged (0: none).
        self._ack_due = 0
        #: Until a full epoch commits, deltas have no base (start, or after a verify mismatch).
        self._needs_full = True
        #: Set by ``reprotect``: the replication of the guest this standby took over.
        self.reprotected_by: Any = None
        #: Called with the machine when a failover restored it, before it resumes: the CLI
        #: points a Linux program's output streams at the offsets the checkpoint holds.
        self.on_restored: Callable[[Machine], None] | None = None

    def _emit(self, kind: str, **fields: Any) -> None:
        self.on_event({"event": kind, "t": time.time(), **fields})

    # --- serving ---------------------------------------------------------------------------------
    def serve(self, stop: threading.Event | None = None) -> None:
        """Accept the primary and follow it until failover (or ``stop``)."""
        self._listener = listen(self.addr)
        self._listener.settimeout(0.1)
        self._emit("listening", addr=f"{self.addr[0]}:{self.addr[1]}")
        try:
            while not self.failed_over.is_set() and not (stop is not None and stop.is_set()):
                if self.failover_requested.is_set():
                    # With the followed primary's link, if there is one: this loop may get
                    # here before the connection's thread, and a live primary must still be
                    # told (Failover fences it) rather than see a dropped connection and go
                    # on alone: two live copies.
                    self.failover("manual failover command", self._link)
                    break
                try:
                    sock, peer = self._listener.accept()
                except socket.timeout:
                    continue
                tune(sock)
                threading.Thread(target=self._greet, args=(sock, peer), daemon=True).start()
        finally:
            self._listener.close()

    def _greet(self, sock: socket.socket, peer: Any) -> None:
        """Authenticate a newcomer *before* it may take the follower lock (``_busy``): a
        stranger, a silent peer or garbage is dropped without touching anything; an
        authenticated second primary is refused with a reason."""
        link = Link(sock, Connection(STANDBY, self.key, insecure=self.insecure))
        try:
            # A primary connects before it starts its uplink process, which then sends the
            # Hello: on a loaded host that start took over 5 s. A silent peer holds only this
            # thread (not the follower lock), so waiting long costs nothing.
            first = next(link.events(timeout=HELLO_TIMEOUT))
        except (TimeoutError, LinkClosed, StopIteration):
            link.close()
            return
        except ProtocolError as e:
            self.rejected += 1
            self._emit("protocol_error", error=str(e), peer=str(peer))
            link.close()
            return
        if not isinstance(first, Hello):
            self.rejected += 1
            self._emit("protocol_error", error="the peer did not start with Hello",
                       peer=str(peer))
            link.close()
            return
        if self.failed_over.is_set() or not self._busy.acquire(blocking=False):
            reason = ("this standby already took over" if self.failed_over.is_set()
                      else "this standby already follows a primary")
            self.rejected += 1
            self._emit("rejected", reason=reason, peer=str(peer))
            try:
                link.send(HelloAck(session_id=first.session_id, accepted=False, reason=reason))
            except (LinkClosed, ProtocolError):
                pass
            link.close()
            return
        try:
            self._follow(link, first)
        finally:
            self._busy.release()

    def _follow(self, link: Link, hello: Hello) -> None:
        """Follow the primary on ``link`` until its stream ends, then take over or wait for
        another primary. The follower lock is held by ``_greet``."""
        self._link = link
        try:
            end = self._stream(link, hello)
        finally:
            self._staged, self._staged_state = [], None
            self.staging_bytes = 0
        if end is not None:
            self.failover_detected_at = time.monotonic()
            self._emit("switchover_requested" if end.switchover else "primary_lost",
                       reason=end.reason, committed_epoch=self.committed_epoch)
            self._after(end, link)
        link.close()
        with self._bytes_lock:
            self._bytes_past += link.conn.statistics().bytes_in
            self._link = None

    def _stream(self, link: Link, hello: Hello) -> _StreamEnd | None:
        """Answer the Hello, then apply the primary's frames until the stream ends: how it
        ended (None: this primary was refused)."""
        hb = threading.Thread(target=self._heartbeats, args=(link,), daemon=True)
        try:
            try:
                self._hello(link, hello)
            except LinkClosed as e:
                self._emit("rejected", reason=str(e))
                return None
            hb.start()
            for ev in link.events(timeout=self.hb_timeout):
                if self.failover_requested.is_set():
                    return _StreamEnd("manual failover command")
                end = self._apply(link, ev)
                if end is not None:
                    return end
                if self._ack_due and not link.conn.frame_ready():
                    self._ack(link)
            return _StreamEnd("")
        except TimeoutError:
            return _StreamEnd(f"no frame from the primary for {self.hb_timeout:g} s")
        except (LinkClosed, TruncatedStream) as e:
            # (A stream that ends inside a frame is a primary that died mid-send, as after
            # a kill -9 during a large checkpoint: lost, like any other end of the stream.)
            return _StreamEnd(f"primary connection lost ({e})")
        except ProtocolError as e:
            # A malformed or unauthenticated frame mid-stream: it never touches committed
            # state, and it is no proof that the primary died, so we do not fail over (two
            # live copies would be worse); the primary sees the link drop and goes degraded.
            self.rejected += 1
            self._emit("protocol_error", error=str(e))
            return _StreamEnd(f"protocol error from the primary: {e}", broken=True)

    def _apply(self, link: Link, ev: object) -> _StreamEnd | None:
        """Stage or commit one frame of the primary's; how the stream ends if it ends it."""
        if type(ev) is Checkpoint:  # the usual case: a whole epoch at once
            self._begin(ev.epoch, ev.kind)
            for p in ev.pages:
                self._stage(p)
            if ev.blob:
                self._staged_state = ev.blob
            self._commit(link, ev.epoch, ev.digest)
        elif isinstance(ev, EpochBegin):
            self._begin(ev.epoch, ev.kind)
        elif isinstance(ev, Pages):
            self._stage(ev)
        elif isinstance(ev, MachineBlob):
            self._staged_state = ev.blob
        elif isinstance(ev, EpochEnd):
            if ev.epoch != self._staged_epoch:
                raise ProtocolError("EpochEnd for an epoch that was not begun")
            self._commit(link, ev.epoch, ev.digest)
        elif isinstance(ev, Failover):
            # From the primary this means "take over now" (a planned switchover, the end of a
            # migration): everything it sent is committed already.
            return _StreamEnd(f"switchover requested by the primary: {ev.reason}",
                              switchover=True)
        elif isinstance(ev, Goodbye):
            if self._ack_due:
                self._ack(link)
            return _StreamEnd(f"primary said goodbye: {ev.reason}", graceful=True)
        return None  # (a Heartbeat: nothing to do)

    def _after(self, end: _StreamEnd, link: Link) -> None:
        """The primary's stream ended: take over, or wait for a primary (and say why)."""
        if self.failover_requested.is_set() or end.switchover:
            self.failover(end.reason, link)
        elif self.auto_failover and not end.graceful and not end.broken and self.consistent:
            if self._lease(end.reason):
                self.failover(end.reason, link)
            else:
                self._emit("waiting", reason="failover refused by the arbiter; waiting for "
                                             "a primary or a manual failover")
        elif not self.consistent or end.broken:
            # Nothing consistent was ever committed from this peer: there is nothing to take
            # over, and a stranger must not end the standby. Keep waiting for a primary.
            self._emit("waiting", reason="not failing over; waiting for a primary to connect")

    @property
    def bytes_received(self) -> int:
        """Wire bytes received from the primaries this standby followed (never decreases)."""
        with self._bytes_lock:
            link = self._link
            return self._bytes_past + (link.conn.statistics().bytes_in if link is not None
                                       else 0)

    def _lease(self, reason: str) -> bool:
        """Split-brain guard: before an *automatic* failover, the arbiter command (if any) must
        grant this standby the right to go live (exit status 0): e.g. take a lease in a shared
        store, or check that the primary's host is really down. A refusal, an error or a
        timeout means no failover. A manual failover or a primary's switchover skips it."""
        if not self.arbiter:
            return True
        env = dict(os.environ, DIRTYRING_EPOCH=str(self.committed_epoch),
                   DIRTYRING_REASON=reason, DIRTYRING_LISTEN=f"{self.addr[0]}:{self.addr[1]}")
        t0 = time.monotonic()
        try:
            r = subprocess.run(self.arbiter, env=env, timeout=self.arbiter_timeout,
                               stdin=subprocess.DEVNULL, capture_output=True)
            ok, detail = r.returncode == 0, f"exit status {r.returncode}"
            if r.stderr.strip():
                detail += ": " + r.stderr.decode(errors="replace").strip()[-200:]
        except subprocess.TimeoutExpired:
            ok, detail = False, f"no answer within {self.arbiter_timeout:g} s"
        except OSError as e:
            ok, detail = False, f"cannot run {self.arbiter[0]!r}: {e.strerror or e}"
        self._emit("lease_granted" if ok else "failover_refused", detail=detail,
                   arbiter_ms=(time.monotonic() - t0) * 1e3)
        return ok

    def _heartbeats(self, link: Link) -> None:
        seq = 0
        while not link.closed and not self.failed_over.is_set():
            time.sleep(self.hb_interval)
            seq += 1
            try:
                link.send(Heartbeat(seq=seq, sent_ns=time.monotonic_ns()))
            except (LinkClosed, ProtocolError):
                return

    def _hello(self, link: Link, ev: Hello) -> None:
        if ev.version != PROTOCOL_VERSION:
            reason = (f"the primary speaks replication protocol {ev.version} and this standby "
                      f"{PROTOCOL_VERSION}: run the same dirtyring release on both")
            link.send(HelloAck(session_id=ev.session_id, accepted=False, reason=reason))
            raise LinkClosed(reason)
        try:
            cfg = MachineConfig.from_json(ev.config)
        except ConfigError as e:
            link.send(HelloAck(session_id=ev.session_id, accepted=False, reason=str(e)))
            raise LinkClosed(f"bad configuration from the primary: {e}") from None
        if self.config is not None and cfg != self.config:
            link.send(HelloAck(session_id=ev.session_id, accepted=False,
                               reason="configuration differs from the machine this standby holds"))
            raise LinkClosed("primary's configuration differs")
        if self.machine is None:
            self.machine = Machine(cfg, boot=False, sink=self.sink)
            self.config = cfg
            self._emit("standby_vm_created", vcpus=cfg.vcpus, memory_bytes=cfg.data_bytes,
                       guest=cfg.guest)
        refused = self._stale_token(ev.token)
        if refused:
            self.rejected += 1
            link.send(HelloAck(session_id=ev.session_id, accepted=False, reason=refused))
            raise LinkClosed(refused)
        self.token = max(self.token, ev.token)
        self._replica = ev.session_id.hex()
        if self.etcd is not None:
            try:
                self.etcd.prepare()  # (a failover then costs one etcd transaction)
            except ArbiterUnavailable:
                pass
        # A fresh nonce binds this session's MACs to this answer (no replay of old sessions).
        link.send(HelloAck(session_id=ev.session_id, accepted=True, nonce=os.urandom(16)))
        self.state = "following"
        self._emit("primary_connected")

    def _begin(self, epoch: int, kind: str) -> None:
        self._staged, self._staged_state = [], None
        self._staged_epoch, self._staged_kind = epoch, kind
        self.staging_bytes = 0

    def _stage(self, ev: Pages) -> None:
        # Only sparse words: apply those, never build the bytes.
        words = ev.words if ev.lazy else None
        if self._staged_kind == "full" and not (
                words[1].any() if words is not None
                else np.frombuffer(ev.data, np.uint64).any()):
            return  # a full epoch starts from zeroed memory (see _commit)
        self._staged.append((ev.slot, ev.indices, None if words is not None else ev.data,
                             ev.delta, ev.words))
        self.staging_bytes += 12 * len(words[1]) if words is not None else ev.nbytes
        self.max_staging_bytes = max(self.max_staging_bytes, self.staging_bytes)

    def _commit(self, link: Link, epoch: int, digest: bytes) -> None:
        m = self.machine
        assert m is not None and m.memory is not None
        if self._staged_kind == "full":
            # A full epoch is all of memory: pages it does not carry are zero (the primary
            # sends only pages that hold data). Zeroing first costs one hole punch per slot.
            m.memory.discard()
        n = apply_runs(m.memory, self._staged)
        if _TEST_PAUSE_IN_COMMIT and n:
            _test_pause_in_commit(epoch, self._staged_kind)
        self.pages += n
        if self._staged_kind == "full":
            self._needs_full = False
        if self._staged_state is not None:
            self.committed_state = self._staged_state
            self.consistent = not self._needs_full
        else:
            self.consistent = False  # a live full copy: consistent once the next delta lands
        self.committed_epoch = epoch
        self.epochs += 1
        self._staged, self._staged_state = [], None
        self.staging_bytes = 0
        if self.verify and digest:
            mine = m.memory.digest()
            if mine != digest:
                self.mismatches += 1
                self.consistent = False
                self._needs_full = True
                self._emit("verify_mismatch", epoch=epoch,
                           detail="standby memory differs from the primary's paused guest")
                link.send(ResyncEvent(epoch=epoch, reason="memory digest mismatch"))
        if self.consistent and not self.consistent_epoch:
            self.consistent_epoch = epoch
            self.state = "protected"
            self._emit("protected", epoch=epoch)
        # Acknowledged once the burst of frames that has arrived is processed: one Ack then
        # covers every epoch committed in it (acks are cumulative).
        self._ack_due = epoch

    def _ack(self, link: Link) -> None:
        epoch, self._ack_due = self._ack_due, 0
        try:
            link.send(Ack(epoch=epoch, token=self.token))
        except LinkClosed:
            # The primary may have closed after a Goodbye we have not read yet: keep reading
            # what is already buffered; the end of the stream decides (Goodbye or loss).
            pass

    # --- failover ----------------------------------------------------------------------------------
    def request_failover(self) -> None:
        self.failover_requested.set()
        link = self._link
        if link is not None:
            try:
                link.sock.shutdown(socket.SHUT_RD)
            except OSError:
                pass

    def failover(self, reason: str, link: Link | None = None) -> None:
        """Take over (once: a manual request is seen both by the serving loop and by the
        connection's thread, which may call this at the same time)."""
        with self._failover_lock:
            self._failover(reason, link)

    def _failover(self, reason: str, link: Link | None) -> None:
        if self.failed_over.is_set():
            return
        if self.machine is None or self.committed_state is None or not self.consistent:
            self.state = "failed"
            self._emit("failover_impossible", reason=reason,
                       detail="no consistent committed checkpoint to resume from")
            self.failed_over.set()
            return
        t0 = time.monotonic()
        if self.failover_detected_at == 0.0:
            self.failover_detected_at = t0
        if self.etcd is not None:
            if link is not None and self.failover_requested.is_set():
                # Manual: a live primary stops and gives the key up, then we take it.
                try:
                    link.send(Failover(reason="standby taking over"))
                except (LinkClosed, ProtocolError):
                    pass
            elif link is not None:
                # Automatic: the primary may be alive and only slow. Hang up (our heartbeats
                # stop): a living primary then sees us gone, marks us stale and goes on, and
                # we never go live; a dead or cut-off one leaves its lease to end first.
                link.close()
            if not self._take_key(reason):
                return
        self._emit("failover_started", reason=reason, epoch=self.committed_epoch)
        m = self.machine
        st = MachineState.decode(self.committed_state)
        m.restore_state(st)
        if m.tracker is not None:
            m.tracker.stop()
        if self.on_restored is not None:
            self.on_restored(m)
        if m.stdio is not None:
            # Output the checkpoint's program made that the primary may not have written:
            # out again first (at its offsets: see linux/output.py), then the program goes on.
            m.stdio.replay_undelivered()
            m.stdio.forget_undelivered()  # (from now on it goes straight out; a re-protecting
            # primary keeps chunks again)
        m.resume_all()
        self.failover_done_at = time.monotonic()
        self.resumed_wall = time.time()  # wall clock: a migration source compares it with its own
        self.state = "failed_over"
        self.failovers += 1
        if link is not None and self.etcd is None:
            try:
                link.send(Failover(reason="standby took over"))
            except (LinkClosed, ProtocolError):
                pass
        self._emit("failover_done", epoch=self.committed_epoch, resumed_t=self.resumed_wall,
                   resume_ms=(self.failover_done_at - t0) * 1e3,
                   since_detection_ms=(self.failover_done_at - self.failover_detected_at) * 1e3,
                   **self.lease_fields())
        self.failed_over.set()

    def lease_fields(self) -> dict[str, Any]:
        """With etcd, for events: ``{"lease": {group, holder, revision, ttl_left_s}}`` as this
        process knows it (no etcd request); ``{}`` without."""
        a = self.etcd
        if a is None:
            return {}
        return {"lease": {"group": a.group, "holder": a.who if a.token and not a.lost else "",
                          "revision": a.token, "ttl_left_s": round(a.ttl_left(), 3)}}

    def _stale_token(self, token: int) -> str:
        """Why a primary with fencing ``token`` must be refused, or "". With etcd its token
        must be the group key's current revision (its tenure is the current one); without,
        it must not be older than a primary this standby already followed."""
        if self.etcd is not None:
            try:
                now = self.etcd.read().revision
            except ArbiterUnavailable as e:
                return f"cannot check the primary's fencing token in etcd: {e}"
            if token != now:
                return (f"stale primary: its fencing token {token} is not the group's current "
                        f"one ({now or 'nobody holds the key'})")
        elif token < self.token:
            return (f"stale primary: its fencing token {token} is older than one this standby "
                    f"followed ({self.token})")
        return ""

    def _take_key(self, reason: str) -> bool:
        """Wait until this standby holds the group's key in etcd (the primary's lease was
        revoked or ran out). False if it never may: the primary went on without us, so our
        copy is stale (or we are closing). While etcd cannot be reached we keep waiting:
        going live unsure could make two live copies."""
        a = self.etcd
        assert a is not None
        if a.token and not a.lost:
            return True
        t0, told = time.monotonic(), ""
        while not self._closed.is_set():
            try:
                got = a.take_over(self._replica)
            except ArbiterUnavailable as e:
                why = f"etcd unreachable: {e}"
            else:
                if got.token:
                    self._emit("lease_granted", revision=got.token, group=a.group,
                               wait_ms=(time.monotonic() - t0) * 1e3)
                    return True
                if got.stale:
                    self.state = "stale"
                    self._emit("failover_refused", reason=reason, detail=(
                        "the primary went on without this standby (its copy is marked stale "
                        "in etcd): not going live"))
                    return False
                why = f"the key is held by {got.holder or 'the primary'}"
            if why != told:
                told = why
                self.state = "waiting_for_lease"
                self._emit("waiting_for_lease", reason=reason, detail=why, group=a.group)
            time.sleep(POLL_EVERY)
        return False

    def status(self) -> dict[str, Any]:
        return {"state": self.state, "committed_epoch": self.committed_epoch,
                "consistent": self.consistent, "epochs": self.epochs, "pages": self.pages,
                "mismatches": self.mismatches, "rejected": self.rejected,
                "guest_progress": self.machine.progress() if self.machine is not None else 0,
                "staging_bytes_max": self.max_staging_bytes,
                "bytes_received": self.bytes_received, "failovers": self.failovers,
                # Once live: is the guest's output held (waiting for the lease), and how much.
                **self.output_status(),
                # Once it took over and re-protects the guest: that replication's state.
                "reprotect": self.reprotect_status(),
                "lease": self.etcd.status() if self.etcd is not None else None}

    def output_status(self) -> dict[str, Any]:
        g = self.output
        if g is None or not self.failed_over.is_set():
            return {"output_held": False, "output_held_pieces": 0}
        return {"output_held": not g.releasing, "output_held_pieces": g.held}

    def reprotect_status(self) -> dict[str, Any] | None:
        p = self.reprotected_by
        if p is None:
            return None
        return {"state": p.state, "standby": f"{p.addr[0]}:{p.addr[1]}", "epoch": p.epoch,
                "acked": p.acked, "output_held": p.gate.statistics().held,
                **p._lease_fields()}

    def close(self) -> None:
        self._closed.set()
        if self.machine is not None:
            self.machine.close()
