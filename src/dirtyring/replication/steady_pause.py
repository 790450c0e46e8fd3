"""The steady pause: replication checkpoints taken by native code while the hot set holds.

With the hot-set tracker and a working set that stays put, every checkpoint's pause does the
same work: GET each slot's dirty log and find it unchanged, copy the same pages into staging,
read XSAVE and the TSC. ``machine/native.py`` has the measurements of why that is C, and why
several epochs then run in one native call (``EpochBatch``): right after the guest ran, every
line of Python costs several times what it does warm, so the bookkeeping of a checkpoint
(staging, statistics, telling the uplink) is done once for a batch, after it.

This module sets the calls up from the parts that own each piece (the tracker: its logs and
the set they stand for; the stager: where the pages go; the state record: its reads and its
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
from .staging_area import PAGE, STATE_AREA_BYTES
from .staging_writer import Stager
from .uplink_messages import SteadyEpochs


#: Verify mode snapshots memory at each checkpoint of a batch up to this size (per staging
#: cell), so its digests are those of batched checkpoints too.
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
    """A pause program kept for one staging cell, and what it was built or retargeted for."""

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
        self._epoch_batch: native.EpochBatch | None = None  # made in the thread that runs it
        # While the hot set holds, each pause runs the same program but for the staging cell
        # it fills: one program per staging cell, kept while the state's layout and the set's
        # shape hold, and retargeted when the set or a log changes (building one anew is
        # ~90 µs of Python right after the guest ran, and every staging cell needs one).
        self._key: tuple[object, ...] = ()
        # Per (staging cell, delta); one a generation behind is retargeted to the current set.
        self._progs: dict[tuple[int, bool], _Kept] = {}
        self._shape: tuple[object, ...] = ()
        self._gen = 0
        self._counts = np.zeros((0, 0), np.int64)
        #: The current set's and logs' addresses (``_targets_of``; None: not found yet).
        self._targets: tuple[list[tuple[int, int]], list[tuple[int, int, int]]] | None = None
        self._sizes: list[tuple[int, int]] = []
        self._pages = 0
        # Verify mode: each program also copies all guest memory into a snapshot of its staging
        # cell, whose digest is the memory's at that checkpoint (the batch runs on past it).
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
        ready = self._ready()
        if ready is None:
            return None
        dirty, logs, template = ready
        live_digest = self.verify and self._snapshots is None  # taken in Python, paused
        cells = self.stager.free_ahead(min(1 if live_digest else most, self.tr.steady_left()))
        if not cells:
            return None
        delta = self._shadow_for is dirty
        progs = [self._kept(k, dirty, logs, template, delta).prog for k in cells]
        if self._epoch_batch is None:
            self._epoch_batch = self._runner.epoch_batch()
        b = self._epoch_batch
        why = self._runner.run_batch(b, interval, progs, m.memory.vmm_writes, writes,
                                     C.addressof(template.tsc_offset) if template.tscs else 0)
        # Python right after the guest ran is slow: nothing here is done per checkpoint but
        # what verify mode needs. The states are in staging already (``_program``).
        done = b.done
        if b.tsc_moved:  # (done is 0) the epochs' pauses updated the bases for nothing
            self.stale()
        enter, exit_ = b.all_times(done + 1)  # (the tail's entry, if any, as the last)
        epochs = self._completed(epoch, done, cells, delta, template) if done else None
        self.taken += done
        if b.why == native.ALL_DONE:
            return SteadyRun(epochs, self._pages, exit_[:done], enter[1:done], None, 0.0)
        stopped_by = "exit" if why == "exit" else "tsc moved" if b.tsc_moved else \
            "vmm write" if b.detail == native.VMM_WROTE else "log changed"
        return SteadyRun(epochs, self._pages, exit_[:done], enter[1:done + 1], why, enter[done],
                         stopped_by)

    def _ready(self) -> tuple[DirtySet, list[tuple[int, np.ndarray, bytes]],
                              BlobTemplate] | None:
        """The hot set, its logs and the state record's template, when a batch may be taken
        now (the kept programs' bookkeeping brought up to them); else None."""
        m = self.m
        assert m.memory is not None
        if m.memory.vmm_dirty_pending:
            return None
        steady = self.tr.steady()
        if steady is None:
            return None
        template = m.state_blob.template()
        if template is None or template.size > STATE_AREA_BYTES:
            return None
        dirty, logs = steady
        self._note_set(dirty, logs, template)
        if not 0 < self._pages <= self.stager.staging.cell_pages:
            return None  # (an empty set: the guest idles, nothing to batch)
        return dirty, logs, template

    def _note_set(self, dirty: DirtySet, logs: list[tuple[int, np.ndarray, bytes]],
                template: BlobTemplate) -> None:
        """Note a new set, logs or state layout: a new generation of the kept programs (a
        moved set of the same shape retargets them, ``_retarget``; another shape drops them)."""
        key = (dirty, template, *(last for _, _, last in logs))
        if len(key) == len(self._key) and all(a is b for a, b in zip(key, self._key)):
            return
        shape = (template, tuple(slot for slot, _ in dirty.items()),
                 tuple((slot, len(last)) for slot, _, last in logs))
        if shape != self._shape:
            self._shape, self._progs = shape, {}
            # Where the programs count each part's changed words (-1: pages), a row per
            # staging cell: the batch reads its rows in one go.
            self._counts = np.zeros((self.stager.staging.cells, len(dirty)), np.int64)
        self._key, self._gen = key, self._gen + 1
        self._sizes = [(slot, len(pages)) for slot, pages in dirty.items()]
        self._pages = sum(n for _, n in self._sizes)
        self._targets = None

    def _kept(self, k: int, dirty: DirtySet, logs: list[tuple[int, np.ndarray, bytes]],
              template: BlobTemplate, delta: bool) -> _Kept:
        """The program for staging cell ``k``, built or retargeted to the current set."""
        got = self._progs.get((k, delta))
        if got is None:
            got = self._progs[(k, delta)] = _Kept(
                self._program(k, dirty, logs, template, delta), self._gen, dirty, logs)
        elif got.gen != self._gen:
            self._retarget(k, got, dirty, logs)
        return got

    def _completed(self, epoch: int, done: int, cells: list[int], delta: bool,
                   template: BlobTemplate) -> SteadyEpochs:
        """The record of the ``done`` checkpoints a batch completed (epochs from ``epoch``,
        in the first ``done`` of ``cells``): the tracker and the stager are told of them."""
        m = self.m
        assert m.memory is not None
        self.tr.steady_done(done)
        seq = self.stager.claim_many(epoch, done, self._pages)
        assert seq % self.stager.staging.cells == cells[0], "staging moved"
        digests = None
        if self._snapshots is not None:
            digests = [digest_of((self._snapshots[k],)) for k in cells[:done]]
        elif self.verify:
            digests = [memory_digest(m.memory)]  # paused right after its only epoch
        return SteadyEpochs(epoch, seq, done, self._sizes,
                            self._counts[cells[:done]].tolist() if delta else None,
                            template.size, m.state_blob.encode_devices(), digests)

    def checkpointed(self) -> None:
        """An ordinary checkpoint was just taken (the guest is paused): keep the hot set's
        pages as they are now, for the next batch's deltas. Batched checkpoints keep them up
        to date themselves; any other change to them is in some ordinary checkpoint."""
        steady = self.tr.steady()
        # (A set bigger than a staging cell is never batched: copying it would only lengthen
        # every ordinary pause, by ~2 ms for 4096 pages here.)
        if steady is None or sum(len(p) for _, p in steady[0].items()) > \
                self.stager.staging.cell_pages:
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
        assert run.tail == "exit" and self._epoch_batch is not None
        why = self._runner.run_inline(interval, first_exit=self._epoch_batch.detail)
        return why, time.monotonic() - run.tail_entered

    def _retarget(self, k: int, entry: _Kept, dirty: DirtySet,
                  logs: list[tuple[int, np.ndarray, bytes]]) -> None:
        """Point a kept program at the current set and logs (same slots, same state layout)."""
        same, parts = self._targets_of(dirty, logs)
        data, idx = self.stager.addresses(k)
        entry.prog.retarget(same, [(data + off * PAGE, idx + off * 8, pages, n)
                                   for off, pages, n in parts])
        entry.gen, entry.dirty, entry.logs = self._gen, dirty, logs

    def _targets_of(self, dirty: DirtySet, logs: list[tuple[int, np.ndarray, bytes]]
                    ) -> tuple[list[tuple[int, int]], list[tuple[int, int, int]]]:
        """Where every program of the current set points, but for its staging cell: each
        log's last copy (address, size), and each part's (offset in the cell, page indices'
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
                 template: BlobTemplate, delta: bool) -> native.PauseProgram:
        """The pause into staging cell ``k``: the logs' GETs and the state's reads, the logs
        compared with the last ones, the hot set gathered, the state laid into the cell's state
        area.

        ``delta``: the gathers stage only the words that changed since the last checkpoint
        (compared with the shadows, which they update), as the uplink's XOR delta. Why: the
        uplink otherwise reads the whole staged pages back from memory (the pause stores them
        past the caches) to compare them with its own copy, ~35-45 µs for 64 pages on the
        other core, which the uplink and the standby share; here the pages are still in this
        core's cache, and the compare costs the pause about what the copy it replaces did
        (64 cached pages: ~13 µs against ~16-20 µs for the non-temporal copy, measured alone).
        It counts the changed words of each part (-1: pages) in row ``k`` of ``_counts``."""
        prog, vm = native.PauseProgram(), self.m.vm
        prog.keep.append(template)  # (the set and logs: kept by the caller's entry)
        same, parts = self._targets_of(dirty, logs)
        for (slot, bitmap, _), (last, size) in zip(logs, same):
            log_request = vm.dirty_log_request(slot, bitmap)
            prog.keep.append(log_request)
            prog.ioctl(vm.fd, U.KVM_GET_DIRTY_LOG, C.addressof(log_request))
            prog.same(int(bitmap.ctypes.data), last, size)
        for fd, request, arg, expect in template.reads:
            prog.ioctl(fd, request, arg, expect)
        for dst in template.tscs:
            prog.tsc(dst, C.addressof(template.tsc_offset))
        data, idx = self.stager.addresses(k)
        counts = self._counts[k]
        for i, ((slot, _), (off, pages, n)) in enumerate(zip(dirty.items(), parts)):
            rows, n_rows = self._rows[slot]
            shadow = int(self._shadows[slot].ctypes.data) if delta else 0
            prog.gather(data + off * PAGE, idx + off * 8, rows, pages, n, n_rows, shadow,
                        int(counts[i:].ctypes.data) if delta else 0)
        for dst, src, n in template.copies:
            prog.copy(dst, src, n)
        # The state goes with the pages: into the staging cell's state area, for the uplink.
        prog.copy(int(self.stager.staging.state_area(k).ctypes.data), template.address,
                  template.size)
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
