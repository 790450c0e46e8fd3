"""Snapshots on real KVM: full and incremental chains of running and paused guests restore into
new machines with exactly the captured memory and registers, and the guest carries on from
there; a bad file leaves nothing behind."""
from __future__ import annotations

import argparse
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dirtyring._bindings import _uapi as U
from dirtyring.cli import snapshot as cli
from dirtyring.errors import ConfigError, SnapshotFormatError
from dirtyring.guests.protocol import GuestParams, Pattern, hash_chain
from dirtyring.machine.config import MachineConfig
from dirtyring.machine.vm import Machine
from dirtyring.machine import fingerprint as F
from dirtyring.snapshots import files as S

MiB = 1 << 20
SEED = 0xC0FFEE
EVERY = 10_000
#: How long a test may wait for a guest to get somewhere (a report, a step, a full ring)
#: before it fails. Generous: a slow or loaded host only takes longer.
DEADLINE = 60.0


def compute(**kw: Any) -> MachineConfig:
    kw.setdefault("data_slots", (4 * MiB,))
    return MachineConfig(guest="compute", params=GuestParams(report_every=EVERY, seed=SEED), **kw)


def dirtier(**kw: Any) -> MachineConfig:
    kw.setdefault("data_slots", (4 * MiB,))
    return MachineConfig(guest="dirtier", params=GuestParams(pattern=Pattern.RANDOM,
                                                             rate_pps=20_000), **kw)


def reports(m: Machine, vcpu: int = 0) -> list[tuple[int, int]]:
    return [(p[1], p[2]) for k, p in m.outputs if k == "report" and p[0] == vcpu]


_C = [np.uint64(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)]


def check_chain(start: tuple[int, int], reps: list[tuple[int, int]]) -> None:
    """Each report follows the previous one (the first follows ``start``) on the hash chain."""
    prev = [start] + reps[:-1]
    for (i0, _), (i1, _) in zip(prev, reps):
        assert i1 - i0 == EVERY, (i0, i1)
    h = np.array([p[1] for p in prev], np.uint64)
    i = np.array([p[0] for p in prev], np.uint64)
    with np.errstate(over="ignore"):
        for _ in range(EVERY):
            x = (h ^ i) + _C[0]
            x = (x ^ (x >> np.uint64(30))) * _C[1]
            x = (x ^ (x >> np.uint64(27))) * _C[2]
            h = x ^ (x >> np.uint64(31))
            i += np.uint64(1)
    assert h.tolist() == [r[1] for r in reps], "a report is off the hash chain"


def last_report(m: Machine, vcpu: int = 0) -> tuple[int, int]:
    i = m.status(vcpu, "report_i")
    return (i, m.status(vcpu, "report_h")) if i else (0, SEED)


def snapshot_state(m: Machine) -> tuple[bytes, list[bytes], list[tuple[int, int]]]:
    """Digest, registers and chain position of a paused machine."""
    assert m.memory is not None
    st = m.capture_state()
    return m.memory.digest(), [v.regs for v in st.vcpus], [last_report(m, r.index)
                                                          for r in m.runners]


# --- full and incremental, paused capture: exact memory and registers -------------------------------
@pytest.mark.parametrize("vcpus", [1, 2])
def test_paused_chain_restores_exact_memory_and_registers(tmp_path: Path, machines: list[Machine],
                                                          vcpus: int) -> None:
    m = Machine(compute(vcpus=vcpus))
    machines.append(m)
    w = S.SnapshotWriter(m, tmp_path)
    want = []
    for k in range(3):
        ran_on(m)  # each snapshot of another point of the computation
        m.pause_all()
        want.append(snapshot_state(m))
        info = w.full() if k == 0 else w.incremental()
        assert info.kind == ("full" if k == 0 else "delta") and info.seq == k
        assert m.runners[0].pause_requested  # a paused guest stays paused
        m.resume_all()
    ran_on(m)  # the original goes on: memory changes
    m.pause_all()
    assert m.memory is not None and m.memory.digest() != want[-1][0]
    for k, info in enumerate(w.chain):
        m2 = S.restore(info.path)
        machines.append(m2)
        assert m2.memory is not None
        digest, regs, pos = snapshot_state(m2)
        assert (digest, regs, pos) == want[k], f"snapshot {k}"
        # The restored guest resumes on its hash chain from the snapshot's point.
        run_until(m2, lambda: all(len(reports(m2, v)) >= 2 for v in range(vcpus)))
        m2.check()
        for v in range(vcpus):
            reps = reports(m2, v)
            assert reps, f"restored vCPU {v} made no report"
            check_chain(want[k][2][v], reps[:20])
        m2.close()


