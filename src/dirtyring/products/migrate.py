"""Live migration: replication that ends with a switchover.

Theory of operation
-------------------
The source speaks the replication protocol to a standby that never fails over by itself
(``Standby(auto_failover=False)``, as ``dirtyring receive`` runs it): Hello, then one *epoch*
per pre-copy round, each committed atomically by the target, then ``Failover("switchover")``,
which the target answers by resuming the guest and sending its own ``Failover``. Nothing here
encodes pages or captures state: the wire codec, ``Link``, ``checkpoint.gather``/``capture``
and the standby's staging + commit do that.

1. Round 0 (epoch 1, kind "full"): arm tracking for every page (``tracker.full()``), then send
   all of memory while the guest runs. Pages that are holes in the memfd were never written:
   they go out as zero pages without being read (reading would allocate them), and a target
   that has committed nothing yet does not stage zero pages (its memory is zero already).
2. Round k: the pages dirtied during round k-1, read from live memory while the guest runs (a
   page changed after it was re-armed is in the next round anyway, so a torn read is harmless).
   The sender paces itself to the bandwidth limit. A round ends when the target *acked* it:
   the bandwidth we estimate is end to end (the target's commit included), which is what the
   stop-and-copy will see.
3. Between rounds the guest is paused (inline mode: simply not entered): harvest, estimate the
   downtime as remaining dirty bytes / bandwidth + the fixed cost of an epoch. Under the limit
   (and no longer halving), at the timeout or at the round limit: stop-and-copy; otherwise
   re-arm and go on.
4. Stop-and-copy: ``capture()`` the last pages + machine state (+ memory digest with
   ``verify``), send it as the last epoch, wait for its Ack, send Failover("switchover"), wait
   for the target's Failover (it has resumed). The source stays paused for good. If anything
   fails before our Failover left, the source may simply run on; after it, it must not (the
   target may be running): ``MigrationError.source_may_run`` says which.

Re-arming and the dirty ring. A re-armed (write-protected) page costs the guest a fault on its
next write: ~3 µs here, 10-40 µs while another process on the host is busy faulting memory in
(the target is). The kernel's KVM_RESET_DIRTY_RINGS re-arms every entry it frees, so a working
set larger than the ring would make *every* write fault (QEMU's dirty-ring migration: 77 M ->
3 M pages/s). A ring-full exit only needs the entries freed, not the pages re-armed: pages
harvested inside a round are in the next round's set already and will be re-armed before they
are copied. So mid-round harvests (``rearm="round"``) overwrite the slot id of every consumed
entry with an id no memslot has before the reset; ``kvm_reset_dirty_gfn`` then frees the entry
and skips the re-protect (it checks the slot id). At the round boundary one toggle of
KVM_MEM_LOG_DIRTY_PAGES re-arms all pages, as a bitmap harvest would. Each page then faults at
most once per round, and a ring entry means "newly dirty this round": exactly the pages the
next round must send. Harvests happen only when a ring is full or a round ends.

Throttling (auto-converge). Ring-full exits are the pacing signal: each one means this vCPU made
ring-size-minus-64 pages newly dirty. With a target rate, the vCPU sleeps on each exit until its
newly-dirty pages per second fall to the target; a vCPU that dirties nothing new never exits
and runs at full speed. The target engages when a round's downtime estimate is over the limit
and no longer shrinks by a quarter, is set so that the next round fits half the limit, and at
least halves each time that fails. The bitmap has no such exit: it throttles the whole VM by
time slices (run 5 ms, then sleep).

The GIL matters here: the vCPU (this thread) needs it after every exit, so the sender thread
must not hold it for long (no per-frame allocation of zero buffers, one merge of the mid-round
harvests per round rather than one per exit).
"""
from __future__ import annotations

import ctypes
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

from ..errors import ConfigError, DirtyringError, GuestCrashed, ProtocolError
from ..machine.vm import Machine
from ..tracking import DirtySet, RingTracker
from ..tracking.ring import blocked_signals_call
from ..wire import (PRIMARY, Ack, Connection, EpochBegin, EpochEnd, Failover, Goodbye, Heartbeat,
                    Hello, HelloAck, MachineBlob, Pages, WIRE_VERSION)
from ..wire import Resync as ResyncEvent
from .checkpoint import Checkpoint, capture, gather
from .transport import Link, LinkClosed, connect

