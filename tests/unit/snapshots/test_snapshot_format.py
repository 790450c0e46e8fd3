"""Snapshot files without KVM: chains written with the real writer function into memfd-backed
guest memory, read back frame by frame, and every kind of damage refused with a clear error."""
from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path

import numpy as np
import pytest

from dirtyring.errors import SnapshotFormatError
from dirtyring.machine.config import MachineConfig
from dirtyring.machine.memory import GuestMemory, plan_slots
from dirtyring.machine.state import MachineState, VcpuState
from dirtyring.machine import fingerprint as F
from dirtyring.snapshots import files as S
from dirtyring.wire import (NEED_DATA, PRIMARY, STANDBY, Connection, ConnectionClosed, Goodbye,
                            Hello, HelloAck)

MiB = 1 << 20
PAGE = 4096
CFG = MachineConfig(data_slots=(1 * MiB,))


def blob(seq: int) -> bytes:
    v = VcpuState(index=0, regs=bytes([seq]) * 144, sregs=b"s" * 312, fpu=b"", xsave=b"x" * 64,
                  xcrs=b"", msrs=((0x10, seq),), lapic=b"", events=b"e" * 64, mp_state=0)
    return MachineState(config=CFG.to_json(), vcpus=(v,)).encode()


class Chain:
    """A chain of snapshots of a memory image that changes between them (no machine needed)."""

    def __init__(self, directory: Path, n: int = 3, *, key: bytes = S.FILE_KEY,
                 seed: int = 1) -> None:
        self.dir = directory
        self.mem = GuestMemory(plan_slots(list(CFG.data_slots)))
        self.fp = F.Fingerprint(self.mem)
        self.rng = np.random.default_rng(seed)
        self.infos: list[S.SnapshotInfo] = []
        self.images: list[list[np.ndarray]] = []
        for seq in range(n):
            self.add(key=key)

    def add(self, *, key: bytes = S.FILE_KEY, digest: bytes | None = None) -> S.SnapshotInfo:
        seq = len(self.infos)
        runs = []
        for s in self.mem.slots:
            npages = s.info.pages
            k = 40 if seq == 0 else 8
            pages = np.unique(self.rng.integers(0, npages, k)).astype(np.int64)
            data = self.rng.integers(0, 256, (len(pages), PAGE), dtype=np.uint8)
            data[::5] = 0  # zero pages must travel too (as ZERO runs)
            s.view.reshape(-1, PAGE)[pages] = data
            runs.append((s.info.slot, pages, data))
            self.fp.update(s.info.slot, pages, data)
        parent = self.infos[-1] if self.infos else None
        sid = os.urandom(16)
        info = S.SnapshotInfo(
            path=self.dir / f"s{seq}.snap", name=f"s{seq}", id=sid,
            parent=parent.id if parent else None,
            parent_file=parent.path.name if parent else None,
            chain=parent.chain if parent else sid, seq=seq, kind="delta" if parent else "full",
            created=time.time() + seq, pages=sum(len(p) for _, p, _ in runs), config=CFG,
            version="1.0")
        S._write(info.path, info, runs, blob(seq), digest or self.fp.digest(), key, False)
        self.infos.append(info)
        self.images.append([s.view.copy() for s in self.mem.slots])
        return info

    def close(self) -> None:
        self.mem.close()


@pytest.fixture
def chain(tmp_path: Path):  # type: ignore[no-untyped-def]
    c = Chain(tmp_path)
    yield c
    c.close()


def load(path: Path, key: bytes = S.FILE_KEY) -> tuple[list[np.ndarray], bytes]:
    """What restore() does, minus the machine: check the chain, apply it to fresh memory."""
    infos = S.resolve_chain(path, key=key)
    mem = GuestMemory(plan_slots(list(infos[-1].config.data_slots)))
    try:
        fp = F.Fingerprint(mem)
        b = b""
        for info in infos:
            b = S._apply_file(info, mem, fp, key)
        assert F.fingerprint(mem) == fp.digest()
        return [s.view.copy() for s in mem.slots], b
    finally:
        mem.close()


