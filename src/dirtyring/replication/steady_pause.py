"""The steady pause: replication checkpoints taken by native code while the hot set holds.

With the hot-set tracker and a working set that stays put, every checkpoint's pause does the
same work: GET each slot's dirty log and find it unchanged, copy the same pages into staging,
read XSAVE and the TSC. ``machine/native.py`` has the measurements of why that is C, and why
several epochs then run in one native call (``EpochBatch``): right after the guest ran, every
line of Python costs several times what it does warm, so the bookkeeping of a checkpoint
(staging, statistics, telling the uplink) is done once for a batch, after it.

This module sets the calls up from the parts that own each piece (the tracker: its logs and
the set they stand for; the stager: where the pages go; the state blob: its reads and its
layout) and then tells each what happened. Whenever it cannot vouch for the result (a re-arm
is due, a log changed, the VMM wrote a page, the state's kept pieces are stale, staging is
full) it stops, having changed nothing for the epoch at hand, and the caller harvests, stages
and captures that epoch the ordinary way.
"""
from __future__ import annotations

import ctypes as C
import time
from dataclasses import dataclass

import numpy as np

from .._bindings import _uapi as U
from ..machine import native
from ..machine.stateblob import BlobTemplate
from ..machine.vm import Machine
from ..tracking import DirtySet, HotSetTracker
from ..machine.memory import digest_of
from ..machine.checkpoint import memory_digest
from .staging_area import BLOB_BYTES, PAGE, SteadyEpochs
from .staging_writer import Stager


#: Verify mode snapshots memory at each checkpoint of a batch up to this size (per staging
#: slot), so its digests are those of batched checkpoints too.
VERIFY_SNAPSHOT_MAX = 16 << 20


@dataclass(frozen=True, slots=True)
class SteadyRun:
    """What ``SteadyPause.run`` did: ``epochs``, the checkpoints completed (staged, their state
    laid out; None: none), then, unless ``tail`` is None, one more epoch that has no checkpoint
    yet. That epoch either ran to its end and is paused ("interval", "stopped": the caller
    harvests it) or is stopped at an exit Python must handle ("exit"): the caller first deals
    with the completed checkpoints (their device state and output precede the exit) and then
    calls ``SteadyPause.finish``."""

    epochs: SteadyEpochs | None
    pages: int  # staged per checkpoint
    #: Per checkpoint, time.monotonic() seconds: when its run ended, and when the guest ran
    #: again (all but the last when there is no tail: the guest is paused).
    exited: list[float]
    resumed: list[float]
    tail: str | None
    tail_entered: float  # time.monotonic() when that epoch began to run
    #: What ended the batch: "done" (all its epochs), "log changed", "vmm write", "exit",
    #: "tsc moved" (the guest's TSC offset changed: none of its epochs has a checkpoint, the
    #: caller checkpoints them as one, the ordinary way).
    stopped_by: str = "done"

    @property
    def count(self) -> int:
        return 0 if self.epochs is None else self.epochs.count


@dataclass(slots=True)
class _Kept:
    """A pause program kept for one staging slot, and what it was built or retargeted for."""

    prog: native.PauseProgram
    gen: int
    dirty: DirtySet  # the set and logs it points into (kept alive here)
    logs: list[tuple[int, np.ndarray, bytes]]


