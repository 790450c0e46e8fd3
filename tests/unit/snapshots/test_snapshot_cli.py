"""``dirtyring snapshot`` / ``restore`` argument handling, and errors that need no KVM."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from dirtyring.cli import snapshot as cli
from dirtyring.cli.options import resolve_memory
from dirtyring.errors import ConfigError, SnapshotFormatError


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    cli.add_parsers(p.add_subparsers(dest="command"))
    args = p.parse_args(list(argv))
    resolve_memory(args)  # as main does: --memory's default depends on the guest
    return args


def test_seconds_accepts_bare_seconds_and_units() -> None:
    assert cli.seconds("0.2") == 0.2
    assert cli.seconds("1") == 1.0
    assert cli.seconds("200ms") == pytest.approx(0.2)
    assert cli.seconds("1.5s") == 1.5
    for bad in ("-1", "soon", "5 minutes"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli.seconds(bad)


def test_defaults() -> None:
    a = parse("snapshot", "out")
    assert (a.guest, a.tracker, a.seconds, a.every, a.memory) == ("compute", "ring", 1.0, 0.2,
                                                                  64 << 20)
    assert a.dir == Path("out") and a.func is cli.snapshot_command
    assert parse("snapshot", "out", "--exec", "prog").memory == 1 << 30  # an address space
    r = parse("restore", "out/snap-0001.snap", "--seconds", "0.5")
    assert r.seconds == 0.5 and r.func is cli.restore_command


def test_key_file(tmp_path: Path) -> None:
    k = tmp_path / "key"
    k.write_bytes(b"0123456789abcdef0123\n")
    assert cli._key(parse("restore", "x", "--key-file", str(k))) == b"0123456789abcdef0123"
    k.write_bytes(b"short")
    with pytest.raises(ConfigError, match="at least 16"):
        cli._key(parse("restore", "x", "--key-file", str(k)))
    with pytest.raises(ConfigError, match="cannot read key file"):
        cli._key(parse("restore", "x", "--key-file", str(tmp_path / "nope")))


def test_restore_errors_before_any_machine(tmp_path: Path) -> None:
    a = parse("restore", str(tmp_path / "missing.snap"))
    with pytest.raises(SnapshotFormatError, match="cannot read snapshot"):
        a.func(a)
    a = parse("restore", str(tmp_path))
    with pytest.raises(SnapshotFormatError, match="no readable snapshot"):
        a.func(a)
    a = parse("snapshot", str(tmp_path), "--every", "0")
    with pytest.raises(ConfigError, match="--every"):
        a.func(a)
