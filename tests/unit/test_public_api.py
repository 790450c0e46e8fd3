"""The public API (``import dirtyring``): every name in ``__all__`` exists and has a docstring
with an example, and importing the package is cheap: it opens no /dev/kvm and (once the native
helper builds on first use, issue 14 item 6) compiles nothing."""
from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

import dirtyring

SRC = Path(__file__).resolve().parents[2] / "src"


def test_all_names_exist_and_are_unique() -> None:
    assert len(dirtyring.__all__) == len(set(dirtyring.__all__))
    for name in dirtyring.__all__:
        assert hasattr(dirtyring, name), name


def test_the_api_the_issue_asks_for_is_there() -> None:
    want = {"Machine", "MachineConfig", "Tracker", "RingTracker", "BitmapTracker",
            "HotSetTracker", "DirtySet", "EpochDriver", "Primary", "Standby", "protect",
            "standby", "SnapshotWriter", "restore", "resolve_chain", "Rollback", "migrate",
            "receive", "DirtyringError", "LinkClosed", "MigrationError"}
    assert want <= set(dirtyring.__all__)


def test_every_public_name_has_a_docstring_with_an_example() -> None:
    missing = []
    for name in dirtyring.__all__:
        doc = inspect.getdoc(getattr(dirtyring, name)) or ""
        if "Example::" not in doc and ">>>" not in doc:
            missing.append(name)
    assert not missing, f"no example in the docstring of {missing}"


def test_the_package_has_a_docstring_with_an_example() -> None:
    assert dirtyring.__doc__ and "Example::" in dirtyring.__doc__


def _import_trace(tmp_path: Path) -> list[str]:
    """What ``import dirtyring`` does in a fresh interpreter, traced through audit hooks: whether
    it opens /dev/kvm, and the processes it starts (but ctypes' ``find_library("c")`` in
    the bindings, which runs ``ldconfig -p``). The native helper's cache is empty (a new
    XDG_CACHE_HOME and TMPDIR), as on a host that never ran dirtyring."""
    code = (
        "import sys\n"
        "seen = []\n"
        "def hook(event, args):\n"
        "    if event == 'open' and args and str(args[0]).startswith('/dev/kvm'):\n"
        "        seen.append(f'open {args[0]}')\n"
        "    if event in ('subprocess.Popen', 'os.posix_spawn', 'os.exec') "
        "and not str(args[0]).endswith('ldconfig'):\n"
        "        seen.append(f'{event} {args[0]}')\n"
        "    if event in ('os.system', 'os.fork'):\n"
        "        seen.append(event)\n"
        "sys.addaudithook(hook)\n"
        "import dirtyring\n"
        "for name in dirtyring.__all__: getattr(dirtyring, name)  # every lazy import done\n"
        "print(repr(seen))\n")
    env = dict(os.environ, PYTHONPATH=str(SRC), XDG_CACHE_HOME=str(tmp_path),
               TMPDIR=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    seen: list[str] = eval(r.stdout.strip())  # a list of str, printed by repr
    return seen


def test_import_does_not_open_kvm(tmp_path: Path) -> None:
    opened = [x for x in _import_trace(tmp_path) if x.startswith("open ")]
    assert not opened, f"importing dirtyring opened {opened}"


def test_import_starts_no_process_even_with_a_cold_cache(tmp_path: Path) -> None:
    started = [x for x in _import_trace(tmp_path) if not x.startswith("open ")]
    assert not started, f"importing dirtyring started {started} (gcc: compiled at import)"


def _modules_after(code: str) -> set[str]:
    """The dirtyring modules loaded after running ``code`` in a fresh interpreter."""
    full = (code + "\nimport sys\n"
            "print(' '.join(m for m in sys.modules if m.startswith('dirtyring')))")
    r = subprocess.run([sys.executable, "-c", full], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=str(SRC)))
    assert r.returncode == 0, r.stderr
    return set(r.stdout.split())


def test_the_api_is_imported_on_first_use() -> None:
    """``import dirtyring`` loads nothing else; a name loads its own module only."""
    assert _modules_after("import dirtyring") == {"dirtyring"}
    mods = _modules_after("import dirtyring\ndirtyring.fingerprint")
    assert "dirtyring.machine.fingerprint" in mods
    assert not any(m.startswith(("dirtyring.replication", "dirtyring.migration")) for m in mods)
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        dirtyring.nothing_here  # noqa: B018
    assert set(dirtyring.__all__) <= set(dir(dirtyring))


def test_a_command_imports_only_its_own_module() -> None:
    """``dirtyring run`` builds its parser without importing replication, migration or the
    snapshot files (what it does not use); the full parser still has every command."""
    mods = _modules_after("from dirtyring.cli.main import build_parser\n"
                          "build_parser(bench_commands=False, command='run')")
    assert "dirtyring.cli.run" in mods
    assert not any(m.startswith(("dirtyring.replication", "dirtyring.migration",
                                 "dirtyring.snapshots", "dirtyring.cli.replication"))
                   for m in mods), sorted(mods)
