"""The Remus primary: run the guest in epochs and stream each checkpoint to a standby.

Theory of operation
-------------------
1. Handshake (Hello carries the machine configuration so the standby can build the same VM).
2. Initial full sync while the guest runs: re-arm tracking for every page, then copy all of
   memory live as epoch 1 (kind "full", no machine state: it is not yet consistent). Pages the
   guest changes meanwhile are in the next harvest.
3. Epoch loop: let the guest run for the interval or until its ring is full (the dirty budget);
   pause all vCPUs; harvest + re-arm; gather the dirty pages and the machine state into a
   checkpoint; tag output produced so far with this epoch; resume the guest at once; hand the
   checkpoint to the sender thread. At most ``max_inflight`` checkpoints wait for the network
   (bounded staging): beyond that the loop waits, which slows the guest rather than losing data.
4. The receiver thread turns Ack(n) into output release (output commit) and measures the ack
   round trip; Resync makes the next epoch a full copy taken while paused; losing the standby
   (EOF, error, or no frame within the heartbeat timeout) makes the primary *degraded*: it
   releases held output, stops tracking and lets the guest run unprotected.
"""
from __future__ import annotations

import os
import queue
import socket
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..errors import DirtyringError, ProtocolError
from ..machine.epoch import EpochDriver
from ..machine.stats import EpochStats
from ..machine.vm import Machine
from ..wire import (PRIMARY, Ack, Connection, EpochBegin, EpochEnd, Failover, Goodbye, Heartbeat,
                    Hello, HelloAck, MachineBlob, Pages, WIRE_VERSION)
from ..wire import Resync as ResyncEvent
from ..tracking import DirtySet
from .checkpoint import Checkpoint, capture, gather
from .outputs import OutputGate
from .transport import Link, LinkClosed, connect

PAGE = 4096
EventSink = Callable[[dict[str, Any]], None]


@dataclass(frozen=True, slots=True, kw_only=True)
class PrimaryOptions:
    interval: float = 0.001
    heartbeat_interval: float = 0.1
    heartbeat_timeout: float = 1.0
    max_inflight: int = 4
    unsafe_output: bool = False
    verify: bool = False
    compress_level: int = 1