def frames(path: Path) -> list[tuple[int, int]]:
    """(offset, length) of every frame of a file, from the headers."""
    data = path.read_bytes()
    out, off = [], 0
    while off < len(data):
        (length,) = struct.unpack_from("!I", data, off + 8)
        n = 24 + length + 32
        out.append((off, n))
        off += n
    assert off == len(data)
    return out


def rewrite(src: Path, dst: Path, edit) -> None:  # type: ignore[no-untyped-def]
    """Re-encode a snapshot with its Hello metadata changed by ``edit(doc)`` (valid frames)."""
    rd = Connection(STANDBY, S.FILE_KEY)
    rd.receive_data(src.read_bytes())
    rd.receive_data(b"")
    wr = Connection(PRIMARY, S.FILE_KEY)
    peer = Connection(STANDBY, S.FILE_KEY)
    out = bytearray()
    while True:
        ev = rd.next_event()
        assert ev is not NEED_DATA
        if isinstance(ev, ConnectionClosed):
            break
        if isinstance(ev, Hello):
            rd.send(HelloAck(session_id=ev.session_id, accepted=True))
            doc = json.loads(ev.config)
            version = edit(doc)
            ev = Hello(role="primary", version=version or ev.version, session_id=ev.session_id,
                       config=json.dumps(doc).encode())
            b = wr.send(ev)
            peer.receive_data(b)
            peer.next_event()
            wr.receive_data(peer.send(HelloAck(session_id=ev.session_id, accepted=True)))
            wr.next_event()
            out += b
            continue
        out += wr.send(ev)
    dst.write_bytes(bytes(out))


# --- round trip -------------------------------------------------------------------------------------
def test_every_snapshot_of_a_chain_restores_its_image(chain: Chain) -> None:
    for k, info in enumerate(chain.infos):
        got, b = load(info.path)
        for a, want in zip(got, chain.images[k]):
            assert np.array_equal(a, want), f"s{k}"
        assert MachineState.decode(b).vcpus[0].regs == bytes([k]) * 144


def test_metadata_and_chain_resolution(chain: Chain) -> None:
    infos = S.resolve_chain(chain.infos[2].path)
    assert [i.name for i in infos] == ["s0", "s1", "s2"]
    assert [i.seq for i in infos] == [0, 1, 2]
    assert [i.kind for i in infos] == ["full", "delta", "delta"]
    assert infos[0].parent is None and infos[0].chain == infos[0].id
    assert infos[1].parent == infos[0].id and infos[2].parent == infos[1].id
    assert {i.chain for i in infos} == {infos[0].id}
    assert all(i.config == CFG and i.version == "1.0" for i in infos)
    assert infos[2].pages == chain.infos[2].pages
    assert S.latest(chain.dir) == chain.infos[2].path


def test_file_is_a_wire_stream_ending_in_goodbye(chain: Chain) -> None:
    data = chain.infos[1].path.read_bytes()
    assert data[:4] == b"DRW1"
    rd = Connection(STANDBY, S.FILE_KEY)
    rd.receive_data(data)
    rd.receive_data(b"")
    kinds = []
    while not isinstance(ev := rd.next_event(), ConnectionClosed):
        kinds.append(type(ev).__name__)
        if isinstance(ev, Hello):
            rd.send(HelloAck(session_id=ev.session_id, accepted=True))
    assert kinds[:2] == ["Hello", "EpochBegin"] and kinds[-3:] == ["MachineBlob", "EpochEnd",
                                                                  "Goodbye"]
    assert set(kinds[2:-3]) == {"Pages"}
    assert ev.clean


def test_own_key(tmp_path: Path) -> None:
    key = b"k" * 32
    c = Chain(tmp_path, 2, key=key)
    try:
        load(c.infos[1].path, key=key)
        with pytest.raises(SnapshotFormatError, match="authentication failed"):
            load(c.infos[1].path)
    finally:
        c.close()


