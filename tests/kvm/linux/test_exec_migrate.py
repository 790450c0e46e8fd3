"""Live migration of a running Linux program: ``migrate --exec`` moves it mid-run to
``receive``, and what the source printed before the switchover followed by what the target
printed after is exactly a native run's output (no line lost, none twice: unprinted output
travels in the guest's memory), with the native exit status on the target."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dirtyring.cli.child import free_port

HERE = Path(__file__).resolve().parent / "programs"
STEPS = "12000"  # ~2.5 s natively: still running when the switchover comes
RUN_TIMEOUT = 300


@pytest.fixture(scope="module")
def count(tmp_path_factory: pytest.TempPathFactory) -> Path:
    gcc = shutil.which("gcc")
    if not gcc:
        pytest.fail("gcc is missing: ./tools/install-test-deps installs it")
    out = tmp_path_factory.mktemp("count") / "count"
    subprocess.run([gcc, "-static", "-O1", "-o", str(out), str(HERE / "count.c")], check=True)
    return out


def test_migrate_a_running_program(count: Path, tmp_path: Path) -> None:
    native = subprocess.run([str(count), STEPS], capture_output=True, timeout=RUN_TIMEOUT)
    port = free_port()
    cli = [sys.executable, "-m", "dirtyring.cli.main"]
    target = subprocess.Popen([*cli, "receive", "--insecure", "--listen", f"127.0.0.1:{port}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        first = target.stdout.readline() if target.stdout else b""  # it listens from here
        assert first.startswith(b"listening:"), first
        src = subprocess.run([*cli, "migrate", "--insecure", "--to", f"127.0.0.1:{port}",
                              "--warmup", "0.3", "--exec", str(count), "--", STEPS],
                             capture_output=True, timeout=RUN_TIMEOUT)
        assert src.returncode == 0, src.stderr[-2000:]
        out, err = target.communicate(timeout=RUN_TIMEOUT)
    finally:
        if target.poll() is None:
            target.kill()
            target.wait()
    assert target.returncode == native.returncode, err[-2000:]
    # The target's own first line ("listening", printed before it knew the guest) aside,
    # its events go to stderr once it knows the guest is a Linux program.
    assert src.stdout + out == native.stdout
    assert src.stdout and out  # it really moved mid-run
