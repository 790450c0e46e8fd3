"""The steady batch on real KVM: what native code stages and encodes for each epoch must be what
the ordinary harvest, gather and capture give for that epoch, and it must step aside whenever
it cannot vouch for that (a re-arm is due, the VMM wrote a page, staging is busy). Behaviour
only, never timing."""
from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from dirtyring._bindings import _uapi as U
from dirtyring._bindings.mapping import memfd
from dirtyring.guests.protocol import GuestParams, Pattern
from dirtyring.machine.config import MachineConfig
from dirtyring.machine.epoch import EpochDriver
from dirtyring.machine.memory import digest_of
from dirtyring.machine.native import DELTA_WORDS
from dirtyring.machine.state import MachineState
from dirtyring.machine.stateblob import host_tsc_plus_offset
from dirtyring.machine.vm import Machine
from dirtyring.replication.staging_area import Staging
from dirtyring.replication.uplink_messages import CONSUMED, Part
from dirtyring.replication.steady_pause import SteadyPause, SteadyRun
from dirtyring.replication.staging_writer import Stager
from dirtyring.tracking import HotSetTracker

MiB = 1 << 20
EPOCH = 0.0002  # the batches' epochs
#: How long a test may drive epochs towards what it needs (a steady set, so many batched
#: checkpoints, an exit inside a batch) before it fails. Generous: a slow or loaded host only
#: takes longer; nothing here measures speed.
DEADLINE = 60.0
#: The longest ordinary epoch ``Driver`` grows to (a bound, far above what any host needs).
LONGEST = 1.0


class Driver(EpochDriver):
    """The epoch driver, with ordinary epochs long enough for the guest to write its whole hot
    set within one (``settle`` finds how long; the batches still run at ``EPOCH``).

    Why: the guest's first write to each page after the tracker re-arms it faults (~2 µs on
    one host, ~38 µs on another), and the tracker re-arms less often only if the set came back
    within the re-armed one (``HotSetTracker._adapt``). With 200 µs ordinary epochs a slow host
    reaches ~6 pages of a 64-page set per epoch: the set is never whole at a re-arm, the period
    stays 8 epochs, the log changes every epoch and no batch ever runs."""

    length = EPOCH
    _last_pages = -1

    def ordinary(self, epoch: int) -> int:
        """Epoch ``epoch`` checkpointed the ordinary way (run, harvest, capture); the next
        epoch's number. A set that grew since the last ordinary epoch means the guest had not
        reached all of it yet: the next ordinary epoch is twice as long."""
        e = self.run_epoch(self.length)
        self.m.encode_state()
        n = len(e.dirty)
        if 0 <= self._last_pages < n:
            self.length = min(2 * self.length, LONGEST)
        self._last_pages = n
        return epoch + 1

    def settle(self, epoch: int) -> int:
        """Ordinary epochs from ``epoch`` until the hot set holds: two harvests in a row gave
        the same set (no log changed) and it is what the next steady harvest stands for (no
        re-arm due). The next epoch's number."""
        tr = self.tracker
        assert isinstance(tr, HotSetTracker)
        end = time.monotonic() + DEADLINE
        last = None
        while True:
            epoch = self.ordinary(epoch)
            steady = tr.steady()
            now = steady[0] if steady is not None else None
            if now is not None and now is last:
                return epoch
            last = now
            assert time.monotonic() < end, \
                f"the hot set never became steady (ordinary epochs of {self.length * 1e3:g} ms)"


def stager(cells: int = 8, cell_pages: int = 256) -> Stager:
    """The epoch loop's side of a staging area, with no uplink process reading it."""
    return Stager(Staging(memfd("test-staging", Staging.size_for(cells, cell_pages)), cells,
                          cell_pages), max_ahead=cells - 1)


def consumed_all(up: Stager) -> None:
    """What the uplink does once it has sent what was staged: the cells are free again."""
    up.staging.header[CONSUMED] = up.seq + 1


