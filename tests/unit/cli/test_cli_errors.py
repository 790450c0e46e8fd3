"""A user's mistake ends as one clear line on stderr and a non-zero exit, never a traceback."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

HAVE_KVM = os.path.exists("/dev/kvm")


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "dirtyring.cli.main", *args], capture_output=True,
                          text=True, env=e, timeout=timeout)


def one_clear_line(p: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert p.returncode != 0
    assert "Traceback" not in p.stderr, p.stderr
    err = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(err) == 1, p.stderr
    for n in needles:
        assert n in err[0], err[0]


def test_no_kvm_device() -> None:
    p = run("run", "--seconds", "1", env={"DIRTYRING_KVM_DEVICE": "/nonexistent/kvm"})
    one_clear_line(p, "dirtyring: error:", "/nonexistent/kvm does not exist")


def test_device_that_is_not_kvm() -> None:
    p = run("doctor", "--no-selftest", env={"DIRTYRING_KVM_DEVICE": "/dev/null"})
    one_clear_line(p, "not a KVM device")


def test_no_permission(tmp_path) -> None:  # type: ignore[no-untyped-def]
    if os.geteuid() == 0:
        # root opens anything; check the message through the library instead
        from unittest import mock

        from dirtyring._bindings import Kvm
        from dirtyring.errors import KvmUnavailable
        with mock.patch("os.open", side_effect=PermissionError(13, "denied")):
            with pytest.raises(KvmUnavailable, match="no permission.*kvm"):
                Kvm("/dev/kvm")
        return
    dev = tmp_path / "kvm"
    dev.write_text("")
    dev.chmod(0)
    p = run("doctor", env={"DIRTYRING_KVM_DEVICE": str(dev)})
    one_clear_line(p, "no permission")


@pytest.mark.kvm
def test_ring_size_the_kernel_refuses() -> None:
    p = run("run", "--seconds", "1", "--ring-entries", "3000")
    one_clear_line(p, "power of two")
    p = run("run", "--seconds", "1", "--ring-entries", str(1 << 20))
    one_clear_line(p, "larger than this host allows")


def test_bad_values_are_argparse_errors() -> None:
    for args in (["run", "--memory", "12x"], ["run", "--interval", "soon"],
                 ["run", "--guest", "nosuchguest"], ["protect", "dirtier", "--standby", "nohost"]):
        p = run(*args)
        assert p.returncode != 0 and "Traceback" not in p.stderr, (args, p.stderr)


def test_missing_key_for_replication() -> None:
    env = {k: v for k, v in os.environ.items() if k != "DIRTYRING_KEY"}
    p = subprocess.run([sys.executable, "-m", "dirtyring.cli.main", "standby", "--listen",
                        "127.0.0.1:1"], capture_output=True, text=True, env=env, timeout=60)
    one_clear_line(p, "no shared key")


def test_bad_standby_address_is_one_line() -> None:
    p = run("protect", "dirtier", "--standby", "127.0.0.1:1", "--seconds", "1",
            env={"DIRTYRING_KEY": "00" * 32})
    if HAVE_KVM:
        one_clear_line(p, "cannot connect")
    else:
        one_clear_line(p, "does not exist")
