"""When pre-copy stops, and how hard dirtying vCPUs are throttled: pure decisions (no clock,
no KVM), so they can be tested on their own.

Between two rounds the source knows how many pages are still to send, the end-to-end bandwidth,
the fixed cost of an epoch and, after a round that tracked every write, how fast the guest made
pages newly dirty. The stop-and-copy would take ``expected = pages / bandwidth + fixed``.

* ``expected <= aim`` (``settle_aim`` of the limit): stop and copy.
* The next round is predicted to send at the last round's pace (pages per second of round
  time: the guest competes for the CPU while a round runs) and to leave ``dirty rate x its
  duration`` pages. While that at least halves the estimate (or already fits
  the aim), go on as we are: the migration converges by itself.
* Otherwise it has stopped converging fast. Without throttling: stop if under the limit (the
  classic pre-copy answer), else go on until the timeout. With throttling: aim the next round
  straight at the aim (per-vCPU newly-dirty pages per second for the ring, a run/sleep duty for
  the bitmap), at least halving an earlier target that did not get there.

Why throttle a guest that would converge under the limit anyway: a vCPU that dirties as fast as
it can fault (every page of a round faults once) makes a fraction of a percent of its normal
progress during those rounds, so one throttled round costs it almost nothing while several slow
rounds would cost the whole migration their length, and the downtime would sit near the limit.
A vCPU that dirties nothing new never fills its ring and is never slowed (ring pacing below).
"""
from __future__ import annotations

from dataclasses import dataclass

from .types import PAGE, MigrationOptions


@dataclass(frozen=True, slots=True, kw_only=True)
class Boundary:
    """What the source knows between two rounds (the guest paused)."""

    round: int              # the round that just ended (0 = the bulk round)
    pending_pages: int      # what the next round (or the stop-and-copy) must send
    bandwidth: float        # bytes/s, end to end (sent .. committed by the target)
    fixed_s: float          # per-epoch fixed cost (round trip, commit)
    dirty_pps: float        # pages newly dirtied per second during the round
    armed: bool             # the round tracked every write (else dirty_pps means nothing)
    seconds_left: float     # until the migration's timeout
    round_pps: float = 0.0  # pages the last round sent per second of its time (0: unknown)


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    stop: str               # "" to go on, else the stop reason (converged|timeout|max_rounds)
    expected_s: float       # stop-and-copy time if we stopped now
    predicted_s: float      # the same after one more round at the new throttle (0: unknown)
    ring_pps: float         # ring: per-vCPU newly-dirty pages/s target, 0 = not throttled
    duty: float             # bitmap: fraction of time the guest runs, 1 = not throttled
    throttle_changed: bool


class Convergence:
    """Decides at each round boundary (see the module docstring); keeps the throttle state."""

    def __init__(self, options: MigrationOptions, *, ring: bool) -> None:
        self.opt = options
        self.ring = ring
        self.ring_pps = 0.0
        self.duty = 1.0

    @property
    def throttled(self) -> bool:
        return bool(self.ring_pps) or self.duty < 1.0

    def expected(self, pages: int, bandwidth: float, fixed_s: float) -> float:
        return pages * PAGE / max(bandwidth, 1.0) + fixed_s

    def decide(self, b: Boundary) -> Decision:
        opt = self.opt
        limit = opt.downtime_limit
        aim = limit * opt.settle_aim if opt.settle else limit
        exp = self.expected(b.pending_pages, b.bandwidth, b.fixed_s)
        # The next round sends this long, and the guest runs meanwhile.
        send_s = (b.pending_pages / b.round_pps if b.round_pps > 0
                  else max(exp - b.fixed_s, 0.0))
        pred = (self.expected(int(b.dirty_pps * send_s), b.bandwidth, b.fixed_s)
                if b.armed else 0.0)

        def done(stop: str, changed: bool = False) -> Decision:
            return Decision(stop=stop, expected_s=exp, predicted_s=pred, ring_pps=self.ring_pps,
                            duty=self.duty, throttle_changed=changed)

        if exp <= aim:
            return done("converged")
        if exp <= limit and b.seconds_left < 4 * exp:
            return done("converged")  # no time left to settle any lower
        if b.round + 1 >= opt.max_rounds:
            return done("converged" if exp <= limit else "max_rounds")
        if b.seconds_left <= 0:
            return done("timeout")
        if not b.armed or pred <= max(0.5 * exp, aim):
            return done("")  # converging by itself (or nothing known about the rate yet)
        if not opt.throttle:
            return done("converged" if exp <= limit else "")
        # Aim the next round at the aim: it may dirty what the aim can carry, while it sends.
        want = max(1.0, (aim - b.fixed_s) * b.bandwidth / PAGE) / max(send_s, 1e-3)
        if self.ring:
            cur = self.ring_pps or b.dirty_pps
            self.ring_pps = max(1.0, min(want, 0.5 * cur) if self.ring_pps else min(want, cur))
        else:
            free_pps = b.dirty_pps / self.duty  # what it would dirty unthrottled
            d = want / max(free_pps, 1.0)
            self.duty = max(0.01, min(d, 0.5 * self.duty) if self.duty < 1.0 else min(d, 1.0))
        return done("", True)


class RingPacer:
    """Throttles one vCPU through its ring-full exits: each exit means the vCPU made the
    ring's worth of pages newly dirty; it then owes a sleep until its rate since it last
    resumed is back at the target. A vCPU that dirties nothing new never exits and is never
    slowed. The debt carries into the next round (else each round would begin with a free
    ring's worth of pages)."""

    def __init__(self) -> None:
        self.target_pps = 0.0
        self.debt = 0.0
        self.slept = 0.0

    def after_exit(self, pages: int, ran_s: float) -> None:
        """The vCPU ran ``ran_s`` since it last resumed and made ``pages`` newly dirty."""
        if self.target_pps and pages:
            self.debt = max(0.0, pages / self.target_pps - ran_s)

    def sleep_now(self, at_most: float) -> float:
        """How long to sleep before running the vCPU again (0: run it)."""
        return min(self.debt, at_most) if self.debt > 0 else 0.0

    def slept_for(self, seconds: float) -> None:
        self.debt = max(0.0, self.debt - seconds)
        self.slept += seconds