def hot_machine(machines: list[Machine]) -> Machine:
    m = Machine(MachineConfig(guest="dirtier", tracker="hotset", data_slots=(MiB,),
                              params=GuestParams(pattern=Pattern.HOT, hot_pages=64)),
                threaded=False)
    machines.append(m)
    return m


def steady_setup(machines: list[Machine], *, verify: bool = False, **staging: int
                 ) -> tuple[Machine, HotSetTracker, Stager, SteadyPause, Driver]:
    """A hot-set machine, its tracker, a staging area, the steady pause over them, a driver."""
    m = hot_machine(machines)
    tr = m.tracker
    assert isinstance(tr, HotSetTracker) and m.memory is not None
    up = stager(**staging)
    return m, tr, up, SteadyPause(m, tr, up, verify=verify), Driver(m)


def same_state(fast: bytes, m: Machine) -> None:
    """The fast state record equals a capture now in everything but the TSC, which runs on."""
    a, b = MachineState.decode(fast), m.capture_state()
    assert a.config == b.config and a.devices == b.devices
    for x, y in zip(a.vcpus, b.vcpus):
        assert (x.regs, x.sregs, x.events, x.xsave, x.xcrs, x.lapic, x.mp_state) == \
            (y.regs, y.sregs, y.events, y.xsave, y.xcrs, y.lapic, y.mp_state)
        tx, ty = dict(x.msrs), dict(y.msrs)
        assert 0 < tx.pop(U.MSR_IA32_TSC) <= ty.pop(U.MSR_IA32_TSC) and tx == ty


@dataclass(frozen=True)
class Cp:
    """One checkpoint of a batch as the uplink reads it from its record and staging."""

    pages: int
    parts: list[Part]
    state: bytes
    digest: bytes


def checkpoints(got: SteadyRun, up: Stager) -> list[Cp]:
    e = got.epochs
    if e is None:
        return []
    assert len(got.exited) == e.count == len(got.resumed) + (got.tail is None)
    return [Cp(got.pages, e.parts(i), e.state(up.staging, i), e.digest(i))
            for i in range(e.count)]


def parts_of(cp: Cp) -> dict[int, tuple[int, int, int]]:
    """Memory slot -> (staging seq, offset, pages) of one checkpoint's staged pages."""
    assert all(words == -1 for *_, words in cp.parts)  # pages: no base was ever given
    return {slot: (seq, off, k) for seq, off, slot, k, _ in cp.parts}


