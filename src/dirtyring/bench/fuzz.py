"""``dirtyring bench fuzz``: coverage-guided fuzzing of the code that reads hostile bytes.

Two readers take bytes from outside: a :class:`~dirtyring.wire.Connection` (from a peer: an
authenticated one, but a buggy or compromised peer has the key), and the snapshot reader
(``snapshots.files.restore``: its default HMAC key is public, so anyone can forge a file that
passes every check of the frames). Each may raise only its own error, ``ProtocolError`` for
the connection and ``SnapshotFormatError`` for a snapshot; any other exception, a failed
check of what they return, a hang (libFuzzer ``-timeout``) or a memory blow-up
(``-rss_limit_mb``) is a *finding*.

Targets
-------
``connection``: a Connection fed frames with a known key, as a standby (the primary's stream;
the harness answers the Hello, with or without a session nonce) or as a primary (the standby's
stream; the harness sends the Hello and, once accepted, three epochs for Acks to name). Every
event that comes out must be valid: its constructor's checks pass on its values (the decoder
builds Pages and Checkpoint without them), it re-encodes to a frame that decodes to an equal
event, and one frame never expands to more than ``max_frame_size`` bytes of pages. An error
must be sticky, and ``frame_ready()`` must never promise a frame that is not there.

``snapshot``: ``restore()`` of a file, with the KVM machine replaced by guest memory alone
(:class:`_FileMachine`): the header, chain, frames, pages, fingerprint, state blob and its
configuration are all read as they are for a real restore. A valid full snapshot sits beside
the file, so a fuzzed increment can name it as its parent.

Input format
------------
CRC and MAC stop random bytes at the first check, so an input is a *script*: one flag byte,
then records ``kind u8 | length u16 | body``. Kind 255 is raw bytes, appended as they are; any
other kind is a frame of that type around the body, given the right sequence number, CRC and
MAC by the harness. Seeds are real sessions and snapshot files turned into scripts.

How it runs
-----------
atheris (libFuzzer) owns the process (``atheris.Fuzz()`` never returns), so each target runs
in a subprocess (:func:`worker`), one after the other. Only the modules under test are
instrumented for coverage. Findings are written as JSON lines by the worker as they happen
(each distinct one once, with its input saved) and collected by the command, which writes
``DIR/fuzz.json`` and exits 1 if there is any. ``--replay FILE --target T`` runs a saved input
again in-process, with its traceback. A long run: ``dirtyring bench fuzz --seconds 600``.
"""
from __future__ import annotations

import argparse
import atexit
import dataclasses
import gc
import hashlib
import json
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..cli.options import positive_int
from ..errors import ConfigError, DirtyringError, ProtocolError, RemoteProtocolError, \
    SnapshotFormatError
from .records import Record, json_lines, write_json

BENCH = "fuzz"
TARGETS = ("connection", "snapshot")
#: The connection target's shared key (known to the harness, as to any peer).
KEY = b"dirtyring fuzz key: 32 bytes ..."
SESSION = bytes(range(16))
NONCE = bytes(range(16, 32))
#: The connection target's max_frame_size: small, so one input runs in microseconds.
MAX_FRAME = 1 << 20
RAW = 255
_REC = struct.Struct("!BH")
DEFAULT_SECONDS = 60
#: libFuzzer's per-input time limit: an input that takes longer is a hang (a finding).
INPUT_TIMEOUT_S = 30
RSS_LIMIT_MB = 2048
#: Modules whose code is instrumented for coverage feedback.
INSTRUMENTED = ("dirtyring.wire", "dirtyring.snapshots.files", "dirtyring.machine.state",
                "dirtyring.machine.config")
_MAX_FINDINGS = 50


# --- scripts ----------------------------------------------------------------------------------
def records(data: bytes) -> tuple[int, list[tuple[int, bytes]]]:
    """An input's flag byte and its records (a record cut short takes what is left)."""
    if not data:
        return 0, []
    out, off = [], 1
    while off + _REC.size <= len(data):
        kind, n = _REC.unpack_from(data, off)
        off += _REC.size
        out.append((kind, data[off:off + n]))
        off += n
    return data[0], out


