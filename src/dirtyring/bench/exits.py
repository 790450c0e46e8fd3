"""The cost of leaving the guest: the KVM_RUN round trip, and pausing/resuming every vCPU.

(a) Round trip: the dirtier guest rewrites one page and does ``out PORT_TICK`` after every write
(``exit_every=1``), untracked (``tracker="none"``), so each loop of its vCPU thread is one
KVM_RUN, KVM_EXIT_IO, Python dispatch, KVM_RUN again. We count ``control.ticks`` over a fixed
wall time per trial (the controller sleeps meanwhile and never holds the GIL) and report exits/s and
its inverse, µs per round trip. The Python part of an exit is timed separately: with the vCPU
parked we call ``Machine.handle_io`` directly on a TICK exit copied from the guest's own last
one (the kvm_run page keeps it), so it is the dispatch + device cost without the ioctl.

(b) Pause/resume: a dirtier with no exits at all (it only leaves KVM_RUN when kicked) on 1 and 2
vCPUs; we time ``pause_all()`` (kick every vCPU, wait until all are parked) and ``resume_all()``
(mark runnable and notify; it does not wait for the vCPUs to re-enter the guest). Between
samples the guest runs for ``settle_s`` so every vCPU is back inside KVM_RUN.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .._bindings import _uapi as U
from ..guests.protocol import GuestParams, Pattern, Port
from ..machine.config import MachineConfig
from ..machine.vm import Machine
from .records import BenchError, Record, summary_stats

BENCH = "exits"
MiB = 1 << 20
#: Pause/resume samples per vCPU count.
ITERATIONS = 1000
QUICK_ITERATIONS = 100


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundTripParams:
    trials: int = 10
    trial_s: float = 1.0
    warmup_s: float = 0.2
    dispatch_calls: int = 20_000  # direct handle_io calls, in batches of 1000

    @property
    def id(self) -> str:
        return f"roundtrip-1vcpu-{self.trials}x{self.trial_s:g}s"

    def machine_config(self) -> MachineConfig:
        return MachineConfig(guest="dirtier", vcpus=1, data_slots=(4 * MiB,), tracker="none",
                             params=GuestParams(pattern=Pattern.HOT, hot_pages=1, exit_every=1))


@dataclass(frozen=True, slots=True, kw_only=True)
class PauseParams:
    vcpus: int
    iterations: int = ITERATIONS
    settle_s: float = 0.001
    warmup: int = 10

    @property
    def id(self) -> str:
        return f"pause-resume-{self.vcpus}vcpu"

    def machine_config(self) -> MachineConfig:
        return MachineConfig(guest="dirtier", vcpus=self.vcpus, data_slots=(4 * MiB,),
                             tracker="none",
                             params=GuestParams(pattern=Pattern.HOT, hot_pages=16, exit_every=0))


@dataclass(frozen=True, slots=True, kw_only=True)
class ExitsParams:
    roundtrip: RoundTripParams = RoundTripParams()
    pause_vcpus: tuple[int, ...] = (1, 2)
    iterations: int = ITERATIONS

    @property
    def id(self) -> str:
        return f"{self.roundtrip.id}+pause-{'+'.join(map(str, self.pause_vcpus))}vcpu" \
               f"-{self.iterations}"

    def pause_params(self) -> list[PauseParams]:
        return [PauseParams(vcpus=v, iterations=self.iterations) for v in self.pause_vcpus]


FULL = ExitsParams()
QUICK = ExitsParams(roundtrip=RoundTripParams(trials=3, trial_s=0.3, warmup_s=0.1,
                                              dispatch_calls=5000),
                    iterations=QUICK_ITERATIONS)


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundTripResult:
    params: RoundTripParams
    rates: tuple[float, ...]  # exits/s per trial
    dispatch_ns: tuple[float, ...]  # per-call handle_io cost, one value per batch of calls


def measure_round_trip(p: RoundTripParams) -> RoundTripResult:
    rates: list[float] = []
    dispatch: list[float] = []
    with Machine(p.machine_config()) as m:
        ctl = m.control
        time.sleep(p.warmup_s)
        for _ in range(p.trials):
            m.check()
            n0, t0 = ctl.ticks, time.perf_counter()
            time.sleep(p.trial_s)
            n1, t1 = ctl.ticks, time.perf_counter()
            if n1 == n0:
                m.check()
                raise BenchError(f"{p.id}: the guest made no exits in {p.trial_s:g} s")
            rates.append((n1 - n0) / (t1 - t0))
        m.pause_all()
        m.check()
        r = m.runners[0]
        io = r.run_struct.u.io
        # The vCPU is parked (not in KVM_RUN): its kvm_run page still holds the last I/O exit,
        # the guest's `out PORT_TICK`. Replaying it through handle_io times the Python side.
        if io.port == Port.TICK and io.direction == U.KVM_EXIT_IO_OUT and io.data_offset:
            batch = 1000
            for _ in range(max(1, p.dispatch_calls // batch)):
                t0n = time.perf_counter_ns()
                for _ in range(batch):
                    m.handle_io(r)
                dispatch.append((time.perf_counter_ns() - t0n) / batch)
    return RoundTripResult(params=p, rates=tuple(rates), dispatch_ns=tuple(dispatch))


@dataclass(frozen=True, slots=True, kw_only=True)
class PauseResult:
    params: PauseParams
    pause_ns: tuple[int, ...]
    resume_ns: tuple[int, ...]
    stalled: int  # samples after which some vCPU had made no guest progress


def measure_pause(p: PauseParams) -> PauseResult:
    pause: list[int] = []
    resume: list[int] = []
    stalled = 0
    with Machine(p.machine_config()) as m:
        time.sleep(0.05)
        last = [m.status(r.index, "progress") for r in m.runners]
        for i in range(p.warmup + p.iterations):
            time.sleep(p.settle_s)
            t0 = time.perf_counter_ns()
            m.pause_all()
            t1 = time.perf_counter_ns()
            m.check()
            now = [m.status(r.index, "progress") for r in m.runners]
            t2 = time.perf_counter_ns()
            m.resume_all()
            t3 = time.perf_counter_ns()
            if i >= p.warmup:
                pause.append(t1 - t0)
                resume.append(t3 - t2)
                stalled += any(a == b for a, b in zip(now, last))
            last = now
    return PauseResult(params=p, pause_ns=tuple(pause), resume_ns=tuple(resume),
                       stalled=stalled)


def round_trip_records(res: RoundTripResult) -> list[Record]:
    p = res.params
    d: dict[str, Any] = {"vcpus": 1, "trials": p.trials, "trial_s": p.trial_s}
    out = [Record.make(BENCH, "exit_rate", v, "exits/s", stat=k, **d)
           for k, v in summary_stats(res.rates, ("p50", "p90", "min", "max")).items()]
    us = [1e6 / r for r in res.rates]
    out += [Record.make(BENCH, "round_trip", v, "us", stat=k, **d)
            for k, v in summary_stats(us, ("p50", "p90")).items()]
    if res.dispatch_ns:
        out += [Record.make(BENCH, "python_exit_dispatch", v / 1e3, "us", stat=k, vcpus=1,
                            calls=1000 * len(res.dispatch_ns))
                for k, v in summary_stats(res.dispatch_ns, ("p50", "p90")).items()]
    return out


def pause_records(res: PauseResult) -> list[Record]:
    p = res.params
    d: dict[str, Any] = {"vcpus": p.vcpus, "iterations": p.iterations,
                         "settle_us": round(p.settle_s * 1e6)}
    out: list[Record] = []
    for metric, samples in (("pause_all", res.pause_ns), ("resume_all", res.resume_ns)):
        out += [Record.make(BENCH, metric, v / 1e3, "us", stat=k, **d)
                for k, v in summary_stats(samples, ("p50", "p90", "p99")).items()]
    out.append(Record.make(BENCH, "stalled_samples", res.stalled, "samples", **d))
    return out


def run(params: ExitsParams = FULL, *,
        progress: Callable[[str, list[Record]], None] | None = None) -> list[Record]:
    records = round_trip_records(measure_round_trip(params.roundtrip))
    if progress is not None:
        progress(params.roundtrip.id, records)
    for pp in params.pause_params():
        recs = pause_records(measure_pause(pp))
        records += recs
        if progress is not None:
            progress(pp.id, recs)
    return records


def format_table(records: list[Record]) -> str:
    def get(metric: str, stat: str, **dims: int) -> str:
        for r in records:
            if r.metric == metric and r.stat == stat and r.matches(**dims):
                return f"{r.value:,.1f}"
        return "-"

    lines = [f"KVM_RUN round trip (1 vCPU, out on every write): "
             f"{get('exit_rate', 'p50')} exits/s median ({get('exit_rate', 'p90')} p90) = "
             f"{get('round_trip', 'p50')} us per exit; Python dispatch (handle_io) "
             f"{get('python_exit_dispatch', 'p50')} us",
             f"{'vCPUs':>5} {'pause_all p50/p90/p99 us':>28} {'resume_all p50/p90/p99 us':>28}"]
    vcpus = sorted({int(r.dims["vcpus"]) for r in records if r.metric == "pause_all"})
    for v in vcpus:
        pa = "/".join(get("pause_all", s, vcpus=v) for s in ("p50", "p90", "p99"))
        re = "/".join(get("resume_all", s, vcpus=v) for s in ("p50", "p90", "p99"))
        lines.append(f"{v:>5} {pa:>28} {re:>28}")
    return "\n".join(lines)
