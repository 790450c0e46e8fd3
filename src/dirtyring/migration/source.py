"""Live migration: replication that ends with a switchover.

Theory of operation
-------------------
The source speaks the replication protocol to a standby that never fails over by itself
(``Standby(auto_failover=False)``, as ``dirtyring receive`` runs it): Hello, then the pre-copy
rounds, each sent as *epochs* the target commits atomically, then ``Failover("switchover")``,
which the target answers by resuming the guest and sending its own ``Failover``. Nothing here
encodes pages or decodes state: the wire codec, ``Link``, ``checkpoint.gather``,
``Machine.capture_state`` and the standby's staging + commit do that.

1. Round 0 (the bulk round; its first epoch is of kind "full"): all of memory goes out while
   the guest runs. It arms nothing: pages the guest keeps writing stay writable, so it keeps
   its speed (``migrate_tracking``).
2. Round k: every page that may have changed since it was last armed (after round 0: every page
   that was writable during it), read from live memory while the guest runs. The sender paces
   itself to the bandwidth limit. A round ends when the target *acked* it: the bandwidth we
   estimate is end to end (the target's commit included), which is what the stop-and-copy sees.
3. Between rounds the guest is not entered (inline mode): harvest, estimate the downtime, and
   let ``migrate_policy`` decide: stop-and-copy, go on, or go on with dirtying vCPUs throttled
   (through their ring-full exits: a vCPU that dirties nothing new runs at full speed).
   Going on re-arms every page first (one toggle of dirty logging).
4. Stop-and-copy: capture the machine state (+ memory digest with ``verify``), send the last
   pages straight from the paused guest's memory with it in the last epoch, wait for its Ack,
   send Failover("switchover"), wait for the target's Failover (it has resumed). The source stays
   paused for good. If anything fails before our Failover left, the source may simply run on;
   after it, it must not (the target may be running): ``MigrationError.source_may_run`` says
   which.

Modules: ``migrate_types`` (options, figures), ``migrate_tracking`` (when to arm and harvest),
``migrate_policy`` (when to stop, how hard to throttle), ``migrate_link`` (sender, acks,
switchover); this one runs the guest and the rounds. The receiving side is ``standby.Standby``.
"""
from __future__ import annotations

import ctypes
import signal
import sys
import threading
import time
from dataclasses import asdict
from typing import Any

from ..errors import ConfigError, GuestCrashed
from ..machine.vm import Machine
from ..tracking import DirtySet
from .link import EventSink, Round, SourceLink
from .policy import Boundary, Convergence, RingPacer
from .tracking import RoundTracking
from .types import PAGE, MigrationError, MigrationOptions, MigrationReport, RoundStats