# --- damage -------------------------------------------------------------------------------------------
def test_truncation_anywhere_is_refused(chain: Chain, tmp_path: Path) -> None:
    src = chain.infos[2].path
    data = src.read_bytes()
    fr = frames(src)
    cuts = {0, 1, 4, 23, 24, len(data) - 1} | {o for o, _ in fr[1:]} | {o + 30 for o, _ in fr}
    assert fr[-1][0] in cuts  # exactly before the Goodbye: frames intact, end marker missing
    for cut in sorted(cuts):
        src.write_bytes(data[:cut])
        with pytest.raises(SnapshotFormatError) as e:
            load(src)
        if cut == fr[-1][0]:
            assert "truncated" in str(e.value)


def test_flipped_bytes_are_refused(chain: Chain) -> None:
    src = chain.infos[1].path
    data = src.read_bytes()
    rng = np.random.default_rng(5)
    offsets = set(rng.integers(0, len(data), 150).tolist())
    for o, n in frames(src):  # every header field and MAC of every frame
        offsets |= {o, o + 5, o + 7, o + 9, o + 15, o + 21, o + n - 1}
    for off in sorted(offsets):
        bad = bytearray(data)
        bad[off] ^= 0x20
        src.write_bytes(bytes(bad))
        with pytest.raises(SnapshotFormatError):
            load(src)
    src.write_bytes(data)
    load(src)


def test_trailing_bytes_are_refused(chain: Chain) -> None:
    src = chain.infos[0].path
    data = src.read_bytes()
    for extra in (b"\0", b"DRW1", data[:100]):
        src.write_bytes(data + extra)
        with pytest.raises(SnapshotFormatError):
            load(src)


def test_wrong_magic_and_wire_version(chain: Chain) -> None:
    src = chain.infos[0].path
    data = src.read_bytes()
    src.write_bytes(b"XXXX" + data[4:])
    with pytest.raises(SnapshotFormatError, match="bad magic"):
        S.read_info(src)
    src.write_bytes(data[:4] + struct.pack("!H", 2) + data[6:])
    with pytest.raises(SnapshotFormatError, match="unsupported wire version 2"):
        S.read_info(src)
    src.write_bytes(b"")
    with pytest.raises(SnapshotFormatError, match="empty"):
        S.read_info(src)


@pytest.mark.parametrize("version,hello_version,ok", [
    ("1.0", None, True), ("2.0", 2, False), ("1.1", None, False), ("0.9", 0, False),
    ("1.0", 2, False), ("one", None, False)])
def test_format_version_rule(chain: Chain, tmp_path: Path, version: str,
                             hello_version: int | None, ok: bool) -> None:
    dst = tmp_path / "v.snap"

    def edit(doc: dict) -> int | None:  # type: ignore[type-arg]
        doc["version"] = version
        return hello_version

    rewrite(chain.infos[0].path, dst, edit)
    if ok:
        assert S.read_info(dst).version == "1.0"
    else:
        with pytest.raises(SnapshotFormatError, match="version"):
            S.read_info(dst)


def test_not_a_snapshot_stream(tmp_path: Path) -> None:
    c = Connection(PRIMARY, S.FILE_KEY)
    p = tmp_path / "x.snap"
    p.write_bytes(c.send(Hello(role="primary", version=1, session_id=bytes(16),
                               config=b'{"mem_mib": 64}')))
    with pytest.raises(SnapshotFormatError, match="not snapshot metadata"):
        S.read_info(p)
    with pytest.raises(SnapshotFormatError, match="cannot read"):
        S.read_info(tmp_path / "missing.snap")


def test_missing_parent_is_a_broken_chain(chain: Chain) -> None:
    chain.infos[1].path.unlink()
    with pytest.raises(SnapshotFormatError, match="broken chain.*s1.snap.*missing"):
        load(chain.infos[2].path)
    load(chain.infos[0].path)  # the rest of the chain is still good


def test_parent_from_another_chain_is_refused(chain: Chain, tmp_path: Path) -> None:
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    other = Chain(other_dir, 3, seed=9)
    try:
        os.replace(other.infos[1].path, chain.infos[1].path)
        with pytest.raises(SnapshotFormatError, match="parent id mismatch"):
            load(chain.infos[2].path)
    finally:
        other.close()