def script(flags: int, stream: bytes) -> bytes:
    """The script that makes the harness send ``stream`` (whole frames) again."""
    from ..wire.codec import HEADER, HEADER_LEN, MAC_LEN
    out, off = bytearray([flags]), 0
    while off < len(stream):
        _, _, ftype, length, _, _ = HEADER.unpack_from(stream, off)
        body = stream[off + HEADER_LEN:off + HEADER_LEN + length]
        if length > 0xFFFF:
            raise ValueError("a seed frame's body is too big for a script record")
        out += _REC.pack(ftype, length) + body
        off += HEADER_LEN + length + MAC_LEN
    return bytes(out)


def _frame(kind: int, seq: int, body: bytes, key: bytes) -> bytes:
    from ..wire.codec import frame_parts
    return b"".join(frame_parts(kind, seq, [body], key))


# --- checks on what comes out -----------------------------------------------------------------
def check_event(event: Any) -> None:
    """Raise AssertionError unless ``event`` is a valid wire event (see the module docstring)."""
    from ..errors import LocalProtocolError
    from ..wire import Checkpoint, ConnectionClosed, Pages
    from ..wire.codec import _TYPE_OF, encode_event, read_frame
    from ..wire.receivebuffer import ReceiveBuffer
    if isinstance(event, ConnectionClosed):
        return
    assert type(event) in _TYPE_OF, f"not a wire event: {event!r}"
    try:
        pages = event.pages if isinstance(event, Checkpoint) else \
            (event,) if isinstance(event, Pages) else ()
        for p in pages:  # built by the decoder without the constructor's checks
            Pages(epoch=p.epoch, slot=p.slot, page_size=p.page_size, pages=p.indices,
                  data=p.data, delta=p.delta)
        if not isinstance(event, Pages):
            dataclasses.replace(event)  # runs __post_init__'s checks on the decoded values
        buf = ReceiveBuffer()
        buf.append(b"".join(encode_event(event, 0, KEY)))
        again = read_frame(buf, KEY, expected_seq=0)
    except LocalProtocolError as e:
        raise AssertionError(f"decoded {type(event).__name__} is invalid: {e}") from None
    assert again is not None and again.event == event, f"{event!r} does not round-trip"


# --- the connection target --------------------------------------------------------------------
def _epochs() -> list[Any]:
    from ..wire import EpochBegin, EpochEnd
    return [e for n in (1, 2, 3) for e in (EpochBegin(epoch=n, kind="full" if n == 1 else "delta"),
                                           EpochEnd(epoch=n, n_pages=0, output_seq=n))]


def run_connection(data: bytes) -> None:
    """Feed one script to a Connection; raises ProtocolError (allowed) or a finding."""
    from ..wire import (ERROR, NEED_DATA, PRIMARY, PROTOCOL_VERSION, STANDBY, Connection,
                        ConnectionClosed, Hello, HelloAck)
    from ..wire.connection import session_key
    flags, recs = records(data)
    role = PRIMARY if flags & 1 else STANDBY
    nonce = NONCE if flags & 2 else b""
    step = (flags >> 4) or 1 << 30  # feed in pieces of this many bytes (0: whole)
    conn = Connection(role, KEY, max_frame_size=MAX_FRAME)
    key, seq = KEY, 0

    def send(event: Any) -> None:
        try:
            conn.send(event)
        except ProtocolError as e:  # the harness only sends what is legal: a finding
            raise AssertionError(f"the harness's {type(event).__name__} was refused: {e}") \
                from None

    if role is PRIMARY:
        send(Hello(role="primary", version=PROTOCOL_VERSION, session_id=SESSION, config=b"{}"))

    def drain() -> bool:
        """Pull every event; False once the stream ended. Errors are checked to stick."""
        nonlocal key
        while True:
            raw_in = conn.statistics().page_bytes_raw_in
            ready = conn.frame_ready()
            try:
                ev = conn.next_event()
            except RemoteProtocolError:
                assert conn.our_state is ERROR and conn.error, "error without ERROR state"
                try:
                    conn.next_event()
                except RemoteProtocolError:
                    raise
                raise AssertionError("a connection in ERROR returned an event") from None
            if ev is NEED_DATA:
                assert not ready, "frame_ready() said a frame was buffered, then NEED_DATA"
                return True
            check_event(ev)
            grew = conn.statistics().page_bytes_raw_in - raw_in
            assert grew <= MAX_FRAME, f"one frame expanded to {grew} bytes of pages"
            if isinstance(ev, ConnectionClosed):
                return False
            if isinstance(ev, Hello) and conn.our_state.value == "HANDSHAKE":
                send(HelloAck(session_id=ev.session_id, accepted=True, nonce=nonce))
                if nonce:
                    key = session_key(KEY, ev.session_id, nonce)
            elif isinstance(ev, HelloAck) and ev.accepted and role is PRIMARY:
                if ev.nonce:
                    key = session_key(KEY, SESSION, ev.nonce)
                for e in _epochs():
                    send(e)

    for kind, body in recs:
        if kind == RAW:
            piece = body
        else:
            piece, seq = _frame(kind, seq, body, key), seq + 1
        for i in range(0, len(piece), step):
            conn.receive_data(piece[i:i + step])
            if not drain():
                return
    conn.receive_data(b"")
    if drain():
        raise AssertionError("NEED_DATA after EOF")