@pytest.mark.parametrize("verify", [False, True])
def test_batches_stage_and_encode_each_epoch_like_the_ordinary_path(
        machines: list[Machine], verify: bool) -> None:
    m, tr, up, sp, drv = steady_setup(machines, verify=verify)
    epoch, sizes, rearms = drv.settle(1), Counter[int](), 0
    end = time.monotonic() + DEADLINE
    # Until whole batches ran while the set held, and across three re-arms.
    while sizes[4] <= 20 or rearms < 3:
        assert time.monotonic() < end, (sizes, rearms)
        harvests, left = tr.statistics().harvests, tr.steady_left()
        got = sp.run(epoch, EPOCH, 4)
        if left == 0:  # the next harvest re-arms: only the ordinary one may do that
            assert got is None
            rearms += 1
        if got is None:
            assert up._parts == []  # nothing reserved, nothing run
            epoch = drv.ordinary(epoch)  # the ordinary way: run, harvest and capture
            continue
        cps = checkpoints(got, up)
        sizes[len(cps)] += 1
        assert tr.statistics().harvests == harvests + len(cps)
        assert len(cps) <= left  # a batch never runs past the tracker's next re-arm
        staged = [parts_of(cp) for cp in cps]
        seqs = [seq for p in staged for seq, _, _ in p.values()]
        assert len(set(seqs)) == len(cps) and up._parts == []  # a staging cell each
        tscs = []
        for cp, parts in zip(cps, staged):
            st = MachineState.decode(cp.state)
            tscs.append(dict(st.vcpus[0].msrs)[U.MSR_IA32_TSC])
            assert cp.pages == sum(k for _, _, k in parts.values())
            assert 64 in {k for _, _, k in parts.values()}  # the hot set itself
            if verify:
                # The snapshot of all memory taken at that pause: its digest is the
                # checkpoint's, and the pages staged for it are its pages.
                assert sp._snapshots is not None
                seq = next(iter(parts.values()))[0]
                snap = np.frombuffer(sp._snapshots[seq % up.staging.cells], np.uint8)
                assert cp.digest == digest_of((snap,))
                at = 0
                for ms in m.memory.slots:
                    if ms.info.slot in parts:
                        seq, off, k = parts[ms.info.slot]
                        idx = np.array(up.staging.indices(seq)[off:off + k])
                        rows = snap[at:at + ms.info.size].reshape(-1, 4096)
                        assert np.array_equal(up.staging.data(seq)[off:off + k], rows[idx])
                    at += ms.info.size
            else:
                assert cp.digest == b""
        assert tscs == sorted(tscs) and len(set(tscs)) == len(tscs)  # one pause each, in order
        last, last_parts = cps[-1] if cps else None, staged[-1] if staged else None
        if got.tail is None:
            # The guest is paused right after the last checkpoint: it matches memory now.
            assert last is not None and last_parts is not None
            for slot, (seq, off, k) in last_parts.items():
                idx = np.array(up.staging.indices(seq)[off:off + k])
                assert np.array_equal(up.staging.data(seq)[off:off + k],
                                      m.memory.slots[slot].rows[idx])
            same_state(last.state, m)
            if verify:
                assert last.digest == m.memory.digest()
        else:  # one more epoch ran and waits for its ordinary checkpoint
            assert got.tail == "interval"
            finish_tail(sp, drv, got)
            m.encode_state()
            epoch += 1
        epoch += len(cps)
        consumed_all(up)
    assert sp.taken == sum(n * c for n, c in sizes.items())
    assert tr.statistics().harvests == epoch - 1  # every epoch harvested, batched or not


