"""getrandom and /dev/urandom give the host's entropy (a pool in guest memory the VMM refills),
never a sequence a program could predict: two runs differ, no block is handed out twice, and
the bytes look random (about 1 in 256 is zero)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import dirtyring

PROGRAMS = Path(__file__).resolve().parent / "programs"


def _run(prog: Path) -> list[str]:
    out: list[bytes] = []
    res = dirtyring.run_program(dirtyring.LinuxProgram(prog), write=lambda s, d: out.append(d))
    assert res.status == 0 and res.crash is None, (res, out)
    assert res.io_exits >= 128  # a refill per KiB: 128 KiB asked for
    return b"".join(out).decode().splitlines()


def test_random_bytes_come_from_the_host(static_build: Callable[..., Path],
                                         tmp_path: Path) -> None:
    prog = static_build(PROGRAMS / "random.c", tmp_path / "random")
    first, second = _run(prog), _run(prog)
    assert first[0] != second[0]
    for lines in (first, second):
        assert lines[1] == "equal blocks 0", lines
        zeros = int(lines[2].split()[1])
        assert zeros < 2048, lines  # 512 expected; a pool of zeros would give 131072