def run_until(m: Machine, done: Callable[[], bool], timeout: float = DEADLINE) -> None:
    """Let a restored machine run until ``done()`` (or the timeout), then pause it: a loaded CI
    host may not schedule the vCPU thread within a fixed short sleep."""
    m.resume_all()
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline and not m.crashed:
        time.sleep(0.01)
    m.pause_all()


def ran_on(m: Machine) -> None:
    """Wait (the machine running) until every vCPU's guest took a step since the call."""
    steps = [m.status(r.index, "step") for r in m.runners]
    end = time.monotonic() + DEADLINE
    while any(m.status(r.index, "step") == s for r, s in zip(m.runners, steps)):
        assert time.monotonic() < end and not m.crashed, "the guest does not run"
        time.sleep(0.005)


# --- snapshots of a running guest --------------------------------------------------------------------
@pytest.mark.parametrize("tracker", ["ring", "bitmap", "hotset"])
def test_running_guest_incremental_chain(tmp_path: Path, machines: list[Machine],
                                         tracker: str) -> None:
    """Captures of a running dirtier (many pages change between snapshots): with verify the
    writer proves each file's fingerprint equals live memory at the capture, and restore proves
    the rebuilt memory equals the file's."""
    m = Machine(dirtier(tracker=tracker, data_slots=(16 * MiB,)))
    machines.append(m)
    w = S.SnapshotWriter(m, tmp_path, verify=True)
    w.run(0.03)
    before, after = [m.progress()], []
    infos = [w.full()]
    after.append(m.progress())
    for _ in range(4):
        assert w.run(0.03) == "interval"
        before.append(m.progress())
        infos.append(w.incremental())
        after.append(m.progress())
    for k in range(1, len(infos)):
        # A delta holds the pages written since the previous capture (+ status and stack pages).
        # The hot set by design also reports pages still hot from earlier harvests (they stay
        # writable for hot_epochs harvests, 8 by default, more than this chain has), so its
        # bound counts the writes since the first capture.
        since = before[0] if tracker == "hotset" else before[k - 1]
        assert 0 < infos[k].pages <= after[k] - since + 8
    for info in (infos[0], infos[2], infos[-1]):
        m2 = S.restore(info.path)
        machines.append(m2)
        p0 = m2.progress()
        assert p0 > 0
        run_until(m2, lambda: m2.progress() > p0)
        m2.check()
        assert m2.progress() > p0
        m2.close()


def test_compute_guest_continues_from_each_snapshot(tmp_path: Path,
                                                    machines: list[Machine]) -> None:
    m = Machine(compute())
    machines.append(m)
    w = S.SnapshotWriter(m, tmp_path, verify=True)
    ran_on(m)
    w.full()
    for _ in range(3):
        w.run(0.02)
        w.incremental()
    m.pause_all()  # (it would take a core from the restored ones)
    seen = reports(m)
    for info in w.chain:
        m2 = S.restore(info.path)
        machines.append(m2)
        start = last_report(m2)
        assert start in seen or start == (0, SEED)
        run_until(m2, lambda: len(reports(m2)) >= 2)
        reps = reports(m2)
        assert reps and reps[0][0] == start[0] + EVERY
        check_chain(start, reps[:20])
        # Where the original also ran, both computed the same values.
        common = set(reps) & set(seen)
        assert {i for i, _ in reps} & {i for i, _ in seen} == {i for i, _ in common}
        m2.close()