class SteadyPause:
    """The replication primary's native checkpoints of a steady hot set (see the module)."""

    def __init__(self, machine: Machine, tracker: HotSetTracker, stager: Stager, *,
                 verify: bool = False) -> None:
        assert machine.memory is not None and not machine.threaded
        assert len(machine.runners) == 1
        self.m, self.tr, self.stager, self.verify = machine, tracker, stager, verify
        self.taken = 0
        self._rows = {s.info.slot: (int(s.rows.ctypes.data), s.rows.shape[0])
                      for s in machine.memory.slots}
        self._runner = machine.runners[0]
        self._batch: native.EpochBatch | None = None  # made in the thread that runs it
        # While the hot set holds, each pause runs the same program but for the staging slot
        # it fills: one program per staging slot, kept while the blob's layout and the set's
        # shape hold, and retargeted when the set or a log changes (building one anew is
        # ~90 µs of Python right after the guest ran, and every staging slot needs one).
        self._key: tuple[object, ...] = ()
        # Per (staging slot, delta); one a generation behind is retargeted to the current set.
        self._progs: dict[tuple[int, bool], _Kept] = {}
        self._shape: tuple[object, ...] = ()
        self._gen = 0
        self._counts = np.zeros((0, 0), np.int64)
        #: The current set's and logs' addresses (``_targets_of``; None: not found yet).
        self._targets: tuple[list[tuple[int, int]], list[tuple[int, int, int]]] | None = None
        self._sizes: list[tuple[int, int]] = []
        self._pages = 0
        # Verify mode: each program also copies all guest memory into a snapshot of its staging
        # slot, whose digest is the memory's at that checkpoint (the batch runs on past it).
        # Guests too big for that take verified checkpoints one per call, digested live.
        mem = sum(s.info.size for s in machine.memory.slots)
        self._snapshots: dict[int, bytearray] | None = (
            {} if verify and mem <= VERIFY_SNAPSHOT_MAX else None)
        # The hot set's pages as of the last checkpoint (``checkpointed``), while they are
        # (``_shadow_for``: the set they are for): the pause then stages only the words that
        # changed since, as the XOR delta the uplink would otherwise compute from whole pages
        # (see ``_program``). Zeros until used: only the hot set's pages are ever touched.
        self._shadows = {s.info.slot: np.zeros_like(s.rows) for s in machine.memory.slots}
        self._shadow_for: DirtySet | None = None

    @classmethod
    def for_primary(cls, machine: Machine, stager: Stager, *,
                    verify: bool) -> SteadyPause | None:
        """The steady pause where it applies (inline hot-set machine of one vCPU, helper
        built), else None."""
        tr = machine.tracker
        if (machine.threaded or not isinstance(tr, HotSetTracker) or len(machine.runners) != 1
                or native.BACKEND != "c-nt"):
            return None
        return cls(machine, tr, stager, verify=verify)

    def run(self, epoch: int, interval: float, most: int) -> SteadyRun | None:
        """Run up to ``most`` epochs (numbered from ``epoch``; fewer if staging has less room
        or the tracker's next re-arm comes sooner) and checkpoint each into staging in native
        code. None, with nothing run, when the next epoch cannot be taken this way."""
        m = self.m
        assert m.memory is not None
        writes = int(m.memory.vmm_writes[0])  # before the check: a later write stops the batch
        if m.memory.vmm_dirty_pending:
            return None
        steady = self.tr.steady()
        if steady is None:
            return None
        blob = m.state_blob.template()
        if blob is None or blob.size > BLOB_BYTES:
            return None
        dirty, logs = steady
        key = (dirty, blob, *(last for _, _, last in logs))
        if len(key) != len(self._key) or any(a is not b for a, b in zip(key, self._key)):
            # A moved set of the same shape retargets the kept programs (``_retarget``).
            shape = (blob, tuple(slot for slot, _ in dirty.items()),
                     tuple((slot, len(last)) for slot, _, last in logs))
            if shape != self._shape:
                self._shape, self._progs = shape, {}
                # Where the programs count each part's changed words (-1: pages), a row per
                # staging slot: the batch reads its rows in one go.
                self._counts = np.zeros((self.stager.staging.slots, len(dirty)), np.int64)
            self._key, self._gen = key, self._gen + 1
            self._sizes = [(slot, len(pages)) for slot, pages in dirty.items()]
            self._pages = sum(n for _, n in self._sizes)
            self._targets = None
        if not 0 < self._pages <= self.stager.staging.slot_pages:
            return None  # (an empty set: the guest idles, nothing to batch)
        live_digest = self.verify and self._snapshots is None  # taken in Python, paused
        slots = self.stager.free_ahead(min(1 if live_digest else most, self.tr.steady_left()))
        if not slots:
            return None
        delta = self._shadow_for is dirty
        chosen = []
        for k in slots:
            got = self._progs.get((k, delta))
            if got is None:
                got = self._progs[(k, delta)] = _Kept(self._program(k, dirty, logs, blob, delta),
                                                       self._gen, dirty, logs)
            elif got.gen != self._gen:
                self._retarget(k, got, dirty, logs)
            chosen.append(got)
        if self._batch is None:
            self._batch = self._runner.epoch_batch()
        b = self._batch
        why = self._runner.run_batch(b, interval, [c.prog for c in chosen],
                                     m.memory.vmm_writes, writes,
                                     C.addressof(blob.tsc_offset) if blob.tscs else 0)
        # Python right after the guest ran is slow: nothing here is done per checkpoint but
        # what verify mode needs. The states are in staging already (``_program``).
        done = b.done
        if b.tsc_moved:  # (done is 0) the epochs' pauses updated the bases for nothing
            self.stale()
        enter, exit_ = b.all_times(done + 1)  # (the tail's entry, if any, as the last)
        epochs = None
        if done:
            self.tr.steady_done(done)
            seq = self.stager.claim_many(epoch, done, self._pages)
            assert seq % self.stager.staging.slots == slots[0], "staging moved"
            digests = None
            if self._snapshots is not None:
                digests = [digest_of((self._snapshots[k],)) for k in slots[:done]]
            elif self.verify:
                digests = [memory_digest(m.memory)]  # paused right after its only epoch
            epochs = SteadyEpochs(
                epoch, seq, done, self._sizes,
                self._counts[slots[:done]].tolist() if delta else None,
                blob.size, m.state_blob.encode_devices(), digests)
        self.taken += done
        if b.why == native.ALL_DONE:
            return SteadyRun(epochs, self._pages, exit_[:done], enter[1:done], None, 0.0)
        stopped_by = "exit" if why == "exit" else "tsc moved" if b.tsc_moved else \
            "vmm write" if b.detail == native.VMM_WROTE else "log changed"
        return SteadyRun(epochs, self._pages, exit_[:done], enter[1:done + 1], why, enter[done],
                         stopped_by)

    def checkpointed(self) -> None:
        """An ordinary checkpoint was just taken (the guest is paused): keep the hot set's
        pages as they are now, for the next batch's deltas. Batched checkpoints keep them up
        to date themselves; any other change to them is in some ordinary checkpoint."""
        steady = self.tr.steady()
        # (A set bigger than a staging slot is never batched: copying it would only lengthen
        # every ordinary pause, by ~2 ms for 4096 pages here.)
        if steady is None or sum(len(p) for _, p in steady[0].items()) > \
                self.stager.staging.slot_pages:
            self._shadow_for = None
            return
        self._shadow_for = steady[0]
        assert self.m.memory is not None
        for slot, pages in steady[0].items():
            rows = self.m.memory.slots[slot].rows
            self._shadows[slot][pages] = rows[pages]

    def stale(self) -> None:
        """An epoch's writes were dropped unsent (the run is stopping): the shadows no longer
        hold the last checkpoint's pages."""
        self._shadow_for = None

    def finish(self, run: SteadyRun, interval: float) -> tuple[str, float]:
        """Handle the exit that stopped ``run``'s tail epoch and run it to its end: why it
        ended ("interval", "budget", "stopped") and how long it ran."""
        assert run.tail == "exit" and self._batch is not None
        why = self._runner.run_inline(interval, first_exit=self._batch.detail)
        return why, time.monotonic() - run.tail_entered

    def _retarget(self, k: int, entry: _Kept, dirty: DirtySet,
                  logs: list[tuple[int, np.ndarray, bytes]]) -> None:
        """Point a kept program at the current set and logs (same slots, same blob)."""
        same, parts = self._targets_of(dirty, logs)
        data, idx = self.stager.addresses(k)
        entry.prog.retarget(same, [(data + off * PAGE, idx + off * 8, pages, n)
                                   for off, pages, n in parts])
        entry.gen, entry.dirty, entry.logs = self._gen, dirty, logs

    def _targets_of(self, dirty: DirtySet, logs: list[tuple[int, np.ndarray, bytes]]
                    ) -> tuple[list[tuple[int, int]], list[tuple[int, int, int]]]:
        """Where every program of the current set points, but for its staging slot: each
        log's last copy (address, size), and each part's (offset in the slot, page indices'
        address, pages). Found once per set (``_targets``): each costs ~1 µs here."""
        if self._targets is None:
            same = [(int(C.cast(C.c_char_p(last), C.c_void_p).value or 0), len(last))
                    for _, _, last in logs]
            parts, off = [], 0
            for _, pages in dirty.items():
                assert pages.dtype == np.int64 and pages.flags.c_contiguous, "hot-set pages"
                parts.append((off, int(pages.ctypes.data), len(pages)))
                off += len(pages)
            self._targets = (same, parts)
        return self._targets

    def _program(self, k: int, dirty: DirtySet, logs: list[tuple[int, np.ndarray, bytes]],
                 blob: BlobTemplate, delta: bool) -> native.PauseProgram:
        """The pause into staging slot ``k``: the logs' GETs and the state's reads, the logs
        compared with the last ones, the hot set gathered, the state laid into the blob.

        ``delta``: the gathers stage only the words that changed since the last checkpoint
        (compared with the shadows, which they update), as the uplink's XOR delta. Why: the
        uplink otherwise reads the whole staged pages back from memory (the pause stores them
        past the caches) to compare them with its own copy, ~35-45 µs for 64 pages on the
        other core, which the uplink and the standby share; here the pages are still in this
        core's cache, and the compare costs the pause about what the copy it replaces did
        (64 cached pages: ~13 µs against ~16-20 µs for the non-temporal copy, measured alone).
        It counts the changed words of each part (-1: pages) in row ``k`` of ``_counts``."""
        prog, vm = native.PauseProgram(), self.m.vm
        prog.keep.append(blob)  # (the set and logs: kept by the caller's entry)
        same, parts = self._targets_of(dirty, logs)
        for (slot, bitmap, _), (last, size) in zip(logs, same):
            log_request = vm.dirty_log_request(slot, bitmap)
            prog.keep.append(log_request)
            prog.ioctl(vm.fd, U.KVM_GET_DIRTY_LOG, C.addressof(log_request))
            prog.same(int(bitmap.ctypes.data), last, size)
        for fd, request, arg, expect in blob.reads:
            prog.ioctl(fd, request, arg, expect)
        for dst in blob.tscs:
            prog.tsc(dst, C.addressof(blob.tsc_offset))
        data, idx = self.stager.addresses(k)
        counts = self._counts[k]
        for i, ((slot, _), (off, pages, n)) in enumerate(zip(dirty.items(), parts)):
            rows, n_rows = self._rows[slot]
            shadow = int(self._shadows[slot].ctypes.data) if delta else 0
            prog.gather(data + off * PAGE, idx + off * 8, rows, pages, n, n_rows, shadow,
                        int(counts[i:].ctypes.data) if delta else 0)
        for dst, src, n in blob.copies:
            prog.copy(dst, src, n)
        # The state goes with the pages: into the staging slot's state area, for the uplink.
        prog.copy(int(self.stager.staging.blob(k).ctypes.data), blob.address, blob.size)
        if self._snapshots is not None:
            assert self.m.memory is not None
            snap = self._snapshots.setdefault(
                k, bytearray(sum(s.info.size for s in self.m.memory.slots)))
            base = C.addressof(C.c_char.from_buffer(snap))
            prog.keep.append(snap)
            at = 0
            for s in self.m.memory.slots:
                prog.copy(base + at, int(s.rows.ctypes.data), s.info.size)
                at += s.info.size
        prog.keep.append(self._counts)
        return prog