# --- the snapshot target ----------------------------------------------------------------------
_MEMORIES: dict[tuple[int, ...], Any] = {}
#: Fuzzed configurations may ask for any memory: slots are capped (their number and size) so
#: a run stays small. Pages beyond a capped slot read as "outside the machine's memory".
_SLOT_CAP, _SLOTS_CAP = 4 << 20, 4


def _memory_for(config: Any) -> Any:
    from ..machine.memory import GuestMemory, plan_slots
    plan_slots(list(config.data_slots))  # what Machine() refuses, this refuses too
    sizes = tuple(min(s, _SLOT_CAP) for s in config.data_slots[:_SLOTS_CAP])
    mem = _MEMORIES.get(sizes)
    if mem is None:
        if len(_MEMORIES) >= 8:
            for old in _MEMORIES.values():
                old.close()
            _MEMORIES.clear()
        mem = _MEMORIES[sizes] = GuestMemory(plan_slots(list(sizes)))
    return mem


class _FileMachine:
    """Stands in for ``Machine`` in ``snapshot.restore``: guest memory and no vCPUs, so the
    reader runs without KVM. Loading vCPU state (``Machine.restore_state``) is not covered."""

    def __init__(self, config: Any, *, boot: bool = True, threaded: bool = True,
                 sink: Any = None) -> None:
        self.config = config
        self.memory = _memory_for(config)
        self.tracker = None

    def restore_state(self, state: Any) -> None:
        pass

    def close(self) -> None:
        pass  # the memory is cached for the next input


@contextmanager
def _without_kvm() -> Iterator[None]:
    from ..snapshots import files as snapshot
    real = snapshot.Machine
    snapshot.Machine = _FileMachine  # type: ignore[misc,assignment]
    try:
        yield
    finally:
        snapshot.Machine = real  # type: ignore[misc]


_DIR: Path | None = None


def _snapshot_dir() -> Path:
    """A directory holding ``base.snap`` (a valid full snapshot) for fuzzed files to extend
    (a temporary one unless the worker chose one: libFuzzer's exit skips Python's atexit)."""
    if _DIR is None:
        d = Path(tempfile.mkdtemp(prefix="dirtyring-fuzz-"))
        atexit.register(shutil.rmtree, d, True)
        _use_dir(d)
    assert _DIR is not None
    return _DIR


def _use_dir(d: Path) -> None:
    global _DIR
    d.mkdir(parents=True, exist_ok=True)
    (d / "base.snap").write_bytes(_snapshot_file(d, "base", None))
    _DIR = d


def _snapshot_file(d: Path, name: str, parent: Any) -> bytes:
    """A valid snapshot file's bytes: pages of every kind and an empty machine state; a full
    snapshot, or an increment of ``parent`` (then the fingerprint covers both)."""
    import numpy as np
    from ..machine.config import MachineConfig
    from ..machine.state import MachineState
    from ..snapshots import files as s
    from ..machine.fingerprint import Fingerprint
    config = parent.config if parent else MachineConfig(data_slots=(1 << 20,), vcpus=1)
    fp = Fingerprint(_memory_for(config))
    if parent is not None:
        fp.update(1, np.array(_BASE_PAGES), _snapshot_pages(parent.name, len(_BASE_PAGES)))
    pages = np.array(_BASE_PAGES if parent is None else [1, 2], np.int64)
    data = np.frombuffer(_snapshot_pages(name, len(pages)), np.uint8).reshape(len(pages), -1)
    fp.update(1, pages, data)
    sid = hashlib.sha256(b"id " + name.encode()).digest()[:16]
    info = s.SnapshotInfo(
        path=d / f"{name}.snap", name=name, id=sid, parent=parent.id if parent else None,
        parent_file=parent.path.name if parent else None,
        chain=parent.chain if parent else sid, seq=parent.seq + 1 if parent else 0,
        kind="delta" if parent else "full", created=1.0, pages=len(pages), config=config,
        version=f"{s.FORMAT_MAJOR}.{s.FORMAT_MINOR}")
    state = MachineState(config=config.to_json(), vcpus=()).encode()
    tmp = d / f".{name}.tmp"
    s._write(tmp, info, [(1, pages, data)], state, fp.digest(), s.FILE_KEY, False)
    out = tmp.read_bytes()
    tmp.unlink()
    return out


