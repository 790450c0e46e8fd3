"""The source's side of the connection: a sender thread that streams rounds as epochs of the
replication protocol, a receiver thread that turns the target's Acks into finished rounds and
bandwidth figures, heartbeats both ways, and the switchover.

Pages are read from the guest's memory by the sender, frame by frame, while the guest runs
(pre-copy; a page changed after it was armed is in the next round anyway, so a torn read is
harmless) or while it is paused for good (the stop-and-copy: nothing is copied up front, which
would fault in fresh buffers inside the downtime). Pages that are holes in the memfd were never
written: the bulk round's first epoch is a "full" one, which the target applies to zeroed
memory, so holes are not sent at all (nor read: reading would allocate them).

The GIL matters: the vCPU (the main thread) needs it after every exit, so the sender must not
hold it for long.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..errors import ProtocolError
from ..machine.vm import Machine
from ..tracking import DirtySet
from ..wire import (PRIMARY, Ack, Connection, EpochBegin, EpochEnd, Failover, Goodbye, Heartbeat,
                    Hello, MachineBlob, Pages, PROTOCOL_VERSION)
from ..wire import Resync as ResyncEvent
from ..machine.checkpoint import gather
from .types import PAGE, MigrationError, MigrationOptions
from ..replication.transport import HandshakeRefused, Link, LinkClosed, connect, handshake

EventSink = Callable[[dict[str, Any]], None]


@dataclass(slots=True)
class Round:
    """One round on its way: sent by the sender thread as one or more epochs, done when the
    target acked the last of them."""

    index: int                              # 0 = the bulk round
    kind: str                               # "full" (the bulk round) or "delta"
    dirty: DirtySet                         # read from memory as the sender goes
    state: bytes = b""                      # stop-and-copy: machine state, captured paused
    digest: bytes = b""                     # stop-and-copy with verify: memory digest
    pages: int = 0
    raw: int = 0
    wire: int = 0
    epochs: int = 0
    last_epoch: int = 0                     # set once the sender sent the round's last epoch
    t0: float = 0.0
    seconds: float = 0.0                    # first frame .. Ack (end to end)
    done: threading.Event = field(default_factory=threading.Event)


class SourceLink:
    """Connection, sender and receiver threads of one migration source."""

    def __init__(self, machine: Machine, target: tuple[str, int], key: bytes, *,
                 insecure: bool, options: MigrationOptions, emit: EventSink,
                 kick: Callable[[], None]) -> None:
        self.m = machine
        self.addr = target
        self.key = key
        self.insecure = insecure
        self.opt = options
        self.emit = emit
        self.kick = kick                   # ends the guest's current slice (a round is done)
        self.link: Link | None = None
        self.lost = threading.Event()
        self.lost_reason = ""
        self.target_resumed = threading.Event()
        self.raw = self.wire = self.pages = 0
        #: Pages (and their raw bytes) sent so far, counted per frame (``pages``/``raw``: per
        #: round, once it is sent): for the metrics.
        self.sent_pages = self.sent_raw = 0
        self.fixed = 0.0       # the smallest round time seen: per-epoch fixed costs
        self._bw_bulk = 0.0    # page bytes per second, end to end (sent .. committed) ...
        self._bw = 0.0         # ... of the bulk round, and of the later rounds
        self._epoch = 0        # the last epoch begun
        self._acked_upto = 0
        self._wire_per_page = float(PAGE)
        self._q: queue.Queue[Round | None] = queue.Queue()
        self._inflight: list[Round] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._hb_lock = threading.Lock()
        self._closing = False  # the sender thread must send nothing more

    # --- connection ---------------------------------------------------------------------------
    def connect(self) -> None:
        """Connect and shake hands (Hello carries the configuration the target builds)."""
        link = Link(connect(self.addr), Connection(PRIMARY, self.key, insecure=self.insecure,
                                                   compress_level=self.opt.compress_level))
        try:
            handshake(link, Hello(role="primary", version=PROTOCOL_VERSION,
                                  session_id=os.urandom(16), config=self.m.config.to_json()))
        except HandshakeRefused as e:
            link.close()
            raise MigrationError(f"the target refused the migration: {e}") from None
        except TimeoutError:
            link.close()
            raise MigrationError("the target did not answer the handshake within 10 s") from None
        except LinkClosed:
            link.close()
            raise MigrationError("the target closed the connection during the handshake (wrong "
                                 "key, or not a `dirtyring receive`: see its log)") from None
        except ProtocolError as e:
            link.close()
            raise MigrationError(f"handshake with the target failed: {e}") from None
        self.link = link
        self.emit({"event": "connected", "t": time.time(),
                   "target": f"{self.addr[0]}:{self.addr[1]}"})

    def start(self) -> None:
        for fn in (self._sender, self._receiver):
            t = threading.Thread(target=fn, name=f"migrate-{fn.__name__.strip('_')}",
                                 daemon=True)
            t.start()
            self._threads.append(t)

    @property
    def bw(self) -> float:
        """Bandwidth estimate, page bytes per second sent .. committed. The bulk round is a
        poor guide (the target faults its memory in): it counts only until a later round
        measured something."""
        return self._bw or self._bw_bulk

    def submit(self, rnd: Round) -> None:
        """Queue a round; ``rnd.done`` is set once the target committed it (or the link died:
        check :attr:`lost`)."""
        with self._lock:
            if self.lost.is_set():
                rnd.done.set()
                return
            self._inflight.append(rnd)
        self._q.put(rnd)

    def send_last(self, rnd: Round) -> None:
        """Send the stop-and-copy round from the calling thread (the guest is paused, so it
        waits anyway): the sender thread is stopped first and sends nothing more, not even a
        heartbeat, and no hand-off between threads adds to the downtime. ``rnd.done`` as for
        :meth:`submit`."""
        with self._hb_lock:
            self._closing = True  # after Failover our side of the stream is closed
        self._q.put(None)
        with self._lock:
            if self.lost.is_set():
                rnd.done.set()
                return
            self._inflight.append(rnd)
        try:
            self._send_round(rnd)
        except (LinkClosed, ProtocolError) as e:
            self._lose(f"sending to the target failed: {e}")

    def switchover(self) -> None:
        """After the last round (:meth:`send_last`) was acked: send Failover("switchover") and
        wait for the target to confirm it resumed the guest."""
        assert self.link is not None and self._closing
        try:
            self.link.send(Failover(reason="switchover"))
        except (LinkClosed, ProtocolError) as e:
            raise MigrationError(f"sending the switchover failed ({e}); the target may or may "
                                 "not run the guest: do not resume the source",
                                 source_may_run=False) from None
        if not self.target_resumed.wait(max(10.0, self.opt.heartbeat_timeout)):
            why = self.lost_reason or "no answer"
            raise MigrationError(f"the target did not confirm it resumed ({why}); do not "
                                 "resume the source", source_may_run=False)

    def close(self) -> None:
        """Close the connection and join the threads."""
        self.lost.set()
        self._q.put(None)
        if self.link is not None:
            self.link.close()
        for t in self._threads:
            t.join(2.0)

    # --- sender thread --------------------------------------------------------------------------
    def _send(self, ev: Any) -> int:
        """Send one event; returns its bytes on the wire."""
        assert self.link is not None
        before = self.link.conn.statistics().bytes_out
        self.link.send(ev)
        return self.link.conn.statistics().bytes_out - before

    def _sender(self) -> None:
        last = time.monotonic()
        hb = 0
        while not self.lost.is_set():
            try:
                rnd = self._q.get(timeout=self.opt.heartbeat_interval)
            except queue.Empty:
                rnd = None
            else:
                if rnd is None:
                    return  # the switchover follows, or we are closing
            try:
                if rnd is None:
                    if time.monotonic() - last >= self.opt.heartbeat_interval:
                        with self._hb_lock:
                            if self._closing:
                                return
                            hb += 1
                            self._send(Heartbeat(seq=hb, sent_ns=time.monotonic_ns()))
                        last = time.monotonic()
                    continue
                self._send_round(rnd)
                last = time.monotonic()
            except (LinkClosed, ProtocolError) as e:
                self._lose(f"sending to the target failed: {e}")

    def _chunk(self) -> int:
        """Pages per frame: at a bandwidth limit, about 20 ms of link time each."""
        lim = self.opt.bandwidth_limit
        if not lim:
            return self.opt.chunk_pages
        return int(min(self.opt.chunk_pages, max(16, lim * 0.02 / self._wire_per_page)))

    def _frames(self, rnd: Round) -> Any:
        """(slot, pages, payload bytes) per Pages frame of ``rnd``. The bulk round sends only
        pages that hold data: its first epoch is "full", so the target starts from zeroed
        memory and the holes need not travel."""
        mem = self.m.memory
        assert mem is not None
        if rnd.kind != "full":
            for slot, pages in rnd.dirty.items():
                yield from self._read(slot, pages)
            return
        for slot, pages in rnd.dirty.items():
            has_data = np.isin(pages, mem.slots[slot].populated_pages(), assume_unique=True)
            yield from self._read(slot, pages[has_data])

    def _read(self, slot: int, pages: np.ndarray) -> Any:
        """Frames of ``pages`` read from guest memory: one copy into the frame's bytes for a
        contiguous chunk (the common case), a gather and a copy otherwise."""
        mem = self.m.memory
        assert mem is not None
        view = mem.slots[slot].rows
        i = 0
        while i < len(pages):
            n = self._chunk()
            chunk = pages[i:i + n]
            first, last = int(chunk[0]), int(chunk[-1])
            if last - first + 1 == len(chunk):
                yield slot, chunk, view[first:last + 1].tobytes()
            else:
                for run in gather(mem, DirtySet({slot: chunk}), max_run_pages=n):
                    yield run.slot, run.pages, run.payload()
            i += n

    def _send_round(self, rnd: Round) -> None:
        """Send ``rnd`` as epochs of at most ``epoch_pages`` pages of data each: the target
        stages an epoch before committing it, so small epochs keep its staging memory small
        (and reused) instead of growing it, a fault per page, by a whole round.

        Small events ride along with the next Pages frame in one write; a small round (the
        usual stop-and-copy) goes out as one write of batch frames."""
        rnd.t0 = time.perf_counter()
        lim = self.opt.bandwidth_limit
        whole = len(rnd.dirty) <= self.opt.chunk_pages  # one write for all of it
        pending: list[Any] = []
        wire = 0

        def flush() -> int:
            assert self.link is not None
            if not pending:
                return 0
            if len(pending) == 1:
                n = self._send(pending[0])
            else:
                n = self.link.send_epochs([(list(pending), False)])[0]
            pending.clear()
            return n

        self._epoch += 1
        pending.append(EpochBegin(epoch=self._epoch, kind=rnd.kind))
        in_epoch = data_in_epoch = 0
        for slot, pages, payload in self._frames(rnd):
            if self.lost.is_set():
                raise LinkClosed(self.lost_reason)
            if data_in_epoch >= self.opt.epoch_pages:
                pending.append(EpochEnd(epoch=self._epoch, n_pages=in_epoch, digest=b"",
                                        output_seq=0))
                self._epoch += 1
                rnd.epochs += 1
                in_epoch = data_in_epoch = 0
                pending.append(EpochBegin(epoch=self._epoch, kind="delta"))
            data_in_epoch += len(pages)
            pending.append(Pages(epoch=self._epoch, slot=slot, page_size=PAGE, pages=pages,
                                 data=payload))
            in_epoch += len(pages)
            rnd.pages += len(pages)
            rnd.raw += len(payload)
            self.sent_pages += len(pages)
            self.sent_raw += len(payload)
            if whole:
                continue
            w = flush()
            wire += w
            self._wire_per_page = 0.8 * self._wire_per_page + 0.2 * w / len(pages)
            if lim:  # pace: never more than one frame ahead of the limit
                ahead = wire / lim - (time.perf_counter() - rnd.t0)
                if ahead > 0:
                    time.sleep(ahead)
        if rnd.state:
            pending.append(MachineBlob(epoch=self._epoch, blob=rnd.state))
        pending.append(EpochEnd(epoch=self._epoch, n_pages=in_epoch, digest=rnd.digest,
                                output_seq=0))
        wire += flush()
        rnd.epochs += 1
        rnd.wire = wire
        self.raw += rnd.raw
        self.wire += wire
        self.pages += rnd.pages
        with self._lock:
            rnd.last_epoch = self._epoch
            acked = self._acked_upto
        if acked >= rnd.last_epoch:  # acked before we got here
            self._acked(acked)

    # --- receiver thread --------------------------------------------------------------------------
    def _acked(self, epoch: int) -> None:
        """Acks are cumulative: every round whose last epoch is ``<= epoch`` is committed."""
        now = time.perf_counter()
        with self._lock:
            self._acked_upto = max(self._acked_upto, epoch)
            done = [r for r in self._inflight if r.last_epoch and r.last_epoch <= epoch]
            self._inflight = [r for r in self._inflight if r not in done]
        for r in done:
            r.seconds = now - r.t0
            if r.raw >= (1 << 20):
                bw = r.raw / max(r.seconds, 1e-6)
                if r.kind == "full":
                    self._bw_bulk = bw
                else:
                    self._bw = bw if not self._bw else 0.5 * self._bw + 0.5 * bw
            elif self.bw:  # a small round measures the fixed cost of an epoch (latency)
                fixed = max(0.0, r.seconds - r.raw / self.bw)
                self.fixed = fixed if not self.fixed else min(self.fixed, fixed)
            r.done.set()
        if done:
            self.kick()

    def _receiver(self) -> None:
        assert self.link is not None
        try:
            for ev in self.link.events(timeout=self.opt.heartbeat_timeout):
                if isinstance(ev, Ack):
                    self._acked(ev.epoch)
                elif isinstance(ev, ResyncEvent):
                    self._lose(f"the target's memory differs from ours after epoch {ev.epoch} "
                               f"({ev.reason})")
                    return
                elif isinstance(ev, Failover):
                    self.target_resumed.set()
                    return
                elif isinstance(ev, Goodbye):
                    self._lose(f"the target said goodbye: {ev.reason}")
                    return
        except TimeoutError:
            self._lose(f"no frame from the target for {self.opt.heartbeat_timeout:g} s")
        except (LinkClosed, ProtocolError) as e:
            self._lose(f"connection to the target lost: {e}")

    def _lose(self, reason: str) -> None:
        with self._lock:
            if self.lost.is_set():
                return
            self.lost_reason = reason
            self.lost.set()  # under the lock: submit() sees it or its round is failed here
            rounds, self._inflight = self._inflight, []
        for r in rounds:
            r.done.set()
        self.kick()