def test_gap_in_sequence_is_refused(chain: Chain, tmp_path: Path) -> None:
    def edit(doc: dict) -> None:  # type: ignore[type-arg]
        doc["snapshot"]["seq"] = 5

    tmp = tmp_path / "forged.snap"
    rewrite(chain.infos[1].path, tmp, edit)
    os.replace(tmp, chain.infos[1].path)
    with pytest.raises(SnapshotFormatError, match="gap"):
        load(chain.infos[2].path)


@pytest.mark.parametrize("field,value", [("kind", "full"), ("parent", None), ("id", "00" * 16)])
def test_inconsistent_metadata_is_refused(chain: Chain, tmp_path: Path, field: str,
                                          value: object) -> None:
    def edit(doc: dict) -> None:  # type: ignore[type-arg]
        doc["snapshot"][field] = value

    dst = tmp_path / "bad.snap"
    rewrite(chain.infos[1].path, dst, edit)
    with pytest.raises(SnapshotFormatError):
        S.read_info(dst)


def test_fingerprint_mismatch_is_refused(chain: Chain) -> None:
    chain.add(digest=bytes(16))
    with pytest.raises(SnapshotFormatError, match="differs from the fingerprint"):
        load(chain.infos[3].path)
    load(chain.infos[2].path)


def test_pages_outside_memory_are_refused(chain: Chain, tmp_path: Path) -> None:
    small = MachineConfig(data_slots=(512 * 1024,))

    def edit(doc: dict) -> None:  # type: ignore[type-arg]
        doc["machine"]["data_slots"] = list(small.data_slots)

    dst = tmp_path / "small.snap"
    rewrite(chain.infos[0].path, dst, edit)
    info = S.read_info(dst)
    mem = GuestMemory(plan_slots(list(small.data_slots)))
    try:
        with pytest.raises(SnapshotFormatError, match="outside the machine's memory"):
            S._apply_file(info, mem, F.Fingerprint(mem), S.FILE_KEY)
    finally:
        mem.close()


def test_goodbye_is_the_only_end(tmp_path: Path) -> None:
    """A file that says goodbye before its epoch is complete is refused."""
    c = Chain(tmp_path, 1)
    try:
        src = c.infos[0].path
        fr = frames(src)
        data = src.read_bytes()
        wr = Connection(PRIMARY, S.FILE_KEY)
        rd = Connection(STANDBY, S.FILE_KEY)
        rd.receive_data(data[:fr[0][1]])
        hello = rd.next_event()
        assert isinstance(hello, Hello)
        hb = wr.send(hello)
        rd2 = Connection(STANDBY, S.FILE_KEY)
        rd2.receive_data(hb)
        rd2.next_event()
        wr.receive_data(rd2.send(HelloAck(session_id=hello.session_id, accepted=True)))
        wr.next_event()
        src.write_bytes(hb + wr.send(Goodbye(reason="end of snapshot")))
        with pytest.raises(SnapshotFormatError, match="incomplete"):
            load(src)
    finally:
        c.close()


# --- fingerprint ------------------------------------------------------------------------------------
def test_fingerprint_reads_only_populated_pages() -> None:
    mem = GuestMemory(plan_slots([1 * MiB]))
    try:
        empty = F.fingerprint(mem)
        assert empty == F.Fingerprint(mem).digest()
        assert all(len(s.populated_pages()) == 0 for s in mem.slots)
        v = mem.slots[1].view.reshape(-1, PAGE)
        v[[3, 4, 200]] = 7
        assert mem.slots[1].populated_pages().tolist() == [3, 4, 200]
        fp = F.Fingerprint(mem)
        fp.update(1, np.array([3, 4, 200]), v[[3, 4, 200]])
        assert F.fingerprint(mem) == fp.digest() != empty
        v[4] = 0  # populated but zero: hashes like a hole
        fp.update(1, np.array([4]), v[4:5])
        assert F.fingerprint(mem) == fp.digest()
        fp.update(1, np.array([4]), np.ones((1, PAGE), np.uint8))
        assert F.fingerprint(mem) != fp.digest()
    finally:
        mem.close()