_BASE_PAGES = [0, 1, 5, 9]


def _snapshot_pages(name: str, n: int) -> bytes:
    """``n`` pages: random-looking, sparse, compressible, zero."""
    page = 4096
    out = bytearray(4 * page)
    out[:page] = hashlib.sha256(name.encode()).digest() * (page // 32)
    out[page + 64:page + 72] = b"\x07" * 8
    out[2 * page:3 * page] = b"A" * page
    return bytes(out[:n * page])


def run_snapshot(data: bytes) -> None:
    """Restore the file one script describes; raises SnapshotFormatError (allowed) or a finding."""
    from ..snapshots import files as s
    d = _snapshot_dir()
    _, recs = records(data)
    out, seq = bytearray(), 0
    for kind, body in recs:
        if kind == RAW:
            out += body
        else:
            out += _frame(kind, seq, body, s.FILE_KEY)
            seq += 1
    path = d / "fuzz.snap"
    path.write_bytes(out)
    with _without_kvm():
        s.restore(path, threaded=False)


# --- seeds ------------------------------------------------------------------------------------
def seeds(target: str) -> list[bytes]:
    """Scripts of valid inputs the fuzzer starts from."""
    if target == "snapshot":
        from ..snapshots import files as s
        d = _snapshot_dir()
        base = s.read_info(d / "base.snap")
        return [script(0, (d / "base.snap").read_bytes()),
                script(0, _snapshot_file(d, "delta", base))]
    return [script(flags, stream) for flags, stream in _sessions()]


def _sessions() -> list[tuple[int, bytes]]:
    """(flags, the peer's byte stream) of legal sessions: both roles, batched or not."""
    import numpy as np
    from ..wire import (Ack, Checkpoint, Connection, EpochBegin, EpochEnd, Failover, Goodbye,
                        Heartbeat, Hello, HelloAck, MachineBlob, Pages, PROTOCOL_VERSION, Resync)
    data = bytearray(6 * 512)
    data[:512] = bytes(range(256)) * 2                     # raw
    data[1024 + 8:1024 + 16] = b"\x05" * 8                  # sparse
    data[1536:2560] = b"Z" * 1024                           # compressible; the rest zero

    def pages(epoch: int, delta: bool = False) -> Pages:
        return Pages(epoch=epoch, slot=1, page_size=512, pages=np.array([0, 1, 2, 7, 8, 9]),
                     data=bytes(data), delta=delta)

    out = []
    for batched in (False, True):
        for nonce in (b"", NONCE):
            p, sb = Connection("primary", KEY), Connection("standby", KEY)
            stream = p.send(Hello(role="primary", version=PROTOCOL_VERSION, session_id=SESSION,
                                  config=b'{"mem": 1}'))
            sb.receive_data(stream)
            sb.next_event()
            p.receive_data(sb.send(HelloAck(session_id=SESSION, accepted=True, nonce=nonce)))
            p.next_event()
            epoch1 = [EpochBegin(epoch=1, kind="full"), pages(1), Heartbeat(seq=1, sent_ns=5),
                      MachineBlob(epoch=1, blob=b"cpu"),
                      EpochEnd(epoch=1, n_pages=6, digest=b"d" * 16, output_seq=3)]
            rest = [Checkpoint(epoch=2, kind="delta", pages=(pages(2, True), pages(2)),
                               blob=b"state", digest=b"", output_seq=4),
                    Failover(reason="switch over")]
            if batched:
                stream += b"".join(p.send_batch(epoch1)) + b"".join(p.send_batch(rest))
            else:
                stream += b"".join(p.send(e) for e in epoch1 + rest)
            out.append((2 if nonce else 0, bytes(stream)))
            # the standby's side of the same session, for a primary-role receiver
            s2, p2 = Connection("standby", KEY), Connection("primary", KEY)
            s2.receive_data(p2.send(Hello(role="primary", version=PROTOCOL_VERSION,
                                          session_id=SESSION, config=b"{}")))
            s2.next_event()
            back = s2.send(HelloAck(session_id=SESSION, accepted=True, nonce=nonce))
            p2.receive_data(back)
            p2.next_event()
            for e in _epochs():
                s2.receive_data(p2.send(e))
                s2.next_event()
            tail = [Ack(epoch=1), Heartbeat(seq=1, sent_ns=9), Resync(epoch=1, reason="digest"),
                    Ack(epoch=3), Goodbye(reason="bye")]
            back += b"".join(s2.send_batch(tail)) if batched else \
                b"".join(s2.send(e) for e in tail)
            out.append((1 | (2 if nonce else 0), back))
    out.append((0x30, out[0][1]))  # fed in 3-byte pieces
    return out


# --- the worker (one target, in its own process) ----------------------------------------------
RUNNERS: dict[str, Callable[[bytes], None]] = {"connection": run_connection,
                                                "snapshot": run_snapshot}
ALLOWED: dict[str, tuple[type[BaseException], ...]] = {"connection": (ProtocolError,),
                                                       "snapshot": (SnapshotFormatError,)}


def _where(tb: Any) -> str:
    """The innermost frame of a traceback in dirtyring code (or the innermost of all)."""
    frames = traceback.extract_tb(tb)
    ours = [f for f in frames if "/dirtyring/" in f.filename and "/bench/" not in f.filename]
    f = (ours or frames)[-1]
    return f"{f.filename.split('/dirtyring/')[-1]}:{f.lineno} in {f.name}"


def one_input(target: str, data: bytes, report: Callable[[dict[str, Any], bytes], None]) -> None:
    """Run one input; report a finding (a dict) for anything but the target's own errors."""
    try:
        RUNNERS[target](data)
    except ALLOWED[target]:
        pass
    except Exception as e:  # noqa: BLE001 - every other exception is what we look for
        report({"target": target, "kind": "exception", "type": type(e).__name__,
                "message": str(e)[:500], "where": _where(e.__traceback__),
                "traceback": traceback.format_exc()[-4000:]}, data)


def _plant() -> None:
    """A deliberate bug (``--plant``): the EpochEnd decoder fails with IndexError, as a
    decoder bug would. Proves that the harness reports one."""
    from ..wire import codec

    def broken(body: Any, _: int) -> Any:
        raise IndexError("planted bug in the EpochEnd decoder")
    codec._DECODERS[codec.FrameType.EPOCH_END] = broken


def _instrument() -> int:
    import atheris  # type: ignore[import-untyped]
    n = 0
    for obj in gc.get_objects():
        mod = getattr(obj, "__module__", None)
        if (isinstance(mod, str) and mod.startswith(INSTRUMENTED)
                and type(obj).__name__ == "function"):
            try:
                atheris.instrument_func(obj)
                n += 1
            except Exception:  # noqa: BLE001 - a function atheris cannot patch stays as it is
                pass
    return n


def worker(argv: list[str]) -> int:
    """``TARGET FINDINGS_FILE PLANT [libFuzzer args...]``: fuzz one target in this process."""
    import atheris
    target, findings_path, plant = argv[0], Path(argv[1]), argv[2] == "1"
    import dirtyring.machine.config  # noqa: F401 - loaded before instrumenting
    import dirtyring.machine.state  # noqa: F401
    import dirtyring.snapshots.files  # noqa: F401
    import dirtyring.wire  # noqa: F401
    if plant:
        _plant()
    _use_dir(findings_path.parent / "files")
    n = _instrument()
    print(f"fuzz worker: {target}: {n} functions instrumented", file=sys.stderr, flush=True)
    seen: set[tuple[str, str, str]] = set()

    def report(finding: dict[str, Any], data: bytes) -> None:
        key = (finding["type"], finding["where"], re.sub(r"[0-9]+", "N", finding["message"])[:60])
        if key in seen or len(seen) >= _MAX_FINDINGS:
            return
        seen.add(key)
        sha = hashlib.sha1(data).hexdigest()
        crash = findings_path.parent / f"finding-{target}-{sha[:16]}.bin"
        crash.write_bytes(data)
        finding.update(input=str(crash), input_sha1=sha, input_len=len(data))
        with open(findings_path, "a") as f:
            f.write(json.dumps(finding) + "\n")
        print(f"fuzz worker: FINDING {finding['type']} at {finding['where']}: "
              f"{finding['message'][:200]}", file=sys.stderr, flush=True)

    def test_one(data: bytes) -> None:
        one_input(target, data, report)

    atheris.Setup([sys.argv[0], *argv[3:]], test_one)
    atheris.Fuzz()
    return 0


# --- the command ------------------------------------------------------------------------------
_STATS = re.compile(r"^stat::(\w+):\s+(\d+)", re.M)
_DONE = re.compile(r"Done (\d+) runs in (\d+) second")
_COV = re.compile(r"cov: (\d+) ft: (\d+) corp: (\d+)")
_ARTIFACT = re.compile(r"Test unit written to (\S+)")


def run_target(target: str, work: Path, *, seconds: int | None, runs: int | None,
               seed: int = 0, plant: bool = False, corpus: Path | None = None
               ) -> dict[str, Any]:
    """Fuzz ``target`` in a subprocess for ``seconds`` and/or ``runs`` (``seed`` 0: libFuzzer
    picks one); returns its summary (executions, seconds, coverage, findings)."""
    work.mkdir(parents=True, exist_ok=True)
    seed_dir = work / "seeds"
    seed_dir.mkdir(exist_ok=True)
    for i, s in enumerate(seeds(target)):
        (seed_dir / f"seed-{i:02d}").write_bytes(s)
    corpus = corpus or work / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    findings_path = work / "findings.jsonl"
    findings_path.unlink(missing_ok=True)
    args = [f"-runs={runs if runs else -1}", f"-max_total_time={seconds or 0}",
            f"-seed={seed}", f"-timeout={INPUT_TIMEOUT_S}", f"-rss_limit_mb={RSS_LIMIT_MB}", "-print_final_stats=1",
            f"-artifact_prefix={work}/", str(corpus), str(seed_dir)]
    cmd = [sys.executable, "-c", "import sys; from dirtyring.bench.fuzz import worker; "
           "sys.exit(worker(sys.argv[1:]))", target, str(findings_path), "1" if plant else "0",
           *args]
    log = work / "libfuzzer.log"
    t0 = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              timeout=None if not seconds else seconds * 2 + 600)
    elapsed = time.monotonic() - t0
    text = log.read_text(errors="replace")
    stats = {k: int(v) for k, v in _STATS.findall(text)}
    findings = [json.loads(line) for line in findings_path.read_text().splitlines()] \
        if findings_path.exists() else []
    if proc.returncode != 0 and not findings or _ARTIFACT.search(text):
        findings.append({"target": target, "kind": "libfuzzer", "type": "crash",
                         "message": f"libFuzzer exited with {proc.returncode}",
                         "where": ", ".join(_ARTIFACT.findall(text)) or "-",
                         "traceback": "\n".join(text.splitlines()[-40:])})
    cov = _COV.findall(text)
    done = _DONE.search(text)
    return {"target": target, "executions": stats.get("number_of_executed_units",
                                                      int(done.group(1)) if done else 0),
            "seconds": round(elapsed, 1), "exec_per_s": stats.get("average_exec_per_sec", 0),
            "coverage": int(cov[-1][0]) if cov else 0, "features": int(cov[-1][1]) if cov else 0,
            "corpus": int(cov[-1][2]) if cov else 0, "new_units": stats.get("new_units_added", 0),
            "peak_rss_mb": stats.get("peak_rss_mb", 0), "returncode": proc.returncode,
            "findings": findings, "log": str(log)}