def test_inline_machine_with_ring_full_exits(tmp_path: Path, machines: list[Machine]) -> None:
    """Single-threaded machine; a small ring fills between snapshots and the writer harvests it
    into the next incremental snapshot."""
    cfg = MachineConfig(guest="dirtier", data_slots=(8 * MiB,), ring_entries=256,
                        params=GuestParams(pattern=Pattern.RANDOM))
    m = Machine(cfg, threaded=False)
    machines.append(m)
    w = S.SnapshotWriter(m, tmp_path, verify=True)
    w.full()
    full_rings = m.runners[0].exits[U.KVM_EXIT_DIRTY_RING_FULL]
    end = time.monotonic() + DEADLINE
    while m.runners[0].exits[U.KVM_EXIT_DIRTY_RING_FULL] < full_rings + 3:  # (~600 entries)
        assert time.monotonic() < end, "the ring does not fill"
        w.run(0.02)
    info = w.incremental()
    assert info.pages > 256  # more than one ring's worth: what each ring-full exit harvested
    m2 = S.restore(info.path, threaded=False)
    machines.append(m2)
    p0 = m2.progress()
    while m2.progress() == p0:
        assert time.monotonic() < end, "the restored guest does not run"
        assert m2.runners[0].run_inline(0.01) in ("interval", "budget")  # small ring
    m2.check()


def test_restore_newest_in_directory_and_writer_rules(tmp_path: Path,
                                                      machines: list[Machine]) -> None:
    m = Machine(compute())
    machines.append(m)
    w = S.SnapshotWriter(m, tmp_path)
    with pytest.raises(ConfigError, match="full snapshot first"):
        w.incremental()
    w.full("base")
    w.incremental("one")
    with pytest.raises(ConfigError, match="already exists"):
        w.incremental("one")
    with pytest.raises(ConfigError, match="name"):
        w.incremental("../x")
    last = w.incremental()
    assert last.path.name == "snap-0002.snap" and last.parent_file == "one.snap"
    assert S.latest(tmp_path) == last.path
    m2 = S.restore(tmp_path)
    machines.append(m2)
    assert m2.config == m.config
    untracked = Machine(compute(tracker="none"))
    machines.append(untracked)
    with pytest.raises(ConfigError, match="tracked"):
        S.SnapshotWriter(untracked, tmp_path / "x")


# --- bad files: clear errors, nothing half-applied ---------------------------------------------------
class Recorder:
    """Stands in for Machine inside snapshots/files.py to see every machine restore() builds."""

    def __init__(self) -> None:
        self.made: list[Machine] = []

    def __call__(self, *a: Any, **kw: Any) -> Machine:
        m = Machine(*a, **kw)
        self.made.append(m)
        return m


@pytest.fixture
def chain_dir(tmp_path: Path) -> Path:
    with Machine(dirtier()) as m:
        w = S.SnapshotWriter(m, tmp_path)
        w.full()
        for _ in range(2):
            w.run(0.02)
            w.incremental()
    return tmp_path