PAGE = 4096
EventSink = Callable[[dict[str, Any]], None]
#: A slot id no memslot has (ids are < KVM_USER_MEM_SLOTS = 32764): a reset skips the re-protect.
_NO_SLOT = 0xFFFF


class MigrationError(DirtyringError):
    """The migration failed. ``source_may_run`` says whether the source may go on running:
    False once the switchover was requested (the target may be running the guest)."""

    def __init__(self, message: str, *, source_may_run: bool = True) -> None:
        super().__init__(message)
        self.source_may_run = source_may_run


@dataclass(frozen=True, slots=True, kw_only=True)
class MigrationOptions:
    downtime_limit: float = 0.3      # seconds
    bandwidth_limit: float = 0.0     # bytes/s on the wire, 0 = unlimited
    timeout: float = 30.0            # total; at the timeout the migration stops and copies anyway
    max_rounds: int = 30
    throttle: bool = True
    settle: bool = True              # under the limit, go on while each round halves the estimate
    verify: bool = False             # the last epoch carries the memory digest (target checks it)
    compress_level: int = 0          # zlib is slower than loopback here; >0 for slow links
    rearm: str = "round"             # ring: "round" (deferred re-arm) or "harvest" (kernel's)
    chunk_pages: int = 1024          # pages per Pages frame (less at low bandwidth limits)
    heartbeat_interval: float = 0.1
    heartbeat_timeout: float = 10.0  # also bounds a blocked send: a target commits big epochs

    def __post_init__(self) -> None:
        if self.downtime_limit <= 0 or self.timeout <= 0 or self.max_rounds < 1:
            raise ConfigError("downtime limit, timeout and max rounds must be positive")
        if self.bandwidth_limit < 0:
            raise ConfigError("the bandwidth limit must be positive (0: unlimited)")
        if self.rearm not in ("round", "harvest"):
            raise ConfigError(f"rearm must be 'round' or 'harvest', not {self.rearm!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundStats:
    """One pre-copy round (or the final stop-and-copy, ``kind="final"``)."""

    round: int
    kind: str
    pages_sent: int
    seconds: float
    mb_per_s: float               # page data (raw) per second of sending
    wire_mb: float
    dirty_pages: int              # newly dirty during the round: the next round's set
    dirty_mb_per_s: float
    expected_downtime_ms: float
    throttle_pages_per_s: float   # ring: per-vCPU target, 0 = not throttled
    throttle_duty: float          # bitmap: fraction of time the guest runs, 1 = not throttled
    ring_full_exits: int
    guest_progress_per_s: float


@dataclass(frozen=True, slots=True, kw_only=True)
class MigrationReport:
    stop_reason: str              # converged | timeout | max_rounds | guest_stopped
    rounds: tuple[RoundStats, ...]
    total_s: float
    downtime_ms: float            # source paused .. target's "resumed" received
    final_pages: int
    pages_sent: int
    bytes_sent: int               # page data (raw)
    wire_bytes: int
    bandwidth_mb_s: float         # estimate at the switchover
    throttled: bool
    tracker: str
    pause_t: float                # wall clock of the pause (compare with the target's resume)
    source_state: str = "paused"
    final_digest: str = ""
    progress_before: int = 0
    progress_at_pause: int = 0
    extras: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rounds"] = [asdict(r) for r in self.rounds]
        return d


@dataclass(slots=True)
class _Round:
    """One epoch on its way: sent by the sender thread, done when the target acked it."""

    epoch: int
    kind: str
    dirty: DirtySet | None = None           # pre-copy: read from live memory
    checkpoint: Checkpoint | None = None    # stop-and-copy: captured while paused
    pages: int = 0
    raw: int = 0
    wire: int = 0
    t0: float = 0.0
    seconds: float = 0.0                    # first frame .. Ack (end to end)
    done: threading.Event = field(default_factory=threading.Event)


class _RoundTracking:
    """Harvest and re-arm as migration rounds need them (see the module docstring)."""

    def __init__(self, machine: Machine, rearm: str) -> None:
        t = machine.tracker
        if t is None:
            raise ConfigError("migration needs a tracked machine (--tracker ring or bitmap)")
        self.m = machine
        self.t = t
        self.deferred = isinstance(t, RingTracker) and rearm == "round"
        self.exits = 0
        if isinstance(t, RingTracker):
            self.limits = {s.slot: s.pages for s in t._slot_list}

    def start(self) -> DirtySet:
        """Arm every page; everything is to be sent."""
        return self.t.full()

    def mid_round(self) -> tuple[DirtySet, int]:
        """A ring-full exit: free the ring (re-arming only in ``rearm="harvest"`` mode)."""
        self.exits += 1
        if not self.deferred:
            d = self.t.harvest()
            return d, len(d)
        d, n = self._harvest_no_rearm()
        if n == 0:  # a ring-full exit with nothing to harvest: entries were lost (see ring.py)
            return self.t.full(), 0
        return d, n

    def boundary(self) -> DirtySet:
        """Paused, between rounds: what was dirtied since the last call. Call :meth:`rearm`
        before the guest runs again unless this was the last round."""
        if not self.deferred:
            return self.t.harvest()  # re-arms what it returns
        return self._harvest_no_rearm()[0]

    def rearm(self) -> None:
        """Paused, after :meth:`boundary`: re-arm every page the guest may have written."""
        if self.deferred:
            assert isinstance(self.t, RingTracker)
            self.t.rearm_all()  # the toggle RingTracker.full() uses (~10-20 ms for 1 GiB,
            #                     outside the downtime)

    def _harvest_no_rearm(self) -> tuple[DirtySet, int]:
        t = self.t
        assert isinstance(t, RingTracker)
        # RingTracker.harvest() would check this flag (set on every ring-full exit); we do the
        # check ourselves (mid_round) and clear it so a later harvest() does not misfire.
        t._pending_full_exit = False
        slots, offs, n = [], [], 0
        lost = False
        for r in t.rings:
            start = r.fetch
            s, o = r.harvest()
            if not len(s):
                continue
            lost |= len(s) >= r.size
            # SAFETY: these entries were published by KVM and consumed by us (flags = RESET);
            # KVM reads slot/offset back only inside KVM_RESET_DIRTY_RINGS, which checks them.
            r.entries["slot"][(start + np.arange(len(s))) % r.size] = _NO_SLOT
            slots.append(s.astype(np.int64))
            offs.append(o.astype(np.int64))
            n += len(s)
        if n:  # with no signal inside it (the host's reset defect)
            blocked_signals_call(t.vm.reset_dirty_rings)  # type: ignore[no-untyped-call]
        vmm = self.m.memory.take_vmm_dirty() if self.m.memory is not None else []
        if not n:
            return DirtySet.from_arrays(vmm), 0
        s_all, o_all = np.concatenate(slots), np.concatenate(offs)
        for slot in np.unique(s_all).tolist():
            if o_all[s_all == slot].max(initial=0) >= self.limits.get(int(slot), 0):
                lost = True
        if lost:  # entries may be lost or corrupt: everything is dirty, and re-armed
            return t.full(), n
        return DirtySet.from_pairs(s_all, o_all) | DirtySet.from_arrays(vmm), n


def _allocated(fd: int, pages: int) -> np.ndarray:
    """Which pages of a memfd slot hold data (SEEK_DATA/SEEK_HOLE); the others read as zero."""
    out = np.zeros(pages, bool)
    off, size = 0, pages * PAGE
    while off < size:
        try:
            start = os.lseek(fd, off, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after off
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        out[start // PAGE:(end + PAGE - 1) // PAGE] = True
        off = end
    return out


def tune_allocator(keep_bytes: int = 1 << 30) -> bool:
    """Make glibc keep freed memory in this process (``mallopt``); call once per process.

    Each round allocates and frees its frames (4 MiB each; a whole round's staging on the
    target). By default glibc returns them to the kernel and the next round faults them in
    again, and on this host page faults are slow *and* slow down the guest's own write faults
    (a migrating guest's ~3 µs faults took ~12 µs next to a process allocating memory).
    Returns False where glibc's mallopt is not available.
    """
    try:
        libc = ctypes.CDLL(None)
        m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
        return bool(libc.mallopt(m_mmap_threshold, 32 << 20)  # the largest glibc allows
                    and libc.mallopt(m_trim_threshold, min(keep_bytes, (1 << 31) - 1)))
    except (OSError, AttributeError):
        return False


def run_guest(machine: Machine, seconds: float) -> str:
    """Run an inline machine for ``seconds`` outside any migration (a warm-up, a baseline):
    ring-full exits free the ring without re-arming, so tracking costs the guest nothing.
    Returns "interval" or "stopped"."""
    track = _RoundTracking(machine, "round") if machine.tracker is not None else None
    r = machine.runners[0]
    end = time.perf_counter() + seconds
    while (left := end - time.perf_counter()) > 0:
        why = r.run_inline(left)
        if why == "stopped":
            if r.crash:
                raise GuestCrashed(r.crash)
            return why
        if why == "budget" and track is not None:
            track.mid_round()
    return "interval"


class Migration:
    """Migrate ``machine`` (inline: one vCPU run on the calling, main thread) to a receiver.

    ``run()`` returns a :class:`MigrationReport` once the target runs the guest; the source
    machine is then left paused (never entered again). Build it with
    ``Machine(config, threaded=False)`` from the main thread; ``close()`` afterwards.
    """

    def __init__(self, machine: Machine, target: tuple[str, int], key: bytes, *,
                 insecure: bool = False, options: MigrationOptions = MigrationOptions(),
                 on_event: EventSink | None = None) -> None:
        if machine.threaded or len(machine.runners) != 1:
            raise ConfigError("migration runs one vCPU inline: build the machine with "
                              "Machine(config, threaded=False)")
        if threading.current_thread() is not threading.main_thread():
            raise ConfigError("migration runs the guest on the main thread (its epoch timer "
                              "and kicks are SIGALRM)")
        self.m = machine
        self.addr = target
        self.key = key
        self.insecure = insecure
        self.opt = options
        self.on_event = on_event or (lambda e: None)
        self.track = _RoundTracking(machine, options.rearm)
        self.link: Link | None = None
        self._q: queue.Queue[_Round | None] = queue.Queue()
        self._inflight: list[_Round] = []
        self._lock = threading.Lock()
        self._target_resumed = threading.Event()
        self._lost = threading.Event()
        self.lost_reason = ""
        self._main_tid = threading.get_ident()
        self._threads: list[threading.Thread] = []
        self._raw = self._wire = self._pages = 0
        self._bw = 0.0          # page bytes per second, end to end (sent .. committed)
        self._fixed = 0.0       # the smallest round time seen: per-epoch fixed costs
        self._wire_per_page = float(PAGE)
        self._target_pps = 0.0  # ring throttle: per-vCPU newly-dirty pages per second
        self._duty = 1.0        # bitmap throttle: fraction of time the guest runs
        self._debt = 0.0        # ring throttle: seconds the vCPU still has to sleep
        self._acc: list[DirtySet] = []  # mid-round harvests, merged once at the boundary
        self.switchover_sent = False
        self.final_state = b""
        self.report: MigrationReport | None = None

    # --- events -----------------------------------------------------------------------------
    def _emit(self, event: str, **fields: Any) -> None:
        self.on_event({"event": event, "t": time.time(), **fields})

    # --- connection ---------------------------------------------------------------------------
    def connect(self) -> None:
        """Connect and shake hands (Hello carries the configuration the target builds)."""
        link = Link(connect(self.addr), Connection(PRIMARY, self.key, insecure=self.insecure,
                                                   compress_level=self.opt.compress_level))
        try:
            link.send(Hello(role="primary", version=WIRE_VERSION, session_id=os.urandom(16),
                            config=self.m.config.to_json()))
            for ev in link.events(timeout=10.0):
                if isinstance(ev, HelloAck) and ev.accepted:
                    break
                if isinstance(ev, (HelloAck, Goodbye)):
                    raise MigrationError(f"the target refused the migration: {ev.reason}")
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
        except MigrationError:
            link.close()
            raise
        self.link = link
        self._emit("connected", target=f"{self.addr[0]}:{self.addr[1]}")

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
        while not self._lost.is_set():
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

    def _frames(self, rnd: _Round) -> Any:
        """(slot, pages, payload bytes) per Pages frame of ``rnd``."""
        if rnd.checkpoint is not None:
            for run in rnd.checkpoint.runs:
                yield run.slot, run.pages, run.payload()
            return
        mem = self.m.memory
        assert rnd.dirty is not None and mem is not None
        for slot, pages in rnd.dirty.items():
            data = _allocated(mem.slots[slot].fd, mem.slots[slot].info.pages) \
                if rnd.kind == "full" else None
            i = 0
            while i < len(pages):
                n = self._chunk()
                chunk = pages[i:i + n]
                if data is not None:  # a run of pages that are all allocated or all holes
                    same = np.flatnonzero(data[chunk] != data[chunk[0]])
                    if len(same):
                        chunk = chunk[:same[0]]
                    if not data[chunk[0]]:
                        # Never written: zero without reading (reading would allocate them).
                        yield slot, chunk, self._zeros(len(chunk))
                        i += len(chunk)
                        continue
                for run in gather(mem, DirtySet({slot: chunk}), max_run_pages=n):
                    yield run.slot, run.pages, run.payload()
                i += len(chunk)

    def _zeros(self, n: int) -> bytes:
        """``n`` zero pages; one cached buffer (allocating and clearing 4 MiB per frame would
        hold the GIL the vCPU needs after every exit)."""
        if len(self._zero_buf) != n * PAGE:
            self._zero_buf = bytes(n * PAGE)
        return self._zero_buf

    _zero_buf = b""

    def _send_round(self, rnd: _Round) -> None:
        with self._lock:
            self._inflight.append(rnd)
        rnd.t0 = time.perf_counter()
        wire = self._send(EpochBegin(epoch=rnd.epoch, kind=rnd.kind))
        lim = self.opt.bandwidth_limit
        for slot, pages, payload in self._frames(rnd):
            if self._lost.is_set():
                raise LinkClosed(self.lost_reason)
            w = self._send(Pages(epoch=rnd.epoch, slot=slot, page_size=PAGE, pages=pages,
                                 data=payload))
            wire += w
            rnd.pages += len(pages)
            rnd.raw += len(payload)
            self._wire_per_page = 0.8 * self._wire_per_page + 0.2 * w / len(pages)
            if lim:  # pace: never more than one frame ahead of the limit
                ahead = wire / lim - (time.perf_counter() - rnd.t0)
                if ahead > 0:
                    time.sleep(ahead)
        cp = rnd.checkpoint
        if cp is not None and cp.state:
            wire += self._send(MachineBlob(epoch=rnd.epoch, blob=cp.state))
        wire += self._send(EpochEnd(epoch=rnd.epoch, n_pages=rnd.pages,
                                    digest=cp.digest if cp is not None else b"", output_seq=0))
        rnd.wire = wire
        self._raw += rnd.raw
        self._wire += wire
        self._pages += rnd.pages

    def _kick(self) -> None:
        """End the guest's current inline slice now (as its epoch timer would)."""
        try:
            signal.pthread_kill(self._main_tid, signal.SIGALRM)
        except (ProcessLookupError, OSError):
            pass

    # --- receiver thread --------------------------------------------------------------------------
    def _acked(self, epoch: int) -> None:
        now = time.perf_counter()
        with self._lock:
            done = [r for r in self._inflight if r.epoch <= epoch]
            self._inflight = [r for r in self._inflight if r.epoch > epoch]
        for r in done:
            r.seconds = now - r.t0
            if r.raw >= (1 << 20):
                bw = r.raw / max(r.seconds, 1e-6)
                self._bw = bw if not self._bw else 0.5 * self._bw + 0.5 * bw
            elif self._bw:  # a small round measures the fixed cost of an epoch (latency)
                fixed = max(0.0, r.seconds - r.raw / self._bw)
                self._fixed = fixed if not self._fixed else min(self._fixed, fixed)
            r.done.set()
        self._kick()

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
                    self._target_resumed.set()
                    return
                elif isinstance(ev, Goodbye):
                    self._lose(f"the target said goodbye: {ev.reason}")
                    return
        except TimeoutError:
            self._lose(f"no frame from the target for {self.opt.heartbeat_timeout:g} s")
        except (LinkClosed, ProtocolError) as e:
            self._lose(f"connection to the target lost: {e}")

    def _lose(self, reason: str) -> None:
        if self._lost.is_set():
            return
        self.lost_reason = reason
        self._lost.set()
        with self._lock:
            rounds, self._inflight = self._inflight, []
        for r in rounds:
            r.done.set()
        self._kick()

    # --- the guest, during a round -----------------------------------------------------------
    def _run_until(self, rnd: _Round, total: int) -> int:
        """Run the guest until the target committed ``rnd``; returns ring-full exits."""
        r = self.m.runners[0]
        exits = 0
        t_go = time.perf_counter()
        next_progress = t_go + 0.25
        while not rnd.done.is_set():
            now = time.perf_counter()
            if now >= next_progress:
                next_progress = now + 0.25
                self._emit("progress", round=rnd.epoch - 1, sent=rnd.pages, total=total)
            if not r.runnable:
                rnd.done.wait(0.05)
                continue
            if self._debt > 0:
                # Throttled: the sleep owed since the last ring-full exit. It carries into the
                # next round, or every round would start with a full ring's worth of pages.
                t = time.perf_counter()
                rnd.done.wait(min(self._debt, 0.25))
                self._debt -= time.perf_counter() - t
                t_go = time.perf_counter()
                continue
            slice_s = 0.005 if self._duty < 1.0 else 0.05
            why = r.run_inline(slice_s)
            if why == "stopped" and r.crash:
                raise GuestCrashed(r.crash)
            if why == "budget":
                exits += 1
                d, n = self.track.mid_round()
                self._acc.append(d)
                if self._target_pps and n:  # sleep until this vCPU is back at the target rate
                    self._debt = max(0.0, n / self._target_pps - (time.perf_counter() - t_go))
                t_go = time.perf_counter()
            elif self._duty < 1.0 and why == "interval":
                rnd.done.wait(slice_s * (1.0 / self._duty - 1.0))
        return exits

    # --- the migration -----------------------------------------------------------------------
    def run(self) -> MigrationReport:
        """Migrate; see the class docstring. Raises MigrationError (see ``source_may_run``)."""
        if self.link is None:
            self.connect()
        sys.setswitchinterval(1e-4)  # the inline vCPU re-takes the GIL after every exit
        for fn in (self._sender, self._receiver):
            t = threading.Thread(target=fn, name=f"migrate-{fn.__name__.strip('_')}",
                                 daemon=True)
            t.start()
            self._threads.append(t)
        m = self.m
        t_start = time.monotonic()
        deadline = t_start + self.opt.timeout
        progress_before = m.progress()
        rounds: list[RoundStats] = []
        epoch, kind = 1, "full"
        dirty = self.track.start()
        prev_exp = float("inf")
        stop_reason = "converged"
        throttled = False
        limit = self.opt.downtime_limit
        while True:
            rnd = _Round(epoch=epoch, kind=kind, dirty=dirty)
            p0, t0 = m.progress(), time.perf_counter()
            self._q.put(rnd)
            exits = self._run_until(rnd, len(dirty))
            t_pause = time.time()  # the guest is out of KVM_RUN from here on
            t_pause_pc = time.perf_counter()
            if self._lost.is_set():
                raise MigrationError(f"migration failed: {self.lost_reason}")
            parts = [*self._acc, self.track.boundary()]
            self._acc = []
            dirty = DirtySet.from_arrays(p for d in parts for p in d.items())
            el = time.perf_counter() - t0
            bw = max(self._bw, 1.0)
            exp = len(dirty) * PAGE / bw + self._fixed
            rs = RoundStats(round=epoch - 1, kind=kind, pages_sent=rnd.pages, seconds=el,
                            mb_per_s=rnd.raw / max(rnd.seconds, 1e-9) / 1e6,
                            wire_mb=rnd.wire / 1e6, dirty_pages=len(dirty),
                            dirty_mb_per_s=len(dirty) * PAGE / el / 1e6,
                            expected_downtime_ms=exp * 1e3,
                            throttle_pages_per_s=self._target_pps, throttle_duty=self._duty,
                            ring_full_exits=exits,
                            guest_progress_per_s=(m.progress() - p0) / el)
            rounds.append(rs)
            self._emit("round", **asdict(rs), bandwidth_mb_s=bw / 1e6,
                       elapsed_s=time.monotonic() - t_start)
            left = deadline - time.monotonic()
            if not m.runners[0].runnable:
                stop_reason = "guest_stopped"
                break
            if exp <= limit and (not self.opt.settle or exp > 0.5 * prev_exp or exp <= limit / 10
                                 or left < 4 * exp or epoch >= self.opt.max_rounds):
                break
            if left <= 0:
                stop_reason = "timeout"
                break
            if epoch >= self.opt.max_rounds:
                stop_reason = "max_rounds"
                break
            if self.opt.throttle and kind == "delta" and exp > limit and exp > 0.75 * prev_exp:
                throttled = True
                self._throttle(bw, exp, len(dirty) / el)
            prev_exp = exp if kind == "delta" else rnd.raw / bw
            self.track.rearm()
            epoch, kind = epoch + 1, "delta"
        return self._stop_and_copy(epoch + 1, dirty, rounds, t_start, (t_pause, t_pause_pc),
                                   stop_reason, throttled, progress_before)

    def _throttle(self, bw: float, exp: float, dirty_pps: float) -> None:
        """Aim the next round at half the downtime limit; at least halve the rate each time."""
        want = 0.5 * bw * self.opt.downtime_limit / exp / PAGE
        if isinstance(self.m.tracker, RingTracker):
            cur = self._target_pps or dirty_pps
            self._target_pps = max(1.0, min(want, 0.5 * cur))
            self._emit("throttle", target_pages_per_s=self._target_pps,
                       target_mb_per_s=self._target_pps * PAGE / 1e6)
        else:
            self._duty = max(0.01, min(0.5 * self._duty, want / max(dirty_pps, 1.0)))
            self._emit("throttle", duty=self._duty)

    def _stop_and_copy(self, epoch: int, dirty: DirtySet, rounds: list[RoundStats],
                       t_start: float, pause: tuple[float, float], stop_reason: str,
                       throttled: bool, progress_before: int) -> MigrationReport:
        m = self.m
        t_pause, t_pause_pc = pause
        t0 = time.perf_counter()
        progress_at_pause = m.progress()
        self._emit("stop_and_copy", reason=stop_reason, pages=len(dirty),
                   expected_downtime_ms=(len(dirty) * PAGE / max(self._bw, 1.0)
                                         + self._fixed) * 1e3)
        cp = capture(m, dirty, epoch=epoch, kind="delta", digest=self.opt.verify)
        self.final_state = cp.state
        rnd = _Round(epoch=epoch, kind="delta", checkpoint=cp)
        t_cap = time.perf_counter()
        self._q.put(rnd)
        rnd.done.wait()
        t_ack = time.perf_counter()
        if self._lost.is_set():
            raise MigrationError(f"migration failed before the switchover: {self.lost_reason}")
        assert self.link is not None
        self._q.put(None)  # the sender stops: after Failover our side of the stream is closed
        self._threads[0].join(5.0)
        try:
            self.switchover_sent = True
            self.link.send(Failover(reason="switchover"))
        except (LinkClosed, ProtocolError) as e:
            raise MigrationError(f"sending the switchover failed ({e}); the target may or may "
                                 "not run the guest: do not resume the source",
                                 source_may_run=False) from None
        if not self._target_resumed.wait(max(10.0, self.opt.heartbeat_timeout)):
            why = self.lost_reason or "no answer"
            raise MigrationError(f"the target did not confirm it resumed ({why}); do not "
                                 "resume the source", source_may_run=False)
        downtime = time.time() - t_pause
        t_end = time.perf_counter()
        phases = {"harvest_ms": (t0 - t_pause_pc) * 1e3, "capture_ms": (t_cap - t0) * 1e3,
                  "send_commit_ack_ms": (t_ack - t_cap) * 1e3,
                  "switchover_ms": (t_end - t_ack) * 1e3}
        rounds.append(RoundStats(round=len(rounds), kind="final", pages_sent=rnd.pages,
                                 seconds=time.perf_counter() - t0,
                                 mb_per_s=rnd.raw / max(rnd.seconds, 1e-9) / 1e6,
                                 wire_mb=rnd.wire / 1e6, dirty_pages=0, dirty_mb_per_s=0.0,
                                 expected_downtime_ms=0.0, throttle_pages_per_s=0.0,
                                 throttle_duty=1.0, ring_full_exits=0, guest_progress_per_s=0.0))
        self.report = MigrationReport(
            stop_reason=stop_reason, rounds=tuple(rounds), total_s=time.monotonic() - t_start,
            downtime_ms=downtime * 1e3, final_pages=cp.n_pages, pages_sent=self._pages,
            bytes_sent=self._raw, wire_bytes=self._wire, bandwidth_mb_s=self._bw / 1e6,
            throttled=throttled, tracker=m.config.tracker, pause_t=t_pause,
            final_digest=cp.digest.hex(), progress_before=progress_before,
            progress_at_pause=progress_at_pause, extras={"downtime_phases": phases})
        self._emit("switched_over", **{k: v for k, v in self.report.as_dict().items()
                                       if k != "rounds"})
        return self.report

    def close(self) -> None:
        """Close the connection and join the threads (the source machine is the caller's)."""
        self._lost.set()
        self._q.put(None)
        if self.link is not None:
            self.link.close()
        for t in self._threads:
            t.join(2.0)