def add_parser(sub: Any) -> None:
    """Add ``fuzz`` to the ``dirtyring bench`` subparsers."""
    p = sub.add_parser(
        "fuzz", help="coverage-guided fuzzing (atheris) of the wire Connection and the "
                     "snapshot reader; exits 1 on any finding",
        description="Fuzz the receiving side of a wire Connection (known key) and the snapshot "
                    "file reader with atheris, one target after the other. Anything but the "
                    "reader's own error (a crash, an invalid decoded event, a hang, a memory "
                    "blow-up) is a finding: reported in DIR/fuzz.json, exit status 1.")
    p.add_argument("--target", choices=(*TARGETS, "all"), default="all",
                   help="what to fuzz (default all: each target in turn)")
    p.add_argument("--seconds", type=positive_int, default=None, metavar="N",
                   help=f"seconds per target (default {DEFAULT_SECONDS} unless --runs is given)")
    p.add_argument("--runs", type=positive_int, default=None, metavar="N",
                   help="executions per target (with --seconds, whichever ends first; "
                        "default: no limit)")
    p.add_argument("--seed", type=int, default=0, metavar="N",
                   help="libFuzzer's random seed, for a run that can be repeated (default 0: "
                        "a new one each run)")
    p.add_argument("--out", type=Path, default=Path("results"), metavar="DIR",
                   help="directory for fuzz.json and fuzz/<target>/ (corpus, findings, log; "
                        "default ./results)")
    p.add_argument("--json", action="store_true",
                   help="print the JSON document on stdout instead of the table")
    p.add_argument("--replay", type=Path, default=None, metavar="FILE",
                   help="run one saved input (a finding's) of --target and show what it raises "
                        "(default: fuzz instead)")
    p.add_argument("--plant", action="store_true",
                   help="break the EpochEnd decoder on purpose, to check that the harness "
                        "reports it (self-test)")
    p.set_defaults(func=command)


