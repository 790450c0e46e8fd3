"""Every script in examples/ runs as a user would run it (a subprocess on real /dev/kvm), within
a time limit, exits 0 and prints what it promises."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
#: What each example must print on success, besides its exit status 0.
EXPECTED = {
    "rollback_fuzz.py": ["rollbacks in", "rollback_fuzz: OK"],
    "protect_standby.py": ["primary: ", "standby: took over", "protect_standby: OK"],
    "snapshot_chain.py": ["chain of 5 verified", "matches; guest runs", "snapshot_chain: OK"],
    "migrate.py": ["migrated:", "receiver: guest progress", "migrate: OK"],
}
#: Each takes a few seconds; the limit is generous for a loaded CI host.
TIMEOUT = 120


def test_every_example_is_covered() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_runs(name: str) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"),
                                                      env.get("PYTHONPATH")]))
    r = subprocess.run([sys.executable, str(EXAMPLES / name)], capture_output=True, text=True,
                       timeout=TIMEOUT, env=env, cwd=ROOT)
    assert r.returncode == 0, f"{name} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    for want in EXPECTED[name]:
        assert want in r.stdout, f"{name} did not print {want!r}:\n{r.stdout}\n{r.stderr}"
