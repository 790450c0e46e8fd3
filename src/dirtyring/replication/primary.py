"""The Remus primary: run the guest in epochs and stream each checkpoint to a standby.

Theory of operation
-------------------
1. Handshake (Hello carries the machine configuration so the standby can build the same VM),
   through the *uplink*: the process that owns the connection to the standby (see
   ``uplink_handle.py``: encoding and sending in a thread of this process fought the epoch loop for the
   GIL).
2. Initial full sync while the guest runs: re-arm tracking for every page, then copy all of
   memory live as epoch 1 (kind "full", no machine state: it is not yet consistent). Pages the
   guest changes meanwhile are in the next harvest.
3. Epoch loop: let the guest run for the interval or until its ring is full (the dirty budget);
   pause all vCPUs; harvest + re-arm; gather the dirty pages into the uplink's staging area and
   capture the machine state; tag output produced so far with this epoch; resume the guest at
   once; tell the uplink, which sends in the background. Staging is bounded: when it is full
   the loop waits, which slows the guest rather than losing data.
4. At every epoch boundary the loop reads the last acknowledged epoch from the staging header
   and releases the output it covers (output commit). The uplink reports rare events: Resync
   makes the next epoch a full copy taken while paused; losing the standby (EOF, error, or no
   frame within the heartbeat timeout) makes the primary *degraded*: it stops tracking and lets
   the guest run unprotected; a standby that took over fences us.
5. One live copy, always. Going on alone is safe only if the standby cannot go live too:
   - with an arbiter (``--etcd``, ``arbiter.py``): the primary first marks the standby's copy
     stale in etcd (then it can never take over), and releases output only while its lease
     holds; losing the group's key fences it;
   - without one, a lost standby cannot be told from a cut link: the primary goes on (a
     partition can then give two live copies: the CLI says so at start), except when its own
     uplink died. Then the standby saw its connection drop and takes over, so the primary
     releases what was acknowledged and fences itself.
"""
from __future__ import annotations

import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import DirtyringError
from ..machine.epoch import Epoch, EpochDriver
from ..machine.stats import EpochStats
from ..machine.vm import Machine
from ..tracking import DirtySet
from ..wire import Hello, PROTOCOL_VERSION
from ..machine.checkpoint import capture_state
from .arbiter import Arbiter, ArbiterUnavailable
from .output_commit import OutputGate
from .staging_area import CELL_PAGES, CELLS
from .steady_pause import SteadyPause, SteadyRun
from .transport import connect
from .uplink_handle import UPLINK_DIED, Uplink
from .uplink_messages import (Acked, FromUplink, Lost, ResyncRequested, RevokerArmed, Skipped,
                              StandbyTookOver, WireStats)

PAGE = 4096
EventSink = Callable[[dict[str, Any]], None]


@dataclass(frozen=True, slots=True, kw_only=True)
class PrimaryOptions:
    """How a primary replicates: epoch length, heartbeats, staging, output commit, verify.

    Example::

        opt = dirtyring.PrimaryOptions(interval=0.0005, heartbeat_timeout=0.5, verify=True)
        p = dirtyring.protect(m, sb_addr, key, options=opt)
    """

    interval: float = 0.001
    heartbeat_interval: float = 0.1
    heartbeat_timeout: float = 1.0
    #: The staging area's shape: cells, each up to ``cell_pages`` pages (the defaults and why
    #: they are what they are: ``staging_area.CELLS``).
    staging_cells: int = CELLS
    cell_pages: int = CELL_PAGES
    unsafe_output: bool = False
    verify: bool = False
    compress_level: int = 1
    #: Checkpoints ended within this window go to the standby together (one wakeup of the
    #: uplink, one write, one ack for all of them; each is still committed on its own), unless
    #: output is held for them: then each goes at once. Measured with a 64-page hot set at
    #: 150 µs epochs: 2 ms instead of 0.5 ms took the uplink and the standby from ~0.95 to
    #: ~0.7 of a core together (wakeups, writes and acks are per batch), which left the epoch
    #: loop a core of its own. 4 ms: steady batches of ~23 instead of ~12, whose Python
    #: afterwards (~250 µs right after the guest ran, ~330-480 µs for the longer batch) costs
    #: ~14 instead of ~22 µs per checkpoint. A crash loses at most this much more uncommitted
    #: guest work; no output is ever released before its checkpoint is acknowledged.
    batch_window: float = 0.004
    #: Take checkpoints of a steady hot set in native code (``steady_pause.py``) where it applies,
    #: several epochs per call: as many as fit the batch window, at most this many.
    steady_pause: bool = True
    steady_batch: int = 32


