"""What KVM tests share: building a static test program with gcc and glibc's libc.a (a missing
compiler is a failure naming what installs it, never a skip)."""
from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

Build = Callable[..., Path]


def build_static(src: Path, out: Path, *libs: str) -> Path:
    """``gcc -static -O1 -o out src libs...``; the test fails with gcc's message if it cannot."""
    gcc = shutil.which("gcc")
    if not gcc:
        pytest.fail("gcc is missing: ./tools/install-test-deps installs it")
    r = subprocess.run([gcc, "-static", "-O1", "-o", str(out), str(src), *libs],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="session")
def static_build() -> Build:
    """``build_static`` for test files (a fixture: conftest modules are not imported by name)."""
    return build_static