class Primary:
    def __init__(self, machine: Machine, standby: tuple[str, int], key: bytes, *,
                 insecure: bool = False, options: PrimaryOptions = PrimaryOptions(),
                 on_event: EventSink | None = None,
                 release: Callable[[str, Any, int], None] | None = None) -> None:
        if machine.tracker is None:
            raise DirtyringError("replication needs a tracked machine (tracker != none)")
        self.m = machine
        self.addr = standby
        self.key = key
        self.insecure = insecure
        self.opt = options
        self.on_event = on_event or (lambda e: None)
        self.gate = OutputGate(release or (lambda k, p, e: None), hold=not options.unsafe_output)
        # Epoch 1 is the live full copy, which carries no machine state and cannot be failed
        # over to: output from before the first consistent checkpoint belongs to epoch 2.
        self.gate.advance(2)
        machine.sink = self.gate.emit
        self.drv = EpochDriver(machine)
        self.stats = EpochStats()
        self.state = "starting"
        self.epoch = 0
        self.acked = 0
        self._sendq: queue.Queue[Checkpoint | None] = queue.Queue(maxsize=options.max_inflight)
        self._sent_at: dict[int, float] = {}
        self._rtt: deque[float] = deque(maxlen=4096)
        self._resync = threading.Event()
        self._lost = threading.Event()
        self._stop = threading.Event()
        self.lost_reason = ""
        self.link: Link | None = None
        self._threads: list[threading.Thread] = []
        self.staging_bytes = 0
        self.max_staging_bytes = 0
        self.fenced = False
        self._receiver_done = threading.Event()
        self._closing = threading.Event()  # close() has begun: the sender sends nothing new
        self.skipped_after_resync = 0
        self._shadows: dict[int, np.ndarray | None] = {}

    # --- events ---------------------------------------------------------------------------------
    def _emit(self, kind: str, **fields: Any) -> None:
        self.on_event({"event": kind, "t": time.time(), **fields})

    # --- connection -----------------------------------------------------------------------------
    def connect(self, sock: socket.socket | None = None) -> None:
        """Handshake with the standby, on ``sock`` if the caller connected it already.

        Connecting *before* the VM is built gives the socket a lower fd than KVM's: when this
        process dies, the kernel closes fds in ascending order, so the standby sees the
        connection drop before the VM's (slow, ~25 ms here) teardown instead of after it."""
        sock = sock or connect(self.addr)
        conn = Connection(PRIMARY, self.key, insecure=self.insecure,
                          compress_level=self.opt.compress_level)
        link = Link(sock, conn)
        sid = os.urandom(16)
        link.send(Hello(role="primary", version=WIRE_VERSION, session_id=sid,
                        config=self.m.config.to_json()))
        try:
            for ev in link.events(timeout=10.0):
                if isinstance(ev, HelloAck):
                    if not ev.accepted:
                        link.close()
                        raise DirtyringError(f"standby refused us: {ev.reason}")
                    break
                if isinstance(ev, Goodbye):
                    link.close()
                    raise DirtyringError(f"standby refused us: {ev.reason}")
        except TimeoutError:
            link.close()
            raise DirtyringError("the standby did not answer the handshake within 10 s") from None
        except ProtocolError as e:
            link.close()
            raise DirtyringError(f"handshake with the standby failed: {e}") from None
        self.link = link
        self._emit("connected", standby=f"{self.addr[0]}:{self.addr[1]}")

    #: Slots up to this size keep a shadow of what the standby holds, for XOR deltas.
    SHADOW_MAX_BYTES = 4 << 30

    def _shadow_of(self, slot: int) -> np.ndarray | None:
        sh = self._shadows.get(slot)
        if sh is None and slot not in self._shadows:
            assert self.m.memory is not None
            size = self.m.memory.slots[slot].info.size
            # np.zeros is calloc: untouched parts of a big, sparse slot cost nothing.
            sh = np.zeros((size // PAGE, PAGE), np.uint8) if size <= self.SHADOW_MAX_BYTES \
                else None
            self._shadows[slot] = sh
        return sh

    # --- threads --------------------------------------------------------------------------------
    def _sender(self) -> None:
        assert self.link is not None
        last = time.monotonic()
        hb = 0
        while not self._lost.is_set() and not self._closing.is_set():
            try:
                cp = self._sendq.get(timeout=self.opt.heartbeat_interval)
            except queue.Empty:
                cp = None
                if self._stop.is_set():
                    return
            try:
                if cp is None:
                    if time.monotonic() - last >= self.opt.heartbeat_interval:
                        hb += 1
                        self.link.send(Heartbeat(seq=hb, sent_ns=time.monotonic_ns()))
                        last = time.monotonic()
                    continue
                evs: list[Any] = [EpochBegin(epoch=cp.epoch, kind=cp.kind)]
                shadow_updates = []
                for r in cp.runs:
                    sh = self._shadow_of(r.slot)
                    if sh is not None and cp.kind == "delta":
                        # XOR against what the standby holds: a page that changed a little
                        # becomes mostly zero words, which the codec sends sparse.
                        data = np.bitwise_xor(r.data, sh[r.pages]).tobytes()
                        evs.append(Pages(epoch=cp.epoch, slot=r.slot, page_size=PAGE,
                                         pages=r.pages, data=data, delta=True))
                    else:
                        evs.append(Pages(epoch=cp.epoch, slot=r.slot, page_size=PAGE,
                                         pages=r.pages, data=r.payload()))
                    if sh is not None:
                        shadow_updates.append((sh, r.pages, r.data))
                if cp.state:
                    evs.append(MachineBlob(epoch=cp.epoch, blob=cp.state))
                evs.append(EpochEnd(epoch=cp.epoch, n_pages=cp.n_pages, digest=cp.digest,
                                    output_seq=cp.outputs))
                self._sent_at[cp.epoch] = time.monotonic()
                # A delta captured before a Resync arrived is superseded by the full epoch the
                # main loop captures next: drop it rather than send an illegal delta.
                if not self.link.send_many(evs, skip_if_resync=cp.kind == "delta"):
                    self._sent_at.pop(cp.epoch, None)
                    self.skipped_after_resync += 1
                else:
                    for sh, pages, data in shadow_updates:  # the standby's copy, from now on
                        sh[pages] = data
                last = time.monotonic()
                self.staging_bytes -= cp.nbytes
            except (LinkClosed, ProtocolError) as e:
                # The standby may have taken over and closed the link: its Failover is still in
                # our receive buffer. Let the receiver read it before treating this as a loss.
                self._receiver_done.wait(0.5)
                self._lose(f"sending to the standby failed: {e}")
                return

    def _receiver(self) -> None:
        try:
            self._receive()
        finally:
            self._receiver_done.set()

    def _receive(self) -> None:
        assert self.link is not None
        try:
            for ev in self.link.events(timeout=self.opt.heartbeat_timeout):
                if isinstance(ev, Ack):
                    t = self._sent_at.pop(ev.epoch, None)
                    for e in [e for e in list(self._sent_at) if e < ev.epoch]:
                        self._sent_at.pop(e, None)
                    if t is not None:
                        self._rtt.append((time.monotonic() - t) * 1e3)
                    self.acked = ev.epoch
                    self.gate.commit(ev.epoch)
                    if self.state == "syncing" and self._consistent_epoch and \
                            ev.epoch >= self._consistent_epoch:
                        self.state = "protected"
                        self._emit("protected", epoch=ev.epoch)
                elif isinstance(ev, ResyncEvent):
                    self._emit("resync_requested", epoch=ev.epoch, reason=ev.reason)
                    self._resync.set()
                elif isinstance(ev, Failover):
                    self._fence(f"the standby took over ({ev.reason}); stopping this copy")
                    return
                elif isinstance(ev, Goodbye):
                    self._lose(f"standby said goodbye: {ev.reason}")
                    return
                if self._stop.is_set() and self._lost.is_set():
                    return
        except TimeoutError:
            if self._stop.is_set():
                return  # closing: a slow goodbye is not a lost standby
            self._lose(f"no frame from the standby for {self.opt.heartbeat_timeout:g} s")
        except (LinkClosed, ProtocolError) as e:
            if not self._stop.is_set():
                self._lose(str(e))

    def _fence(self, reason: str) -> None:
        """The standby went live: two copies must never run (split brain). Held output belongs
        to epochs the standby never committed: it is dropped, never released."""
        self.fenced = True
        self.gate.drop()
        self.lost_reason = reason
        self.state = "fenced"
        self._lost.set()

    def _lose(self, reason: str) -> None:
        if self._lost.is_set() or self.fenced:
            return
        self.lost_reason = reason
        self._lost.set()
        self.gate.unhold()
        if self.state != "stopping":
            self.state = "degraded"
            self._emit("degraded", reason=reason, last_acked=self.acked)

    # --- main loop ------------------------------------------------------------------------------
    _consistent_epoch = 0
    _carry = DirtySet()

    def run(self, duration: float | None = None, *, progress_every: float = 0.5,
            stop: threading.Event | None = None) -> None:
        if self.link is None:
            self.connect()
        # The vCPU (inline: this thread) re-takes the GIL after every KVM_RUN; with the default
        # 5 ms switch interval a busy sender thread would hold it that long.
        sys.setswitchinterval(1e-4)
        for fn in (self._sender, self._receiver):
            t = threading.Thread(target=fn, name=fn.__name__.strip("_"), daemon=True)
            t.start()
            self._threads.append(t)
        self.state = "syncing"
        m = self.m
        t_end = None if duration is None else time.monotonic() + duration
        next_report = time.monotonic() + progress_every
        self._initial_sync()
        try:
            while not (stop is not None and stop.is_set()):
                if t_end is not None and time.monotonic() >= t_end:
                    break
                if self._lost.is_set():
                    if self.fenced:
                        m.pause_all()
                        self._emit("fenced", reason=self.lost_reason)
                    else:
                        self._run_unprotected(t_end, stop)
                    break
                self._one_epoch()
                if m.crashed:
                    self._emit("guest_crashed", reason=m.crashed)
                    break
                if time.monotonic() >= next_report:
                    next_report += progress_every
                    self.stats.progress(m.progress())
                    self._emit("stats", **self.snapshot())
        finally:
            if not self._lost.is_set():
                self.state = "stopping"
            self._stop.set()

    def _initial_sync(self) -> None:
        m = self.m
        m.pause_all()
        everything = self.drv.tracker.full()
        m.resume_all()
        self.epoch = 1
        assert m.memory is not None
        if m.threaded:
            runs = gather(m.memory, everything)  # the vCPU threads run meanwhile
        else:
            # Single-threaded: copy in chunks and let the guest run between them, so the full
            # copy is taken "while the guest runs" here too. What it dirties meanwhile is
            # carried into the first delta epoch.
            runs_l = []
            for run in gather(m.memory, everything, max_run_pages=2048):
                runs_l.append(run)
                why = m.runners[0].run_inline(self.opt.interval)
                if why == "budget":
                    self._carry = self._carry | self.drv.harvest_paused()[0]
            runs = tuple(runs_l)
        cp = Checkpoint(epoch=1, kind="full", runs=runs, state=b"", digest=b"", outputs=0)
        self._emit("sync_started", pages=cp.n_pages, bytes=cp.nbytes)
        self._queue(cp)

    _last_queued = 0

    def _queue(self, cp: Checkpoint) -> None:
        self._last_queued = cp.epoch
        self.staging_bytes += cp.nbytes
        self.max_staging_bytes = max(self.max_staging_bytes, self.staging_bytes)
        while not self._lost.is_set():
            try:
                self._sendq.put(cp, timeout=0.05)
                return
            except queue.Full:
                continue

    def _one_epoch(self) -> None:
        m = self.m
        e = self.drv.run_epoch(self.opt.interval)
        t0 = time.perf_counter()
        dirty = e.dirty
        if self._carry:
            dirty, self._carry = dirty | self._carry, DirtySet()
        kind = "delta"
        if e.resync:
            kind = "full"  # tracking failed and already re-armed everything: e.dirty is all
        elif self._resync.is_set():
            self._resync.clear()
            dirty = self.drv.tracker.full()  # paused: a consistent full copy
            kind = "full"
        self.epoch += 1
        cp = capture(m, dirty, epoch=self.epoch, kind=kind, digest=self.opt.verify,
                     outputs=self.gate.released)
        self.gate.advance(self.epoch + 1)
        if not self._consistent_epoch:
            self._consistent_epoch = self.epoch
        m.resume_all()
        pause = e.harvest_s + (time.perf_counter() - t0)
        self.stats.record(pause_s=pause, harvest_s=e.harvest_s, dirty_pages=cp.n_pages,
                          nbytes=cp.nbytes, resync=kind == "full", budget=e.reason == "budget")
        self._queue(cp)

    def _run_unprotected(self, t_end: float | None, stop: threading.Event | None) -> None:
        """Degraded: no standby. Stop tracking and let the guest run until told to stop."""
        m = self.m
        m.pause_all()
        self.drv.tracker.stop()
        m.resume_all()
        while not (stop is not None and stop.is_set()):
            if t_end is not None and time.monotonic() >= t_end:
                break
            if self.fenced:  # the standby took over after all: stop this copy
                m.pause_all()
                self._emit("fenced", reason=self.lost_reason)
                break
            if m.threaded:
                if m.wait_stopped(0.2) and m.crashed:
                    break
            elif m.runners[0].run_inline(0.2) == "stopped":
                break
            self.stats.progress(m.progress())
            self._emit("stats", **self.snapshot())

    # --- reporting --------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        s = self.stats.snapshot().as_dict()
        rtt = np.asarray(self._rtt) if self._rtt else np.zeros(1)
        o = self.gate.statistics()
        w = self.link.conn.statistics() if self.link is not None else None
        s.update(state=self.state, epoch=self.epoch, acked=self.acked,
                 guest_progress=self.m.progress(),
                 ack_ms_p50=float(np.percentile(rtt, 50)), ack_ms_p99=float(np.percentile(rtt, 99)),
                 output_held=o.held, output_released=o.released,
                 output_delay_ms_p50=o.delay_ms_p50, output_delay_ms_max=o.delay_ms_max,
                 output_violations=self.gate.violations,
                 compression_ratio=(w.compression_ratio_out if w else 1.0),
                 staging_bytes=max(self.staging_bytes, 0),
                 staging_bytes_max=self.max_staging_bytes)
        return s

    def close(self) -> None:
        """Stop replicating. A planned stop must not look like a crash to the standby: wait for
        the queued checkpoints to be acknowledged, say Goodbye, half-close, and read until the
        standby closes too."""
        self._stop.set()
        if self.link is not None and not self._lost.is_set():
            try:
                deadline = time.monotonic() + 2.0
                while (not self._sendq.empty() or self.acked < self._last_queued) \
                        and time.monotonic() < deadline and not self._lost.is_set():
                    time.sleep(0.005)
                # No frame may follow the Goodbye, and none may be cut by the half-close: the
                # sender finishes the frame it is writing, then stops.
                self._closing.set()
                for t in self._threads:
                    if t.name == "sender":
                        t.join(max(5.0, 2 * self.opt.heartbeat_timeout))
                self.link.send(Goodbye(reason="primary shutting down"))
                self.link.sock.shutdown(socket.SHUT_WR)
                # Keep reading until the standby closes too: closing with its acks unread
                # would send a reset, which can throw away our Goodbye before it is read.
                self._receiver_done.wait(max(5.0, 2 * self.opt.heartbeat_timeout))
            except (LinkClosed, ProtocolError, OSError):
                pass
        self._lost.set()
        if self.link is not None:
            self.link.close()
        for t in self._threads:
            t.join(2.0)