def test_with_a_base_batches_stage_only_the_words_changed_since_the_last_checkpoint(
        machines: list[Machine]) -> None:
    """As the primary runs it: after each ordinary checkpoint the pause keeps the hot set's
    pages (``checkpointed``), and the batch then stages only the words each checkpoint
    changed. Applied to what a standby holds (the checkpoint before), they must give that
    checkpoint's memory exactly (verify mode snapshots all of it at each pause)."""
    m, tr, up, sp, drv = steady_setup(machines, verify=True)
    slots = m.memory.slots
    assert [s.info.slot for s in slots] == list(range(len(slots)))
    image = [s.rows.copy() for s in slots]  # what the standby holds: the last checkpoint

    def ordinary() -> None:  # the standby gets every page; the pause its new base
        for i, s in enumerate(slots):
            image[i][:] = s.rows
        sp.checkpointed()

    epoch, by_words, by_pages, batched = 1, 0, 0, 0
    end = time.monotonic() + DEADLINE
    while batched <= 100:
        assert time.monotonic() < end, (batched, epoch)
        got = sp.run(epoch, EPOCH, 4)
        if got is None:
            epoch = drv.ordinary(epoch)
            ordinary()
            continue
        for cp in checkpoints(got, up):
            for seq, off, slot, k, words in cp.parts:
                idx = np.array(up.staging.indices(seq)[off:off + k])
                data = up.staging.data(seq)[off:off + k]
                if words >= 0:
                    flat = data.reshape(-1)
                    where = flat[:words * 8].view(np.int64)
                    diff = flat[k * DELTA_WORDS * 8:][:words * 8].view(np.uint64)
                    image[slot].view(np.uint64)[idx[where // 512], where % 512] ^= diff
                    by_words += 1
                else:
                    image[slot][idx] = data
                    by_pages += 1
            assert sp._snapshots is not None
            snap = sp._snapshots[cp.parts[0].seq % up.staging.cells]
            assert b"".join(i.tobytes() for i in image) == bytes(snap), epoch
            batched += 1
        epoch += got.count
        if got.tail is not None:
            finish_tail(sp, drv, got)
            m.encode_state()
            ordinary()
            epoch += 1
        consumed_all(up)
    assert by_words >= 2 * batched - by_pages  # words, nearly always
    assert by_words > 10 * by_pages


def test_an_epoch_dropped_unsent_leaves_no_base(machines: list[Machine]) -> None:
    m, tr, up, sp, drv = steady_setup(machines)
    epoch = drv.settle(1)
    sp.checkpointed()
    sp.stale()
    got, epoch = steady_run(sp, m, drv, up, epoch)
    assert all(words == -1 for cp in checkpoints(got, up) for *_, words in cp.parts)
    epoch = after_batch(sp, m, drv, up, got, epoch)
    sp.checkpointed()  # the next ordinary checkpoint gives the base back
    got, epoch = steady_run(sp, m, drv, up, epoch, checkpointed=True)
    assert all(words >= 0 for cp in checkpoints(got, up) for *_, words in cp.parts)


def test_a_set_too_big_to_batch_keeps_no_base(machines: list[Machine]) -> None:
    """A hot set bigger than a staging cell is never batched: the ordinary checkpoint does
    not copy it (that would only lengthen every ordinary pause)."""
    m = hot_machine(machines)
    tr = m.tracker
    assert isinstance(tr, HotSetTracker) and m.memory is not None
    Driver(m).settle(1)
    steady = tr.steady()
    assert steady is not None
    n = sum(len(p) for _, p in steady[0].items())
    assert n > 1
    sp = SteadyPause(m, tr, stager(cell_pages=n - 1))  # the set does not fit
    before = {slot: shadow.copy() for slot, shadow in sp._shadows.items()}
    sp.checkpointed()
    assert sp._shadow_for is None
    assert all(np.array_equal(before[slot], sh) for slot, sh in sp._shadows.items())
    sp2 = SteadyPause(m, tr, stager())  # it fits here: the base is kept
    sp2.checkpointed()
    assert sp2._shadow_for is not None


def test_it_steps_aside_for_vmm_writes_and_busy_staging(machines: list[Machine]) -> None:
    m, tr, up, sp, drv = steady_setup(machines, cells=3)
    epoch = drv.settle(1)
    m.memory.mark_dirty(1, 200)  # the VMM wrote a page: only the ordinary harvest reports it
    assert sp.run(epoch, EPOCH, 4) is None and up._parts == []
    assert (1, 200) in drv.run_epoch(EPOCH).dirty
    m.encode_state()
    epoch = drv.settle(epoch + 1)
    up.seq, up.staging.header[CONSUMED] = 10, 8  # two staging cells still in the uplink's hands
    assert sp.run(epoch, EPOCH, 4) is None and up._parts == []
    up.staging.header[CONSUMED] = 9  # one free (max_ahead 2): a batch of one at most
    got, epoch = steady_run(sp, m, drv, up, epoch)
    assert got.count == 1 and checkpoints(got, up)[0].parts


def test_a_vmm_write_during_a_batch_stops_it_and_goes_in_the_ordinary_checkpoint(
        machines: list[Machine]) -> None:
    """The VMM may write guest memory from another thread while a batch runs (the GIL is free
    then). No dirty log shows such a write, so the batch stops at the end of the epoch it may
    belong to, and that epoch's ordinary harvest carries the page."""
    m, tr, up, sp, drv = steady_setup(machines)
    epoch = drv.settle(1)
    steady = tr.steady

    def write_then_steady() -> Any:  # a write after run() checked for pending ones
        # Only the announcement: on this host KVM's log happens to show the VMM's writes
        # too, and on hardware KVM it does not; the batch must not depend on that.
        m.memory.mark_dirty(1, 200)  # type: ignore[union-attr]
        return steady()
    tr.steady = write_then_steady  # type: ignore[method-assign]
    got = sp.run(epoch, EPOCH, 8)
    tr.steady = steady  # type: ignore[method-assign]
    assert got is not None and got.stopped_by == "vmm write"  # not a log: the announcement
    assert got.epochs is None and got.tail == "interval" and sp.taken == 0
    assert (1, 200) in drv.harvest_epoch(drv.ran(got.tail, 0.0)).dirty


def finish_tail(sp: SteadyPause, drv: EpochDriver, got: SteadyRun) -> None:
    """The ordinary end of a batch's last epoch, as the primary does it."""
    assert got.tail is not None
    why = sp.finish(got, EPOCH)[0] if got.tail == "exit" else got.tail
    drv.harvest_epoch(drv.ran(why, 0.0))


def steady_run(sp: SteadyPause, m: Machine, drv: Driver, up: Stager, epoch: int, *,
               checkpointed: bool = False) -> tuple[SteadyRun, int]:
    """A batch from epoch ``epoch`` on that completes a checkpoint, and its first epoch's
    number. Each epoch before it is checkpointed the ordinary way (and then, with
    ``checkpointed``, the pause keeps that checkpoint's pages as its base, as the primary
    does). (Right after a re-arm the set is not whole yet and the log differs from one epoch
    to the next: the batch steps aside then, which is what it should do.)"""
    end = time.monotonic() + DEADLINE
    while True:
        got = sp.run(epoch, EPOCH, 4)
        if got is not None and got.count:
            return got, epoch
        assert up._parts == []
        if got is None:
            epoch = drv.ordinary(epoch)
        else:
            finish_tail(sp, drv, got)
            m.encode_state()
            epoch += 1
        if checkpointed:
            sp.checkpointed()
        assert time.monotonic() < end, "no steady checkpoint"


def test_a_batch_stops_at_guest_io_and_its_checkpoints_precede_it(
        machines: list[Machine]) -> None:
    """An exit the batch cannot handle (the guest's I/O) stops it: the checkpoints completed
    before it carry the device state from before it (the caller queues them, then handles the
    exit), and the epoch it stopped gets the ordinary checkpoint."""
    m = Machine(MachineConfig(guest="dirtier", tracker="hotset", data_slots=(MiB,),
                              params=GuestParams(pattern=Pattern.HOT, hot_pages=64,
                                                 exit_every=300_000)),
                threaded=False)
    machines.append(m)
    tr = m.tracker
    assert isinstance(tr, HotSetTracker)
    up = stager()
    sp = SteadyPause(m, tr, up)
    drv = Driver(m)
    epoch = drv.settle(1)
    ios = m.runners[0].exits[U.KVM_EXIT_IO]
    progress, stopped_at_io, changed_by_io = m.progress(), 0, 0
    end = time.monotonic() + DEADLINE
    # Until batches stopped at the guest's I/O and many checkpoints were batched around it.
    while not (stopped_at_io > 0 and changed_by_io > 0 and sp.taken > 100):
        assert time.monotonic() < end, (stopped_at_io, changed_by_io, sp.taken)
        got = sp.run(epoch, EPOCH, 8)
        if got is None:
            epoch = drv.ordinary(epoch)
            continue
        epoch += got.count
        if got.tail == "exit":
            assert got.stopped_by == "exit"
            stopped_at_io += 1
            before = {d.name: d.save() for d in m.devices}
            for cp in checkpoints(got, up):
                assert {d.name: d.data for d in MachineState.decode(cp.state).devices} == before
            finish_tail(sp, drv, got)
            changed_by_io += {d.name: d.save() for d in m.devices} != before
            m.encode_state()
            epoch += 1
        elif got.tail is not None:
            finish_tail(sp, drv, got)
            m.encode_state()
            epoch += 1
        consumed_all(up)
    assert m.runners[0].exits[U.KVM_EXIT_IO] > ios and m.progress() > progress
    assert m.crashed is None


def test_pauses_store_the_guests_tsc_without_an_ioctl_where_it_is_the_hosts(
        machines: list[Machine]) -> None:
    """Where KVM's guest TSC is the host's plus the vCPU's offset (checked when the state's
    pieces are built), the pause stores that sum itself: every checkpoint's TSC lies between
    the guest's TSC read (KVM_GET_MSRS) before the batch and after it, and they increase."""
    m, tr, up, sp, drv = steady_setup(machines)
    epoch = drv.settle(1)
    blob = m.state_blob.template()
    assert blob is not None
    fd = m.runners[0].fd
    assert bool(blob.tscs) == host_tsc_plus_offset(m.runners[0])
    checked = 0
    end = time.monotonic() + DEADLINE
    while checked <= 20:  # checkpoints of several batches
        assert time.monotonic() < end, checked
        before = fd.get_tsc()
        got = sp.run(epoch, EPOCH, 4)
        if got is None:
            epoch = drv.ordinary(epoch)
            continue
        after = fd.get_tsc()
        tscs = [dict(MachineState.decode(cp.state).vcpus[0].msrs)[U.MSR_IA32_TSC]
                for cp in checkpoints(got, up)]
        assert all(a < b for a, b in zip([before, *tscs], [*tscs, after]))  # in order
        checked += len(tscs)
        epoch = after_batch(sp, m, drv, up, got, epoch)


def after_batch(sp: SteadyPause, m: Machine, drv: EpochDriver, up: Stager, got: SteadyRun,
                epoch: int) -> int:
    """What the primary does after batch ``got`` of epochs from ``epoch`` on (the uplink here
    frees their staging at once): the tail's ordinary checkpoint. The next epoch's number."""
    epoch += got.count
    if got.tail is not None:
        finish_tail(sp, drv, got)
        m.encode_state()
        epoch += 1
    consumed_all(up)
    return epoch


def test_a_tsc_offset_that_moved_during_a_batch_voids_its_checkpoints(
        machines: list[Machine]) -> None:
    """The pauses add the offset the batch read at its start; if the vCPU's offset is another
    at its end (the guest wrote its TSC, or KVM moved it), their TSC values may be wrong, so
    none of the epochs gets a checkpoint: the caller checkpoints them as one, the ordinary
    way, and the next batch stages whole pages (its base is gone). Here the offset the pauses
    add is changed under the running batch instead (this host's KVM keeps every offset 0)."""
    m, tr, up, sp, drv = steady_setup(machines)
    epoch = drv.settle(1)
    sp.checkpointed()
    blob = m.state_blob.template()
    assert blob is not None
    if not blob.tscs:
        pytest.skip("KVM here scales the guest's TSC: the pause reads it with KVM_GET_MSRS")
    real = m.runners[0].fd.tsc_offset()
    assert real is not None
    lock, done = threading.Lock(), threading.Event()

    def move() -> None:
        """Once the guest runs (the batch read the offset before its first KVM_RUN), move the
        offset the pauses add, unless the batch returned first."""
        progress = m.progress()
        while not done.wait(0.0002):
            if m.progress() != progress:
                with lock:
                    if not done.is_set():
                        blob.tsc_offset.value = real + 12345
                return

    end = time.monotonic() + DEADLINE
    while True:
        assert time.monotonic() < end, "no batch ran while the offset moved"
        done.clear()
        mover = threading.Thread(target=move)
        mover.start()
        try:
            got = sp.run(epoch, 0.002, 8)
        finally:
            with lock:
                done.set()
            mover.join()
        if got is not None and got.stopped_by == "tsc moved":
            break
        # Too short to be moved in time (or not run): checkpoint as usual and try again.
        if got is None:
            epoch = drv.ordinary(epoch)
        else:
            epoch = after_batch(sp, m, drv, up, got, epoch)
        sp.checkpointed()
    assert got.epochs is None and got.count == 0 and got.tail == "interval"
    assert sp._shadow_for is None  # the pauses' base went with the voided epochs
    finish_tail(sp, drv, got)  # the ordinary checkpoint of all of them
    m.encode_state()
    sp.checkpointed()
    got, _ = steady_run(sp, m, drv, up, epoch + 1)  # the next batch reads the offset afresh
    assert got.count and got.stopped_by != "tsc moved"
