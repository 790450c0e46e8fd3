"""Snapshots to files: one full snapshot, then incremental ones holding only the pages dirtied
since the previous snapshot, as a chain; restore a new machine from any snapshot of a chain.

File format
-----------
A snapshot file is one checkpoint written as a wire stream: exactly the frames a replication
primary sends a standby for one epoch, written by a primary-role :class:`wire.Connection` and
read back by a standby-role one fed from the file. There is no second codec::

    Hello        version = FORMAT_MAJOR, session_id = the snapshot's id (16 random bytes),
                 config = JSON {"format": "dirtyring-snapshot", "version": "MAJOR.MINOR",
                                "machine": <MachineConfig>, "snapshot": <metadata>}
    EpochBegin   epoch = seq + 1; kind "full" (seq 0) or "delta"
    Pages ...    memory section: sorted page runs of one slot, at most 4096 pages a frame
    MachineBlob  state section: MachineState.encode() (vCPUs and devices, never memory)
    EpochEnd     n_pages; digest = fingerprint of all guest memory at the capture
    Goodbye      end marker: a file that stops before it (even at a frame boundary) is truncated

Metadata: ``id``, ``parent`` (id, or null for the full snapshot), ``parent_file``, ``chain``
(the full snapshot's id), ``seq`` (0 for the full one, +1 per increment), ``kind``, ``name``,
``created`` (Unix time), ``pages``. Every frame carries the wire magic and version, a length,
a sequence number (a dropped or repeated frame is a gap), a crc32 and an HMAC-SHA256. The
default key is public (:data:`FILE_KEY`), so the HMAC is a second checksum; pass your own key
to make files tamper-evident. A full snapshot omits all-zero pages (a restore starts from
zeroed memory); a delta carries every dirty page (zero runs cost 17 bytes). Version rule: a
different major or a newer minor is refused.

The memory fingerprint is blake2b-128 over the blake2b-64 of every page, slot by slot, in
order. Unlike one hash over all memory it can be kept up to date from the captured pages
alone (the writer never rereads memory it did not capture), and a restore checks it after
every file of the chain from the pages it applied.

Why one file per snapshot, with memory and state in separate sections (not ``.mem`` + ``.snap``):
a snapshot *is* one epoch of the replication stream, so one Connection writes it and one reads
it, and the protocol rules (one Hello, pages inside the epoch, EpochEnd counting every page)
guard the file for free. One file is renamed into place atomically, so a chain can never pair
the memory of one capture with the state of another, which two files would allow after a
crash or a careless copy. Memory still stays apart from the state: pages are their own frames
and the state blob never holds memory. The metadata is the first frame, so checking a whole
chain (ids, parents, sequence, versions) reads a few hundred bytes per file, before any
machine is built or any page is applied.

Capture (see ``checkpoint.capture``): a full snapshot re-arms tracking for every page while
paused, copies memory while the guest runs, then pauses once more only to harvest and capture
the pages written meanwhile (written after the live copy, so they win on restore) plus the
machine state. An incremental snapshot pauses to harvest and capture the dirty pages and the
state. Files are written after the guest has resumed. Memory is read only where the slot's
memfd holds data (SEEK_DATA): holes read as zero, and touching them would allocate them.
The writer keeps the per-page fingerprints, updated from captured pages only, off the pause.
With ``verify=True`` it also fingerprints live memory while paused and refuses to write if
the two differ (tracking missed a write).

The writer owns the machine's tracker: nobody else may harvest it between snapshots. Use
:meth:`SnapshotWriter.run` to let the guest run; it harvests into the pending set when a ring
fills (or feed harvests you made yourself to :meth:`SnapshotWriter.note_dirty`).
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np

from ..errors import ConfigError, ProtocolError, SnapshotFormatError, TrackingError
from ..machine.config import MachineConfig
from ..machine.devices import OutputSink
from ..machine.epoch import EpochDriver
from ..machine.memory import GuestMemory, plan_slots
from ..machine.state import MachineState
from ..machine.vm import Machine
from ..tracking import DirtySet
from ..wire import (MIN_KEY_LEN, NEED_DATA, PRIMARY, STANDBY, Connection, ConnectionClosed,
                    EpochBegin, EpochEnd, Goodbye, Hello, HelloAck, MachineBlob, Pages)
from ..machine.checkpoint import PageRun, apply_runs, capture, gather
from ..machine.fingerprint import Fingerprint, fingerprint

PAGE = 4096
FORMAT = "dirtyring-snapshot"
FORMAT_MAJOR, FORMAT_MINOR = 1, 0
SUFFIX = ".snap"
#: Public default key: with it the HMAC is a checksum, not authentication.
FILE_KEY = b"dirtyring snapshot file v1"
#: The Hello frame is read alone to check a chain; anything bigger is not a snapshot header.
MAX_HEADER = 1 << 20
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_END = "end of snapshot"


@dataclass(frozen=True, slots=True, kw_only=True)
class SnapshotInfo:
    """A snapshot's metadata (its Hello frame); writer statistics are 0 when read from a file.

    Example::

        info = w.incremental()
        print(info.path, info.seq, info.kind, info.pages, info.pause_us)
    """

    path: Path
    name: str
    id: bytes
    parent: bytes | None
    parent_file: str | None
    chain: bytes
    seq: int
    kind: str  # "full" | "delta"
    created: float
    pages: int
    config: MachineConfig
    version: str
    file_bytes: int = 0
    pause_us: float = 0.0  # guest paused for the capture (both pauses of a full snapshot)
    write_s: float = 0.0

    def to_meta(self) -> dict[str, Any]:
        return {"id": self.id.hex(), "parent": self.parent.hex() if self.parent else None,
                "parent_file": self.parent_file, "chain": self.chain.hex(), "seq": self.seq,
                "kind": self.kind, "name": self.name, "created": self.created,
                "pages": self.pages}


def _conn(role: Any, key: bytes) -> Connection:
    return Connection(role, key, insecure=len(key) < MIN_KEY_LEN, compress_level=1)


def _hello_config(info: SnapshotInfo) -> bytes:
    return json.dumps({"format": FORMAT, "version": f"{FORMAT_MAJOR}.{FORMAT_MINOR}",
                       "machine": json.loads(info.config.to_json()),
                       "snapshot": info.to_meta()}, sort_keys=True).encode()


def _parse_hello(path: Path, ev: Hello) -> SnapshotInfo:
    """Metadata from a Hello, or SnapshotFormatError naming what is wrong."""
    try:
        doc = json.loads(ev.config)
        fmt, version = doc["format"], str(doc["version"])
    except (ValueError, KeyError, TypeError):
        raise SnapshotFormatError(f"{path.name}: header is not snapshot metadata") from None
    if fmt != FORMAT:
        raise SnapshotFormatError(f"{path.name}: not a snapshot (format {fmt!r})")
    try:
        major, minor = (int(x) for x in version.split("."))
    except ValueError:
        raise SnapshotFormatError(f"{path.name}: bad format version {version!r}") from None
    if major != FORMAT_MAJOR or minor > FORMAT_MINOR or ev.version != major:
        raise SnapshotFormatError(
            f"{path.name}: snapshot format version {version} is not supported (this dirtyring "
            f"reads {FORMAT_MAJOR}.0 to {FORMAT_MAJOR}.{FORMAT_MINOR})")
    try:
        m = doc["snapshot"]
        info = SnapshotInfo(
            path=path, name=str(m["name"]), id=bytes.fromhex(m["id"]),
            parent=bytes.fromhex(m["parent"]) if m["parent"] else None,
            parent_file=m["parent_file"], chain=bytes.fromhex(m["chain"]), seq=int(m["seq"]),
            kind=str(m["kind"]), created=float(m["created"]), pages=int(m["pages"]),
            config=MachineConfig.from_json(json.dumps(doc["machine"]).encode()),
            version=version)
        plan_slots(list(info.config.data_slots))  # memory a machine can have (else ConfigError)
    # OverflowError: an infinite number (JSON allows it); AttributeError: a "machine" that is
    # no JSON object reaches MachineConfig.from_json, which does not catch it.
    except (KeyError, TypeError, ValueError, OverflowError, AttributeError, ConfigError) as e:
        raise SnapshotFormatError(f"{path.name}: snapshot metadata is malformed ({e})") from None
    if info.id != ev.session_id:
        raise SnapshotFormatError(f"{path.name}: metadata id differs from the frame's")
    full = info.seq == 0
    if info.kind not in ("full", "delta") or full != (info.kind == "full") or \
            full != (info.parent is None) or info.seq < 0 or (full and info.chain != info.id):
        raise SnapshotFormatError(f"{path.name}: inconsistent metadata (seq {info.seq}, kind "
                                  f"{info.kind}, parent {m['parent']})")
    return info


def _open(path: Path) -> BinaryIO:
    try:
        return open(path, "rb")
    except OSError as e:
        raise SnapshotFormatError(f"cannot read snapshot {path}: {e.strerror}") from None


def read_info(path: str | Path, *, key: bytes = FILE_KEY) -> SnapshotInfo:
    """Read and check only a snapshot's first frame (its metadata).

    Example::

        info = dirtyring.read_info("snaps/snap-0001.snap")
        print(info.kind, info.seq, info.config.guest)
    """
    path = Path(path)
    conn = Connection(STANDBY, key, insecure=len(key) < MIN_KEY_LEN, max_frame_size=MAX_HEADER)
    with _open(path) as f:
        try:
            while True:
                ev = conn.next_event()
                if ev is NEED_DATA:
                    conn.receive_data(f.read(64 * 1024))
                    continue
                if not isinstance(ev, Hello):
                    raise SnapshotFormatError(f"{path.name}: empty or headless file")
                return _parse_hello(path, ev)
        except ProtocolError as e:
            raise SnapshotFormatError(f"{path.name}: {e}") from None


def resolve_chain(path: str | Path, *, key: bytes = FILE_KEY) -> list[SnapshotInfo]:
    """The chain ending at ``path``, full snapshot first; parents are looked up by file name
    in the same directory. Raises SnapshotFormatError if a link is missing or does not match.

    Example::

        chain = dirtyring.resolve_chain(w.chain[-1].path)
        assert [i.seq for i in chain] == list(range(len(chain)))
    """
    info = read_info(path, key=key)
    chain = [info]
    while info.parent is not None:
        assert info.parent_file is not None
        ppath = info.path.parent / info.parent_file
        if not ppath.exists():
            raise SnapshotFormatError(
                f"broken chain: {info.path.name} (seq {info.seq}) needs its parent "
                f"{info.parent_file} (id {info.parent.hex()[:12]}), which is missing")
        p = read_info(ppath, key=key)
        if p.id != info.parent:
            raise SnapshotFormatError(
                f"broken chain: {ppath.name} is snapshot {p.id.hex()[:12]}, but {info.path.name}"
                f" was taken after {info.parent.hex()[:12]} (parent id mismatch)")
        if p.chain != info.chain or p.config != info.config:
            raise SnapshotFormatError(f"broken chain: {ppath.name} belongs to another chain or "
                                      f"machine than {info.path.name}")
        if p.seq != info.seq - 1:
            raise SnapshotFormatError(f"broken chain: gap between {ppath.name} (seq {p.seq}) "
                                      f"and {info.path.name} (seq {info.seq})")
        chain.append(p)
        info = p
    chain.reverse()
    return chain


def latest(directory: str | Path, *, key: bytes = FILE_KEY) -> Path:
    """The newest snapshot in ``directory`` (by creation time; unreadable files are skipped)."""
    d = Path(directory)
    infos = []
    for p in sorted(d.glob(f"*{SUFFIX}")):
        try:
            infos.append(read_info(p, key=key))
        except SnapshotFormatError:
            continue
    if not infos:
        raise SnapshotFormatError(f"no readable snapshot in {d}")
    return max(infos, key=lambda i: (i.created, i.seq)).path


# --- writing ------------------------------------------------------------------------------------
class SnapshotWriter:
    """Writes a chain of snapshots of ``machine`` into ``directory`` (see the module docstring).

    Args:
        machine: a tracked machine, running or paused; a paused one is left paused.
        directory: created if missing. Existing files are never overwritten.
        key: HMAC key of the files (default: the public :data:`FILE_KEY`).
        verify: also fingerprint live memory while paused and check the chain against it.

    Example::

        w = dirtyring.SnapshotWriter(m, "snaps")
        w.full()                                 # snaps/<name>.snap, seq 0
        for _ in range(3):
            w.run(0.2)                           # let the guest run (and dirty pages)
            w.incremental()
    """

    def __init__(self, machine: Machine, directory: str | Path, *, key: bytes = FILE_KEY,
                 verify: bool = False, fsync: bool = True) -> None:
        if machine.tracker is None:
            raise ConfigError("snapshots need a tracked machine (tracker must not be 'none')")
        assert machine.memory is not None
        self.m = machine
        self.dir = Path(directory)
        self.key = key
        self.verify = verify
        self.fsync = fsync
        self.drv = EpochDriver(machine)
        self.chain: list[SnapshotInfo] = []
        self._pending = DirtySet()
        self._fp = Fingerprint(machine.memory)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create snapshot directory {self.dir}: {e.strerror}") \
                from None

    # --- running the guest between snapshots ---------------------------------------------------
    def note_dirty(self, dirty: DirtySet) -> None:
        """Add pages harvested by someone else; they go into the next incremental snapshot."""
        self._pending = self._pending | dirty

    def run(self, seconds: float) -> str:
        """Let the guest run about ``seconds`` (harvesting into the pending set whenever a ring
        fills). Returns "stopped" if the guest finished or crashed, else "interval". A machine
        that was paused is paused again afterwards."""
        m = self.m
        paused = self._paused()
        end = time.monotonic() + seconds
        why = "interval"
        while (left := end - time.monotonic()) > 0:
            if m.threaded:
                m.resume_all()
                if not m.attention.wait(left):
                    break
                m.pause_all()
                if m.stopped_event.is_set():
                    why = "stopped"
                    break
                self.note_dirty(self.drv.harvest_paused()[0])  # a ring filled: empty it
            else:
                why = m.runners[0].run_inline(left)
                if why == "budget":
                    self.note_dirty(self.drv.harvest_paused()[0])
                elif why == "stopped":
                    break
        if m.threaded:
            (m.pause_all if paused else m.resume_all)()
        return "stopped" if why == "stopped" else "interval"

    def _paused(self) -> bool:
        return self.m.threaded and all(r.pause_requested for r in self.m.runners)

    # --- snapshots -----------------------------------------------------------------------------
    def full(self, name: str | None = None) -> SnapshotInfo:
        """Start a new chain with a full snapshot (see the module docstring for the pauses)."""
        m = self.m
        assert m.memory is not None
        path, name = self._path(name, 0)
        paused = self._paused()
        t0 = time.perf_counter()
        m.pause_all()
        self.drv.tracker.full()  # re-arm every page: what the guest writes next is harvested
        self._pending = DirtySet()
        if not paused:
            m.resume_all()
        pause = time.perf_counter() - t0
        live = gather(m.memory, m.memory.populated())  # the guest runs meanwhile
        self.chain = []
        self._fp = Fingerprint(m.memory)
        info = self._capture(path, name, "full", live, pause, paused)
        self.chain = [info]
        return info

    def incremental(self, name: str | None = None) -> SnapshotInfo:
        """The pages dirtied since the previous snapshot of this chain, plus the state."""
        if not self.chain:
            raise ConfigError("an incremental snapshot needs a full snapshot first")
        path, name = self._path(name, len(self.chain))
        info = self._capture(path, name, "delta", (), 0.0, self._paused())
        self.chain.append(info)
        return info

    def _path(self, name: str | None, seq: int) -> tuple[Path, str]:
        name = name if name is not None else f"snap-{seq:04d}"
        if name.endswith(SUFFIX):
            name = name[:-len(SUFFIX)]
        if not _NAME.fullmatch(name):
            raise ConfigError(f"snapshot name {name!r}: use letters, digits, '.', '_', '-'")
        path = self.dir / (name + SUFFIX)
        if path.exists():
            raise ConfigError(f"snapshot {path} already exists (snapshots are never overwritten)")
        return path, name

    def _capture(self, path: Path, name: str, kind: str, live: tuple[PageRun, ...],
                 pause: float, paused: bool) -> SnapshotInfo:
        m = self.m
        assert m.memory is not None
        seq = len(self.chain) if kind == "delta" else 0
        t0 = time.perf_counter()
        m.pause_all()
        dirty, resync = self.drv.harvest_paused()
        if resync:  # tracking failed and reports every page; holes are zero and stay holes
            dirty = m.memory.populated()
        dirty, self._pending = dirty | self._pending, DirtySet()
        cp = capture(m, dirty, epoch=seq + 1, kind=kind)
        check = fingerprint(m.memory) if self.verify else b""
        if not paused:
            m.resume_all()
        pause += time.perf_counter() - t0
        # The guest runs again from here on; everything below works on copies.
        t1 = time.perf_counter()
        runs: list[tuple[int, np.ndarray, np.ndarray]] = []
        for r in live:  # a full snapshot's live copy: zero pages are left out
            keep = r.data.view(np.uint64).reshape(len(r.pages), -1).any(axis=1)
            if keep.any():
                runs.append((r.slot, r.pages[keep], r.data[keep]))
        runs += [(r.slot, r.pages, r.data) for r in cp.runs]  # after the live copy: they win
        for slot, pages, data in runs:
            self._fp.update(slot, pages, data)
        digest = self._fp.digest()
        if self.verify and check != digest:
            self.chain = []  # the fingerprints are wrong: only a new full snapshot can fix it
            raise TrackingError(f"snapshot {name}: memory rebuilt from tracked pages differs from "
                                "guest memory (tracking missed writes); take a full snapshot")
        parent = self.chain[-1] if kind == "delta" else None
        sid = os.urandom(16)
        info = SnapshotInfo(
            path=path, name=name, id=sid, parent=parent.id if parent else None,
            parent_file=parent.path.name if parent else None,
            chain=parent.chain if parent else sid, seq=seq, kind=kind, created=time.time(),
            pages=sum(len(p) for _, p, _ in runs), config=m.config,
            version=f"{FORMAT_MAJOR}.{FORMAT_MINOR}", pause_us=pause * 1e6)
        try:
            size = _write(path, info, runs, cp.state, digest, self.key, self.fsync)
        except BaseException:
            self.chain = []  # this capture's pages are in no file: only a full snapshot helps
            raise
        return replace(info, file_bytes=size, write_s=time.perf_counter() - t1)


def _write(path: Path, info: SnapshotInfo, runs: list[tuple[int, np.ndarray, np.ndarray]],
           state: bytes, digest: bytes, key: bytes, fsync: bool) -> int:
    """Write the file atomically (temporary name, fsync, rename); returns its size."""
    conn = _conn(PRIMARY, key)
    hello = conn.send(Hello(role="primary", version=FORMAT_MAJOR, session_id=info.id,
                            config=_hello_config(info)))
    # The protocol lets the primary open an epoch only once the standby accepted the Hello;
    # a file has no standby, so a local one accepts it (its answer is not part of the file).
    peer = _conn(STANDBY, key)
    peer.receive_data(hello)
    peer.next_event()
    conn.receive_data(peer.send(HelloAck(session_id=info.id, accepted=True)))
    conn.next_event()
    epoch = info.seq + 1
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(hello)
            f.write(conn.send(EpochBegin(epoch=epoch, kind=info.kind)))
            n = 0
            for slot, pages, data in runs:
                n += len(pages)
                for part in conn.send_parts(Pages(epoch=epoch, slot=slot, page_size=PAGE,
                                                  pages=pages, data=data.tobytes())):
                    f.write(part)
            f.write(conn.send(MachineBlob(epoch=epoch, blob=state)))
            f.write(conn.send(EpochEnd(epoch=epoch, n_pages=n, digest=digest, output_seq=0)))
            f.write(conn.send(Goodbye(reason=_END)))
            f.flush()
            if fsync:
                os.fsync(f.fileno())
            size = f.tell()
        os.replace(tmp, path)
        if fsync:
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"cannot write snapshot {path}: {e.strerror or e}") from None
    return size


# --- reading and restoring --------------------------------------------------------------------
def _apply_file(info: SnapshotInfo, memory: GuestMemory, fp: Fingerprint, key: bytes) -> bytes:
    """Stream one file's pages into ``memory`` and ``fp``; returns the state blob.

    Every frame is checked (crc, HMAC, sequence, protocol order) before its pages are applied,
    and the memory fingerprint after the file's last page against the one recorded at its
    capture; any problem raises SnapshotFormatError. The caller discards ``memory`` on error.
    """
    name = info.path.name
    conn = _conn(STANDBY, key)
    blob: bytes | None = None
    digest: bytes | None = None
    slots = memory.slots
    with _open(info.path) as f:
        try:
            while True:
                ev = conn.next_event()
                if ev is NEED_DATA:
                    conn.receive_data(f.read(1 << 20))
                elif isinstance(ev, Hello):
                    if ev.session_id != info.id:
                        raise SnapshotFormatError(f"{name} changed while it was being read")
                    conn.send(HelloAck(session_id=ev.session_id, accepted=True))
                elif isinstance(ev, EpochBegin):
                    if ev.kind != info.kind or ev.epoch != info.seq + 1:
                        raise SnapshotFormatError(f"{name}: epoch {ev.epoch} ({ev.kind}) does "
                                                  "not match its metadata")
                elif isinstance(ev, Pages):
                    idx = ev.indices
                    if getattr(ev, "delta", False):  # XOR deltas need the receiver's copy
                        raise SnapshotFormatError(f"{name}: delta-encoded pages in a snapshot")
                    if ev.slot >= len(slots) or ev.page_size != PAGE or \
                            int(idx[-1]) >= slots[ev.slot].info.pages:
                        raise SnapshotFormatError(f"{name}: pages outside the machine's memory "
                                                  f"(slot {ev.slot}, page {int(idx[-1])})")
                    apply_runs(memory, [(ev.slot, idx, ev.data)])
                    fp.update(ev.slot, idx, ev.data)
                elif isinstance(ev, MachineBlob):
                    if blob is not None:
                        raise SnapshotFormatError(f"{name}: two machine states")
                    blob = ev.blob
                elif isinstance(ev, EpochEnd):
                    digest = ev.digest
                    if digest != fp.digest():
                        raise SnapshotFormatError(
                            f"{name}: memory rebuilt from the chain up to this file differs "
                            "from the fingerprint recorded at its capture")
                elif isinstance(ev, Goodbye):
                    if ev.reason != _END or blob is None or digest is None:
                        raise SnapshotFormatError(f"{name}: incomplete snapshot")
                elif isinstance(ev, ConnectionClosed):
                    if not ev.clean:
                        raise SnapshotFormatError(f"{name} is truncated: it ends before its "
                                                  "end-of-snapshot marker")
                    assert blob is not None
                    return blob
                else:
                    raise SnapshotFormatError(f"{name}: unexpected {type(ev).__name__} frame")
        except ProtocolError as e:
            raise SnapshotFormatError(f"{name}: {e}") from None


def restore(path: str | Path, *, key: bytes = FILE_KEY, threaded: bool = True,
            sink: OutputSink | None = None,
            progress: Callable[[SnapshotInfo], None] | None = None) -> Machine:
    """A new machine holding exactly the memory and state of the snapshot at ``path`` (a file,
    or a directory: its newest snapshot). The vCPUs are paused; ``resume_all()`` (threaded) or
    ``run_inline`` starts the guest. Tracking is re-armed, so the next harvest reports only
    what the guest writes after the restore.

    The whole chain's metadata is checked first; then the files are applied in order into a
    fresh ``Machine(config, boot=False)``, which is closed and never returned if any frame is
    bad (nothing half-applied). Raises SnapshotFormatError.

    A Linux program's getrandom pool is restored as captured, like all its memory: before
    resuming a copy that must not repeat the original's random bytes, refill it with
    ``m.stdio.refill_entropy()`` (``dirtyring restore`` does).

    Example::

        m2 = dirtyring.restore("snaps")          # the newest snapshot of the directory
        m2.resume_all()                          # the guest goes on from the capture
        m2.close()
    """
    p = Path(path)
    if p.is_dir():
        p = latest(p, key=key)
    chain = resolve_chain(p, key=key)
    m = Machine(chain[-1].config, boot=False, threaded=threaded, sink=sink)
    try:
        assert m.memory is not None
        fp = Fingerprint(m.memory)
        blob = b""
        for info in chain:
            blob = _apply_file(info, m.memory, fp, key)
            if progress is not None:
                progress(info)
        state = MachineState.decode(blob)
        try:
            config = MachineConfig.from_json(state.config)
        except ConfigError as e:
            raise SnapshotFormatError(f"{p.name}: machine state: {e}") from None
        if config != chain[-1].config:
            raise SnapshotFormatError(f"{p.name}: machine state is of another configuration")
        try:
            m.restore_state(state)
        except (ValueError, ConfigError) as e:  # vCPU records of the wrong number or size
            raise SnapshotFormatError(f"{p.name}: machine state does not fit: {e}") from None
        if m.tracker is not None:
            m.tracker.full()
    except BaseException:
        m.close()
        raise
    return m
