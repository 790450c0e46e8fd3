"""Type hints are part of the code: ``mypy -p dirtyring`` must stay clean."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_mypy_finds_no_errors() -> None:
    r = subprocess.run([sys.executable, "-m", "mypy", "-p", "dirtyring"], cwd=ROOT / "src",
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
