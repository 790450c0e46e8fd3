"""``dirtyring bench fuzz``: a short run of each atheris target finds nothing, and the harness
does report a bug when there is one (a deliberately planted one)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dirtyring.bench import fuzz
from dirtyring.cli.main import build_parser

pytest.importorskip("atheris")  # listed in the test extra; without it there is nothing to run

#: A fixed libFuzzer seed: the same inputs every run, so CI is repeatable.
SEED = "1"


def run(capsys: pytest.CaptureFixture[str], out: Path, *args: str) -> tuple[int, dict]:
    """``dirtyring bench fuzz ... --json`` as the CLI parses it; (exit status, JSON out)."""
    ns = build_parser().parse_args(["bench", "fuzz", "--out", str(out), "--seed", SEED,
                                    "--json", *args])
    rc = ns.func(ns)
    doc = json.loads(capsys.readouterr().out)
    assert doc == json.loads((out / "fuzz.json").read_text())
    return rc, doc


@pytest.mark.parametrize("target", fuzz.TARGETS)
def test_a_short_run_of_each_target_finds_nothing(target: str, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    rc, doc = run(capsys, tmp_path, "--target", target, "--runs", "2000")
    assert doc["findings"] == [], json.dumps(doc["findings"], indent=1)[:4000]
    t = doc["targets"][target]
    assert rc == 0 and t["returncode"] == 0
    assert t["executions"] >= 2000 and t["coverage"] > 0, t
    recs = {r["metric"]: r["value"] for r in doc["records"]}
    assert recs["executions"] >= 2000 and recs["findings"] == 0


def test_a_planted_bug_is_a_finding_and_fails_the_command(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--plant`` breaks the EpochEnd decoder (an IndexError, as a decoder bug would raise);
    both targets decode EpochEnd frames from their seeds on, so each must report it."""
    rc, doc = run(capsys, tmp_path, "--plant", "--runs", "50")
    assert rc == 1
    by_target = {f["target"]: f for f in doc["findings"]}
    assert set(by_target) == set(fuzz.TARGETS), doc["findings"]
    for target, f in by_target.items():
        assert (f["type"], f["kind"]) == ("IndexError", "exception"), f
        assert "planted" in f["message"] and f["where"].startswith("wire/codec.py"), f
        saved = Path(f["input"])
        assert saved.read_bytes() and len(saved.read_bytes()) == f["input_len"]
        # replayed without the planted bug, the same input is handled: nothing to report
        ns = build_parser().parse_args(["bench", "fuzz", "--target", target,
                                        "--replay", str(saved)])
        assert ns.func(ns) == 0
        assert "handled (no finding)" in capsys.readouterr().out


def test_the_seeds_run_through_without_error() -> None:
    """Every seed is a legal session or a valid snapshot: no error at all, so mutations start
    from the deepest paths."""
    for target in fuzz.TARGETS:
        for s in fuzz.seeds(target):
            fuzz.RUNNERS[target](s)


def test_an_exception_outside_the_allowed_errors_is_reported() -> None:
    found: list[dict] = []
    fuzz.one_input("connection", b"\x00" + bytes([fuzz.RAW, 0, 3]) + b"DRW",
                   lambda f, d: found.append(f))
    assert found == []  # a truncated stream: the protocol's own error, not a finding
    real = fuzz.RUNNERS["connection"]
    try:
        fuzz.RUNNERS["connection"] = lambda data: [][1]
        fuzz.one_input("connection", b"x", lambda f, d: found.append(f))
    finally:
        fuzz.RUNNERS["connection"] = real
    assert [f["type"] for f in found] == ["IndexError"]