def test_corrupt_frame_late_in_chain_leaves_nothing(chain_dir: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    rec = Recorder()
    monkeypatch.setattr(S, "Machine", rec)
    last = chain_dir / "snap-0002.snap"
    data = last.read_bytes()
    bad = bytearray(data)
    bad[len(data) // 2] ^= 1  # inside a Pages frame, after two files were applied
    last.write_bytes(bytes(bad))
    threads = threading.active_count()
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(SnapshotFormatError, match="snap-0002.snap.*(crc32|corrupt)"):
        S.restore(last)
    assert len(rec.made) == 1 and rec.made[0]._closed  # built, then discarded
    assert threading.active_count() == threads
    assert len(os.listdir("/proc/self/fd")) == fds
    last.write_bytes(data[:-40])
    with pytest.raises(SnapshotFormatError, match="truncated"):
        S.restore(last)
    assert len(rec.made) == 2 and rec.made[1]._closed


def test_header_errors_are_found_before_building(chain_dir: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    rec = Recorder()
    monkeypatch.setattr(S, "Machine", rec)
    first = chain_dir / "snap-0000.snap"
    data = first.read_bytes()
    first.write_bytes(b"NOPE" + data[4:])
    with pytest.raises(SnapshotFormatError, match="snap-0000.snap.*bad magic"):
        S.restore(chain_dir / "snap-0002.snap")
    first.unlink()
    with pytest.raises(SnapshotFormatError, match="broken chain.*missing"):
        S.restore(chain_dir / "snap-0002.snap")
    assert rec.made == []


def test_bad_machine_state_blob(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rec = Recorder()
    monkeypatch.setattr(S, "Machine", rec)
    m = Machine(compute())
    try:
        w = S.SnapshotWriter(m, tmp_path)
        from dirtyring.machine.checkpoint import capture as real

        def broken(*a: Any, **kw: Any) -> Any:
            cp = real(*a, **kw)
            from dataclasses import replace
            return replace(cp, state=cp.state[:-3])

        monkeypatch.setattr(S, "capture", broken)
        info = w.full()
    finally:
        m.close()
    with pytest.raises(SnapshotFormatError, match="machine state"):
        S.restore(info.path)
    assert len(rec.made) == 1 and rec.made[0]._closed


# --- CLI ----------------------------------------------------------------------------------------
def _cli(*argv: str) -> int:
    p = argparse.ArgumentParser()
    cli.add_parsers(p.add_subparsers(dest="command"))
    args = p.parse_args(list(argv))
    return int(args.func(args))


def test_cli_snapshot_then_restore(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "snaps"
    assert _cli("snapshot", "--guest", "compute", "--memory", "4M", "--seconds", "0.3",
                "--every", "0.1", str(d)) == 0
    out = capsys.readouterr().out
    assert "full" in out and "delta" in out and "wrote" in out
    files = sorted(d.glob("*.snap"))
    # A full one, then an incremental one per --every while time is left: how many fit in
    # --seconds depends on the host; at least one incremental always does.
    assert len(files) >= 2 and f"wrote {len(files)} snapshots (1 full + {len(files) - 1} " \
        "incremental" in out
    assert _cli("restore", str(files[1]), "--seconds", "0.2") == 0
    out = capsys.readouterr().out
    assert "chain of 2" in out and "continues the snapshot's hash chain: ok" in out
    assert _cli("restore", str(d), "--seconds", "0.1", "--json") == 0
    assert '"event": "restored"' in capsys.readouterr().out
    files[0].unlink()
    with pytest.raises(SnapshotFormatError, match="missing"):
        _cli("restore", str(files[-1]))


def test_tracking_failure_makes_an_incremental_of_every_populated_page(
        tmp_path: Path, machines: list[Machine], monkeypatch: pytest.MonkeyPatch) -> None:
    from dirtyring.errors import TrackingError
    m = Machine(dirtier())
    machines.append(m)
    w = S.SnapshotWriter(m, tmp_path, verify=True)
    w.full()
    w.run(0.02)
    tracker = w.drv.tracker
    real = tracker.harvest

    def fail() -> Any:
        monkeypatch.setattr(tracker, "harvest", real)
        raise TrackingError("simulated ring overflow")

    monkeypatch.setattr(tracker, "harvest", fail)
    m.pause_all()  # stays paused through the capture: the populated set holds still
    info = w.incremental()
    assert m.memory is not None
    assert info.pages == sum(len(s.populated_pages()) for s in m.memory.slots)
    m.resume_all()
    w.run(0.02)
    last = w.incremental()  # tracking works again: a normal delta on top
    assert last.seq == 2 and last.parent == info.id
    m2 = S.restore(last.path)  # every file's fingerprint is checked on the way
    machines.append(m2)