__all__ = ["Migration", "MigrationError", "MigrationOptions", "MigrationReport", "RoundStats",
           "run_guest", "tune_allocator"]


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
    track = RoundTracking(machine) if machine.tracker is not None else None
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
    ``pacer.target_pps`` is the ring throttle in force (per vCPU, 0 = none).

    Example::

        mig = dirtyring.Migration(m, ("10.0.0.2", 7100), key)
        try:
            rep = mig.run()
        finally:
            mig.close()
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
        self.opt = options
        self.on_event = on_event or (lambda e: None)
        self.track = RoundTracking(machine, rearm=options.rearm, arm_bulk=options.arm_bulk)
        self.policy = Convergence(options, ring=self.track.ring is not None)
        self.pacer = RingPacer()
        self._main_tid = threading.get_ident()
        self.net = SourceLink(machine, target, key, insecure=insecure, options=options,
                              emit=self.on_event, kick=self._kick)
        self.switchover_sent = False
        self._paused = 0.0  # between rounds: harvest, decide, re-arm (the guest waits)
        self.final_state = b""
        self.report: MigrationReport | None = None
        #: For status and metrics: "starting", "precopy", "stop_and_copy", "switched_over" or
        #: "failed"; the rounds done so far and the one on its way.
        self.state = "starting"
        self.rounds: list[RoundStats] = []
        self.current: Round | None = None

    def _emit(self, event: str, **fields: Any) -> None:
        self.on_event({"event": event, "t": time.time(), **fields})

    def connect(self) -> None:
        """Connect and shake hands (``run()`` does it if not done yet)."""
        self.net.connect()

    def _kick(self) -> None:
        """End the guest's current inline slice now (as its epoch timer would)."""
        try:
            signal.pthread_kill(self._main_tid, signal.SIGALRM)
        except (ProcessLookupError, OSError):
            pass

    # --- the guest, during a round -----------------------------------------------------------
    def _run_until(self, rnd: Round, total: int) -> int:
        """Run the guest until the target committed ``rnd`` (or the link is lost); returns the
        ring-full exits."""
        r = self.m.runners[0]
        net, pacer = self.net, self.pacer
        exits = 0
        t_go = time.perf_counter()
        next_progress = t_go + 0.25
        while not rnd.done.is_set() and not net.lost.is_set():
            now = time.perf_counter()
            if now >= next_progress:
                next_progress = now + 0.25
                self._emit("progress", round=rnd.index, sent=rnd.pages, total=total)
            if not r.runnable:
                rnd.done.wait(0.05)
                continue
            owed = pacer.sleep_now(0.25)
            if owed > 0:  # throttled: the sleep owed since the last ring-full exit
                t = time.perf_counter()
                rnd.done.wait(owed)
                pacer.slept_for(time.perf_counter() - t)
                t_go = time.perf_counter()
                continue
            duty = self.policy.duty
            slice_s = 0.005 if duty < 1.0 else 0.05
            why = r.run_inline(slice_s)
            if why == "stopped" and r.crash:
                raise GuestCrashed(r.crash)
            if why == "budget":
                exits += 1
                n = self.track.mid_round()
                pacer.after_exit(n, time.perf_counter() - t_go)
                t_go = time.perf_counter()
            elif duty < 1.0 and why == "interval":  # the bitmap's throttle: run, then sleep
                rnd.done.wait(slice_s * (1.0 / duty - 1.0))
        return exits

    # --- the migration -----------------------------------------------------------------------
    def run(self) -> MigrationReport:
        """Migrate; see the class docstring. Raises MigrationError (see ``source_may_run``)."""
        try:
            return self._run()
        except BaseException:
            self.state = "failed"
            raise

    def _run(self) -> MigrationReport:
        net, m = self.net, self.m
        if net.link is None:
            net.connect()
        sys.setswitchinterval(1e-4)  # the inline vCPU re-takes the GIL after every exit
        net.start()
        t_start = time.monotonic()
        deadline = t_start + self.opt.timeout
        progress_before = p0 = m.progress()
        t0 = time.perf_counter()
        rounds = self.rounds
        self.state = "precopy"
        index, kind = 0, "full"
        dirty = self.track.bulk()
        stop_reason = ""
        throttled = False
        while True:
            rnd = Round(index=index, kind=kind, dirty=dirty)
            self.current = rnd
            armed = self.track.armed
            slept0 = self.pacer.slept
            ring_pps, duty = self.pacer.target_pps, self.policy.duty
            net.submit(rnd)
            exits = self._run_until(rnd, len(dirty))
            t_pause = time.time()  # the guest is out of KVM_RUN from here on
            t_pause_pc = time.perf_counter()
            if net.lost.is_set():
                raise MigrationError(f"migration failed: {net.lost_reason}")
            dirty = self.track.boundary()
            el = time.perf_counter() - t0
            dec = self.policy.decide(Boundary(
                round=index, pending_pages=len(dirty), bandwidth=net.bw,
                fixed_s=net.fixed, dirty_pps=len(dirty) / el, armed=armed,
                seconds_left=deadline - time.monotonic(),
                round_pps=rnd.pages / el if kind == "delta" and rnd.pages >= 256 else 0.0))
            rs = RoundStats(round=index, kind=kind, pages_sent=rnd.pages, seconds=el,
                            mb_per_s=rnd.raw / max(rnd.seconds, 1e-9) / 1e6,
                            wire_mb=rnd.wire / 1e6, dirty_pages=len(dirty),
                            dirty_mb_per_s=len(dirty) * PAGE / el / 1e6,
                            expected_downtime_ms=dec.expected_s * 1e3,
                            throttle_pages_per_s=ring_pps, throttle_duty=duty,
                            ring_full_exits=exits,
                            guest_progress_per_s=(m.progress() - p0) / el,
                            throttle_sleep_s=self.pacer.slept - slept0, armed=armed)
            rounds.append(rs)
            self._emit("round", **asdict(rs), bandwidth_mb_s=net.bw / 1e6,
                       predicted_downtime_ms=dec.predicted_s * 1e3,
                       elapsed_s=time.monotonic() - t_start)
            if not m.runners[0].runnable:
                stop_reason = "guest_stopped"
                break
            if dec.stop:
                stop_reason = dec.stop
                break
            if dec.throttle_changed:
                throttled = True
                self.pacer.target_pps = dec.ring_pps
                if self.track.ring is not None:
                    self._emit("throttle", target_pages_per_s=dec.ring_pps,
                               target_mb_per_s=dec.ring_pps * PAGE / 1e6)
                else:
                    self._emit("throttle", duty=dec.duty)
            # The next round's time begins here: re-arming is part of it (the guest waits).
            p0, t0 = m.progress(), time.perf_counter()
            self.track.rearm()
            self._paused += time.perf_counter() - t_pause_pc
            index, kind = index + 1, "delta"
        return self._stop_and_copy(dirty, rounds, t_start, (t_pause, t_pause_pc),
                                   stop_reason, throttled, progress_before)

    def _stop_and_copy(self, dirty: DirtySet, rounds: list[RoundStats],
                       t_start: float, pause: tuple[float, float], stop_reason: str,
                       throttled: bool, progress_before: int) -> MigrationReport:
        m, net = self.m, self.net
        assert m.memory is not None
        t_pause, t_pause_pc = pause
        self.state = "stop_and_copy"
        t0 = time.perf_counter()
        progress_at_pause = m.progress()
        self._emit("stop_and_copy", reason=stop_reason, pages=len(dirty),
                   expected_downtime_ms=self.policy.expected(len(dirty), net.bw, net.fixed) * 1e3)
        # The pages are read by the sender straight from the paused guest: no copy up front.
        state = m.capture_state().encode()
        digest = m.memory.digest() if self.opt.verify else b""
        self.final_state = state
        rnd = Round(index=len(rounds), kind="delta", dirty=dirty, state=state, digest=digest)
        self.current = rnd
        t_cap = time.perf_counter()
        net.send_last(rnd)
        rnd.done.wait()
        t_ack = time.perf_counter()
        if net.lost.is_set():
            raise MigrationError(f"migration failed before the switchover: {net.lost_reason}")
        self.switchover_sent = True
        net.switchover()
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
        extras = {"downtime_phases": phases, "ring_full_exits": self.track.exits,
                  "ring_harvest_s": self.track.harvest_s, "resyncs": self.track.resyncs,
                  "throttle_sleep_s": self.pacer.slept, "boundary_pause_s": self._paused}
        self.report = MigrationReport(
            stop_reason=stop_reason, rounds=tuple(rounds), total_s=time.monotonic() - t_start,
            downtime_ms=downtime * 1e3, final_pages=rnd.pages, pages_sent=net.pages,
            bytes_sent=net.raw, wire_bytes=net.wire, bandwidth_mb_s=net.bw / 1e6,
            throttled=throttled, tracker=m.config.tracker, pause_t=t_pause,
            final_digest=digest.hex(), progress_before=progress_before,
            progress_at_pause=progress_at_pause, extras=extras)
        self.state = "switched_over"
        self._emit("switched_over", **{k: v for k, v in self.report.as_dict().items()
                                       if k != "rounds"})
        return self.report

    def close(self) -> None:
        """Close the connection and join the threads (the source machine is the caller's)."""
        self.net.close()