# --- what the snapshot target found stays fixed ------------------------------------------------
def forged(d: Path, *, meta: dict | None = None, machine: object = None,
           state: bytes | None = None) -> Path:
    """A snapshot file as anyone can write one (its key is public): a valid empty full
    snapshot of a 1 MiB machine, with its metadata, machine config or state replaced."""
    from dirtyring.machine.config import MachineConfig
    from dirtyring.machine.state import MachineState
    from dirtyring.snapshots import files as s
    from dirtyring.machine.fingerprint import Fingerprint
    from dirtyring.wire import EpochBegin, EpochEnd, Goodbye, Hello, MachineBlob
    from dirtyring.wire.codec import encode_body, frame_type_of
    config = MachineConfig(data_slots=(1 << 20,))
    sid = bytes(range(16))
    doc = {"format": s.FORMAT, "version": f"{s.FORMAT_MAJOR}.{s.FORMAT_MINOR}",
           "machine": json.loads(config.to_json()) if machine is None else machine,
           "snapshot": {"id": sid.hex(), "parent": None, "parent_file": None,
                        "chain": sid.hex(), "seq": 0, "kind": "full", "name": "forged",
                        "created": 1.0, "pages": 0, **(meta or {})}}
    if state is None:
        state = MachineState(config=config.to_json(), vcpus=()).encode()
    events = [Hello(role="primary", version=s.FORMAT_MAJOR, session_id=sid,
                    config=json.dumps(doc).encode()),
              EpochBegin(epoch=1, kind="full"), MachineBlob(epoch=1, blob=state),
              EpochEnd(epoch=1, n_pages=0, output_seq=0,
                       digest=Fingerprint(fuzz._memory_for(config)).digest()),
              Goodbye(reason="end of snapshot")]
    path = d / "forged.snap"
    path.write_bytes(b"".join(
        fuzz._frame(frame_type_of(e), i, b"".join(bytes(b) for b in encode_body(e)), s.FILE_KEY)
        for i, e in enumerate(events)))
    return path


@pytest.mark.parametrize("meta,machine", [
    ({"seq": float("inf")}, None),                 # OverflowError once
    ({}, 5),                                       # AttributeError once (not a JSON object)
    ({}, {"data_slots": [1000]}),                 # no machine can have it: ConfigError once
], ids=["infinite-seq", "machine-not-an-object", "impossible-slot"])
def test_a_malformed_snapshot_header_is_a_format_error(tmp_path: Path, meta: dict,
                                                       machine: object) -> None:
    from dirtyring.errors import SnapshotFormatError
    from dirtyring.machine.config import MachineConfig
    from dirtyring.snapshots import files as s
    if isinstance(machine, dict):
        machine = {**json.loads(MachineConfig().to_json()), **machine}
    with pytest.raises(SnapshotFormatError, match="metadata is malformed"):
        s.read_info(forged(tmp_path, meta=meta, machine=machine))


def test_a_snapshot_whose_state_config_is_malformed_is_a_format_error(tmp_path: Path) -> None:
    from dirtyring.errors import SnapshotFormatError
    from dirtyring.machine.state import MachineState
    from dirtyring.snapshots import files as s
    path = forged(tmp_path, state=MachineState(config=b"{not json", vcpus=()).encode())
    with fuzz._without_kvm(), pytest.raises(SnapshotFormatError, match="machine state"):
        s.restore(path, threaded=False)


@pytest.mark.kvm
def test_a_snapshot_whose_vcpu_state_is_cut_short_is_a_format_error(tmp_path: Path) -> None:
    """A real restore (KVM): a vCPU record too short for its kernel struct raised ValueError."""
    from dirtyring.errors import SnapshotFormatError
    from dirtyring.machine.config import MachineConfig
    from dirtyring.machine.state import MachineState, VcpuState
    from dirtyring.snapshots import files as s
    vcpu = VcpuState(index=0, regs=b"", sregs=b"x", fpu=b"", xsave=b"", xcrs=b"", msrs=(),
                     lapic=b"", events=b"", mp_state=0)
    config = MachineConfig(data_slots=(1 << 20,))
    path = forged(tmp_path, state=MachineState(config=config.to_json(), vcpus=(vcpu,)).encode())
    with pytest.raises(SnapshotFormatError, match="machine state does not fit"):
        s.restore(path, threaded=False)