class Primary:
    """The Remus primary (see the module docstring); :func:`dirtyring.protect` wires one up.

    Example::

        prim = dirtyring.Primary(m, ("10.0.0.2", 7000), key, on_event=print)
        prim.connect()
        prim.run(10.0)                       # epochs on this thread
        prim.close()
    """

    def __init__(self, machine: Machine, standby: tuple[str, int], key: bytes, *,
                 insecure: bool = False, options: PrimaryOptions = PrimaryOptions(),
                 on_event: EventSink | None = None,
                 release: Callable[[str, Any, int], None] | None = None,
                 arbiter: Arbiter | None = None) -> None:
        """``arbiter``: the group's key in etcd, already acquired (``Arbiter.acquire``); None
        runs without split-brain protection against partitions (see the module's notes)."""
        if machine.tracker is None:
            raise DirtyringError("replication needs a tracked machine (tracker != none)")
        self.m = machine
        self.addr = standby
        self.key = key
        self.insecure = insecure
        self.opt = options
        self.on_event = on_event or (lambda e: None)
        stdio = machine.stdio
        self.gate = OutputGate(release or (lambda k, p, e: None), hold=not options.unsafe_output,
                               delivered=stdio.delivered if stdio is not None else None)
        # Epoch 1 is the live full copy, which carries no machine state and cannot be failed
        # over to: output from before the first consistent checkpoint belongs to epoch 2.
        self.gate.advance(2)
        machine.sink = self.gate.emit
        if stdio is not None:
            # A Linux program's output stays in its device state until the gate released it,
            # so every checkpoint carries what a standby must write if we die before writing.
            stdio.keep_undelivered = True
        self.drv = EpochDriver(machine)
        self.stats = EpochStats(histograms=True)  # (for the metrics: see machine.stats)
        self.state = "starting"
        self.epoch = 0
        self.acked = 0
        self._resync = threading.Event()
        self._lost = threading.Event()
        self._stop = threading.Event()
        self.lost_reason = ""
        self.up: Uplink | None = None
        self.max_staging_bytes = 0
        self.fenced = False
        self.skipped_after_resync = 0
        self._wire: dict[str, Any] = {}
        self._ack_lock = threading.Lock()
        self.arbiter = arbiter
        #: Alone without a standby, is the standby's copy marked stale in etcd yet (only then
        #: may output leave without its acknowledgement)?
        self._alone = False
        self._alone_lock = threading.Lock()
        # The epoch loop's own state (``run``).
        self._consistent_epoch = 0  # the first checkpoint with machine state
        self._carry = DirtySet()  # harvested while no checkpoint was taken: in the next one
        self._t_end: float | None = None
        self._stop_evt: threading.Event | None = None
        self._steady: SteadyPause | None = None
        self._last_queued = 0  # the last epoch handed to the uplink
        self._t_last = 0.0  # when the previous epoch's checkpoint was ended
        if arbiter is not None:
            arbiter.on_lost = lambda why: self._fence(
                f"lost the group's key in etcd ({why}); another copy may be live: stopping")

    # --- events ---------------------------------------------------------------------------------
    def _emit(self, kind: str, **fields: Any) -> None:
        self.on_event({"event": kind, "t": time.time(), **fields})

    # --- connection -----------------------------------------------------------------------------
    def connect(self, sock: socket.socket | None = None) -> None:
        """Start the uplink on ``sock`` (or a new connection) and handshake with the standby.

        Connecting *before* the VM is built (the CLI does) means the connection exists before
        the guest's memory does; the uplink process that owns it has no VM, so it closes fast."""
        sock = sock or connect(self.addr)
        assert self.m.memory is not None
        self.up = Uplink(sock, self.key, insecure=self.insecure,
                         compress_level=self.opt.compress_level,
                         heartbeat_interval=self.opt.heartbeat_interval,
                         heartbeat_timeout=self.opt.heartbeat_timeout,
                         slot_sizes=[s.info.size for s in self.m.memory.slots],
                         cells=max(2, self.opt.staging_cells),
                         cell_pages=self.opt.cell_pages, on_message=self._on_message,
                         lease=self.arbiter.handoff() if self.arbiter is not None else None)
        session = os.urandom(16)
        ok, reason = self.up.hello(Hello(role="primary", version=PROTOCOL_VERSION,
                                         session_id=session,
                                         config=self.m.config.to_json(),
                                         token=self.arbiter.token if self.arbiter else 0))
        if ok and self.arbiter is not None:
            # This standby, and only it, may take over from now on (while we hold the key).
            try:
                if not self.arbiter.set_replica(session.hex()):
                    ok, reason = False, "the group's key in etcd is held by another copy"
            except ArbiterUnavailable as e:
                ok, reason = False, f"cannot name the standby in etcd: {e}"
        if not ok:
            self.up.kill()
            self.up = None
            raise DirtyringError(reason if reason.startswith(("the ", "handshake", "cannot"))
                                 else f"standby refused us: {reason}")
        self._emit("connected", standby=f"{self.addr[0]}:{self.addr[1]}")

    # --- what the uplink reports ---------------------------------------------------------------
    def _on_message(self, msg: FromUplink) -> None:
        match msg:
            case ResyncRequested(epoch=epoch, reason=reason):
                self._emit("resync_requested", epoch=epoch, reason=reason)
                self._resync.set()
            case StandbyTookOver(reason=reason):
                self._fence(f"the standby took over ({reason}); stopping this copy")
            case Lost(reason=reason):
                if self.state != "starting":  # (during the handshake, connect() reports it)
                    self._lose(reason, uplink_died=reason == UPLINK_DIED)
            case RevokerArmed():  # from now on a crash of ours frees the key at once
                self._emit("lease_revoker_armed", **self._lease_fields())
            case Skipped():
                self.skipped_after_resync += 1
            case WireStats(values=values):
                self._wire = values
            case Acked():  # output was waiting for it: release it now, not next epoch
                self._poll_acks()

    def _poll_acks(self) -> None:
        """Release the output the standby's latest acknowledgement covers (from the epoch
        loop at each epoch boundary, and from the uplink's reader when output waits)."""
        up = self.up
        if up is None:
            return
        with self._ack_lock:
            a = up.acked
            if a <= self.acked:
                return
            self.acked = a
            self.gate.commit(a)
            if (self.state == "syncing" and self._consistent_epoch
                    and a >= self._consistent_epoch):
                self.state = "protected"
                self._emit("protected", epoch=a)

    def _fence(self, reason: str) -> None:
        """The standby went live (or may): two copies must never run (split brain). Output
        the standby acknowledged is released; the rest belongs to epochs it never committed:
        it is dropped, never released. The group's key in etcd, if held, is given up."""
        if self.fenced:
            return
        self._poll_acks()
        self.fenced = True
        self.gate.drop()
        self.lost_reason = reason
        self.state = "fenced"
        self._lost.set()
        if self.arbiter is not None:
            self.arbiter.release()

    def _lose(self, reason: str, *, uplink_died: bool = False) -> None:
        if self._lost.is_set() or self.fenced:
            return
        if uplink_died and self.arbiter is None and self.state != "stopping":
            # The standby saw its connection drop: it takes over (and cannot be asked).
            self._fence(f"{reason}: the standby takes over when its connection drops, so this "
                        "copy stops (no arbiter to say otherwise: see --etcd)")
            return
        self.lost_reason = reason
        self._lost.set()
        if self.arbiter is None:
            self.gate.unhold()
        if self.state != "stopping":
            self.state = "degraded"
            self._emit("degraded", reason=reason, last_acked=self.acked,
                       output="released" if self.gate.releasing else "held",
                       **self._lease_fields())
        self._go_alone()

    def _go_alone(self) -> bool:
        """With an arbiter: mark the standby's copy stale in etcd, then release output while
        the lease holds. Until the mark is made (etcd unreachable) output stays held; the
        degraded loop tries again. False while not alone yet."""
        with self._alone_lock:
            if self._alone or self.arbiter is None or self.fenced:
                return self._alone
            try:
                if not self.arbiter.set_replica(""):
                    return False  # (lost the key: on_lost fenced us)
            except ArbiterUnavailable:
                return False
            self._alone = True
        self.gate.unhold(self.arbiter.may_release)
        self._emit("alone", reason="the standby's copy is marked stale in etcd: output is "
                   "released while our lease holds", **self._lease_fields())
        return True

    def _lease_fields(self) -> dict[str, Any]:
        a = self.arbiter
        if a is None:
            return {}
        return {"lease": {"group": a.group, "holder": a.who if a.token and not a.lost else "",
                          "revision": a.token, "ttl_left_s": round(a.ttl_left(), 3),
                          "output_held": not self.gate.releasing}}

    # --- main loop ------------------------------------------------------------------------------
    def run(self, duration: float | None = None, *, progress_every: float = 0.5,
            stop: threading.Event | None = None) -> None:
        if self.up is None:
            self.connect()
        # In threaded mode the vCPU threads re-take the GIL after every exit; the default 5 ms
        # switch interval would let any other busy thread hold it that long.
        sys.setswitchinterval(1e-4)
        self.state = "syncing"
        m = self.m
        t_end = None if duration is None else time.monotonic() + duration
        self._t_end, self._stop_evt = t_end, stop
        next_report = time.monotonic() + progress_every
        if self.opt.steady_pause and self.up is not None:
            self._steady = SteadyPause.for_primary(m, self.up.stager, verify=self.opt.verify)
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
                self._poll_acks()
                if m.crashed:
                    self._emit("guest_crashed", reason=m.crashed)
                    break
                if m.finished:  # (a Linux program ended: its last checkpoint is queued)
                    self._emit("guest_finished", epoch=self.epoch,
                               exit_code=m.runners[0].exit_code)
                    break
                if time.monotonic() >= next_report:
                    next_report += progress_every
                    self.stats.progress(m.progress())
                    self._emit("stats", **self.snapshot())
        finally:
            if not self._lost.is_set():
                self.state = "stopping"
            self._stop.set()

    def _given_up(self) -> bool:
        """While waiting for staging space: stop waiting if the standby is lost or the run is
        over (a stalled standby must not keep a planned stop from happening)."""
        return (self._lost.is_set() or (self._stop_evt is not None and self._stop_evt.is_set())
                or (self._t_end is not None and time.monotonic() >= self._t_end))

    def _stage(self, epoch: int, kind: str, dirty: DirtySet) -> int:
        """Gather ``dirty`` into the uplink's staging area (waits for free cells)."""
        assert self.up is not None and self.m.memory is not None
        n = 0
        for slot, pages in dirty.items():
            view = self.m.memory.slots[slot].rows
            n += self.up.stager.stage(epoch, kind, slot, view, pages, self._given_up)
        self.max_staging_bytes = max(self.max_staging_bytes, self.up.staging_bytes)
        return n

    def _initial_sync(self) -> None:
        m = self.m
        assert self.up is not None and m.memory is not None
        m.pause_all()
        self.drv.tracker.full()  # re-armed: what the guest writes from now on is harvested
        everything = self._full_copy()
        m.resume_all()
        self.epoch = 1
        self._emit("sync_started", pages=len(everything), bytes=len(everything) * PAGE)
        if m.threaded:
            self._stage(1, "full", everything)  # the vCPU threads run meanwhile
        else:
            # Single-threaded: copy in chunks and let the guest run between them, so the full
            # copy is taken "while the guest runs" here too. What it dirties meanwhile is
            # carried into the first delta epoch.
            for slot, pages in everything.items():
                for i in range(0, len(pages), 2048):
                    self._stage(1, "full", DirtySet({slot: pages[i:i + 2048]}))
                    self.up.alive()
                    why = m.runners[0].run_inline(self.opt.interval)
                    if why == "budget":
                        self._carry = self._carry | self.drv.harvest_paused()[0]
        self.up.end(1, "full", b"", b"", 0)
        self._last_queued = 1

    def _full_copy(self) -> DirtySet:
        """The pages a full epoch carries: those that hold data. The standby zeroes its memory
        before applying a full epoch, so never-written pages (holes) need not travel: a fresh
        1 GiB guest syncs its few populated megabytes, not a gigabyte of zeros."""
        assert self.m.memory is not None
        return self.m.memory.populated()

    def _make_room(self) -> None:
        """Backpressure without pausing: while the uplink is behind, let the guest run on (a
        longer epoch) instead of stopping it to take a checkpoint that would only wait in
        staging. The epoch length adapts to what the pipeline can carry."""
        up, m = self.up, self.m
        assert up is not None
        while not up.stager.has_room() and not self._lost.is_set() and not self._given_up():
            up.alive()
            if m.threaded:
                time.sleep(self.opt.interval)  # the vCPU threads are running meanwhile
            elif m.runners[0].run_inline(self.opt.interval) == "budget":
                # A full ring must be harvested before the vCPU may run again: keep what it
                # held for the next checkpoint.
                self._carry = self._carry | self.drv.harvest_paused()[0]
            elif m.crashed or m.finished:
                return

    def _one_epoch(self) -> None:
        """One epoch and its checkpoint, or, while the hot set holds, a batch of them taken in
        native code (``steady_pause.py``) and possibly one more epoch ended the ordinary way."""
        m = self.m
        assert self.up is not None
        self._make_room()  # before the epoch's run: its harvest must cover every write
        steady = None if self._carry or self._resync.is_set() else self._steady
        got = None
        if steady is not None:
            most = max(1, min(self.opt.steady_batch,
                              int(self.opt.batch_window / max(self.opt.interval, 1e-6))))
            got = steady.run(self.epoch + 1, self.opt.interval, most)
        if got is not None:
            self._queue_steady(got)
            if got.tail is None:
                return
            assert steady is not None
            why, run_s = steady.finish(got, self.opt.interval) if got.tail == "exit" else \
                (got.tail, time.monotonic() - got.tail_entered)
            e = self.drv.harvest_epoch(self.drv.ran(why, run_s))
        else:
            e = self.drv.run_epoch(self.opt.interval)
        t0 = time.perf_counter()
        staged = self._stage_epoch(e)
        if staged is None:  # gave up waiting for staging space: this epoch is never sent
            if self._steady is not None:
                self._steady.stale()
            m.resume_all()
            return
        n, kind = staged
        self.epoch += 1
        self.up.alive()
        state, digest = capture_state(m, digest=self.opt.verify)
        outputs = self.gate.released
        self.gate.advance(self.epoch + 1)
        if not self._consistent_epoch:
            self._consistent_epoch = self.epoch
        if self._steady is not None:
            self._steady.checkpointed()  # the base of the next batch's deltas
        m.resume_all()
        t1 = time.perf_counter()
        self._queue(kind, state, digest, outputs, t1)
        self.stats.record(pause_s=e.harvest_s + (t1 - t0), harvest_s=e.harvest_s, dirty_pages=n,
                          nbytes=n * PAGE + len(state), resync=kind == "full",
                          budget=e.reason == "budget")

    def _due(self, t1: float) -> bool:
        """Must the checkpoint just ended go to the uplink now? Not while the batch window
        would still be open at the next epoch's end, unless output is held for it."""
        assert self.up is not None
        due = (self.gate.waiting
               or self.up.queued_for + (t1 - self._t_last) >= self.opt.batch_window)
        self._t_last = t1
        return due

    def _queue(self, kind: str, state: bytes, digest: bytes, outputs: int, t1: float) -> None:
        """Hand checkpoint ``self.epoch`` to the uplink."""
        assert self.up is not None
        waiting = self.gate.waiting
        due = self._due(t1) or kind == "full"
        self.up.end(self.epoch, kind, state, digest, outputs, flush=due, urgent=waiting)
        self._last_queued = self.epoch

    def _queue_steady(self, run: SteadyRun) -> None:
        """The checkpoints a steady batch completed (staged and laid out already). No output
        can have been made during the batch (an I/O exit ends it), so they all release what
        the gate releases now, and the gate moves past them at once."""
        assert self.up is not None
        self.up.alive()
        cps = run.epochs
        if cps is None:  # the batch stopped in its first epoch, which is not over yet
            assert run.tail is not None
            return
        assert cps.epoch == self.epoch + 1
        self.drv.counted(cps.count)
        outputs = self.gate.released
        self.epoch += cps.count
        self.gate.advance(self.epoch + 1)
        if not self._consistent_epoch:
            self._consistent_epoch = cps.epoch
        if run.tail is None:
            self.m.resume_all()  # the guest runs on right after this
        waiting = self.gate.waiting
        self.up.end_steady(cps, outputs, flush=self._due(time.perf_counter()), urgent=waiting)
        self._last_queued = self.epoch
        resumed = run.resumed if run.tail is not None else [*run.resumed, time.monotonic()]
        self.stats.record_many(pause_s=[r - e for r, e in zip(resumed, run.exited)],
                               dirty_pages=run.pages,
                               nbytes=run.pages * PAGE + cps.state_size + len(cps.devices))

    def _stage_epoch(self, e: Epoch) -> tuple[int, str] | None:
        """Stage the harvested epoch ``e`` the ordinary way: (pages, kind), or None if the
        run is stopping and staging space never came (nothing of the epoch is kept)."""
        assert self.up is not None
        dirty = e.dirty
        if self._carry:
            dirty, self._carry = dirty | self._carry, DirtySet()
        kind = "delta"
        if e.resync:
            kind = "full"  # tracking failed and already re-armed everything
            dirty = self._full_copy()
        elif self._resync.is_set():
            self._resync.clear()
            self.drv.tracker.full()
            dirty = self._full_copy()  # paused: a consistent full copy
            kind = "full"
        n = self._stage(self.epoch + 1, kind, dirty)
        if n < len(dirty):
            self.up.stager.abandon()
            if kind == "full":
                self._resync.set()
            return None
        return n, kind

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
            if self.arbiter is not None and self._go_alone():
                self.gate.flush()  # (output held while the lease was unsure, if renewed)
            if m.threaded:
                if m.wait_stopped(0.2) and m.crashed:
                    break
            elif m.runners[0].run_inline(0.2) == "stopped":
                break
            self.stats.progress(m.progress())
            self._emit("stats", **self.snapshot())

    # --- reporting --------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        s: dict[str, Any] = dict(self.stats.snapshot().as_dict())
        o = self.gate.statistics()
        w = self._wire
        s.update(state=self.state, epoch=self.epoch, acked=self.acked,
                 sent_epoch=int(w.get("sent_epoch", 0)),
                 guest_progress=self.m.progress(),
                 ack_ms_p50=float(w.get("ack_ms_p50", 0.0)),
                 ack_ms_p99=float(w.get("ack_ms_p99", 0.0)),
                 output_held=o.held, output_released=o.released,
                 output_delay_ms_p50=o.delay_ms_p50, output_delay_ms_max=o.delay_ms_max,
                 output_violations=self.gate.violations,
                 compression_ratio=float(w.get("compression_ratio", 1.0)),
                 staging_bytes=self.up.staging_bytes if self.up is not None else 0,
                 staging_bytes_max=self.max_staging_bytes,
                 steady_pauses=self._steady.taken if self._steady is not None else 0,
                 **self._lease_fields())
        return s

    def finish(self, stop: threading.Event | None = None) -> None:
        """The guest finished (a program ended): wait until its last checkpoint is
        acknowledged and every piece of output released, or the standby is lost and the
        output released without it. Only then may the program's end be reported: a planned
        stop (``close``) tells the standby not to take over, so output still held here
        would otherwise never be written by anyone."""
        up = self.up
        while up is not None and not self.fenced and not (stop is not None and stop.is_set()):
            up.flush()
            self._poll_acks()
            if up.acked >= self._last_queued and not self.gate.waiting:
                return
            if self._lost.is_set():
                if self.arbiter is not None and self._go_alone():
                    self.gate.flush()
                if not self.gate.waiting:
                    return
            up.alive()
            time.sleep(0.002)

    def close(self) -> None:
        """Stop replicating. A planned stop must not look like a crash to the standby: wait for
        the staged checkpoints to be acknowledged, then the uplink says Goodbye after the last
        frame, half-closes, and reads until the standby closes too."""
        self._stop.set()
        up = self.up
        if up is None:
            return
        if not self._lost.is_set():
            deadline = time.monotonic() + 2.0
            while up.acked < self._last_queued and time.monotonic() < deadline \
                    and not self._lost.is_set():
                up.alive()
                time.sleep(0.005)
            self._poll_acks()
            up.close("primary shutting down", max(6.0, 2 * self.opt.heartbeat_timeout + 1.0))
        else:
            up.kill()
        self._lost.set()
        if self.arbiter is not None:
            self.arbiter.release()  # (a planned stop: nobody need wait out our lease)