def replay(target: str, path: Path) -> int:
    """Run one input in this process, as the fuzzer did; 1 (and the traceback) on a finding."""
    data = Path(path).read_bytes()
    found: list[dict[str, Any]] = []
    one_input(target, data, lambda f, _: found.append(f))
    for f in found:
        print(f["traceback"], file=sys.stderr)
    print(f"{target}: {path}: " + (f"FINDING {found[0]['type']} at {found[0]['where']}"
                                   if found else "handled (no finding)"))
    return 1 if found else 0


def command(args: argparse.Namespace) -> int:
    """``dirtyring bench fuzz``."""
    try:
        return _command(args)
    except (DirtyringError, OSError, subprocess.SubprocessError) as e:
        print(f"dirtyring bench fuzz: error: {e}", file=sys.stderr)
        return 1


def _command(args: argparse.Namespace) -> int:
    try:
        import atheris  # noqa: F401
    except ImportError:
        raise ConfigError("atheris is not installed (pip install -e '.[test]')") from None
    targets = TARGETS if args.target == "all" else (args.target,)
    if args.replay is not None:
        if len(targets) != 1:
            raise ConfigError("--replay needs --target connection or --target snapshot")
        return replay(targets[0], args.replay)
    seconds = args.seconds or (None if args.runs else DEFAULT_SECONDS)
    out = Path(args.out)
    err = sys.stderr
    results = []
    for t in targets:
        print(f"fuzz: {t}: " + " or ".join(x for x in (
            f"{seconds} s" if seconds else "", f"{args.runs} runs" if args.runs else "") if x),
            file=err, flush=True)
        r = run_target(t, out / "fuzz" / t, seconds=seconds, runs=args.runs, seed=args.seed,
                       plant=args.plant)
        print(f"fuzz: {t}: {r['executions']} executions in {r['seconds']} s, coverage "
              f"{r['coverage']}, corpus {r['corpus']}, {len(r['findings'])} finding(s)",
              file=err, flush=True)
        results.append(r)
    recs = []
    for r in results:
        for metric, value, unit in (
                ("executions", r["executions"], "runs"), ("elapsed", r["seconds"], "s"),
                ("exec_rate", r["exec_per_s"], "runs/s"), ("coverage", r["coverage"], "edges"),
                ("findings", len(r["findings"]), "findings")):
            recs.append(Record.make(BENCH, metric, value, unit, target=r["target"]))
    findings = [f for r in results for f in r["findings"]]
    path = write_json(out / "fuzz.json", BENCH, recs, settings={
        "targets": list(targets), "seconds": seconds, "runs": args.runs, "seed": args.seed,
        "max_frame_size": MAX_FRAME, "input_timeout_s": INPUT_TIMEOUT_S,
        "rss_limit_mb": RSS_LIMIT_MB, "planted": bool(args.plant)},
        extra={"targets": {r["target"]: {k: v for k, v in r.items() if k != "findings"}
                           for r in results}, "findings": findings})
    if args.json:
        print(path.read_text(), end="", flush=True)
    else:
        print(json_lines(recs), flush=True)
        for f in findings:
            print(f"FINDING [{f['target']}] {f['type']} at {f['where']}: {f['message'][:300]}"
                  + (f"\n  input: {f['input']}" if "input" in f else ""), flush=True)
    print(f"fuzz: wrote {path}", file=err)
    return 1 if findings else 0
