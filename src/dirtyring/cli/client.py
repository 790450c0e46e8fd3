"""``dirtyring-client``, the warm server's C client (``client.c``): built with the system's gcc
into the user's cache directory, like the machine's C helper (``machine/native.py``), keyed by
its source's hash, so an updated source is rebuilt and two first uses never see half a file.

``client_path()`` is where it is; ``dirtyring serve`` builds it and says where, and
``dirtyring serve --client`` prints only that path (``alias drc="$(dirtyring serve --client)"``).
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

from ..errors import ConfigError
from ..machine.native import cache_dirs

SOURCE = Path(__file__).with_name("client.c")
#: The stable name in each cache's ``bin``: a symbolic link to the current build.
NAME = "dirtyring-client"


def client_path() -> Path:
    """The built client (building it first if its source changed); ConfigError, in words, if
    it cannot be built."""
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src).hexdigest()[:16]
    why = "no cache directory could be written"
    for base in cache_dirs():
        folder = base / "bin"
        built = folder / f"{NAME}-{key}"
        try:
            if not built.exists():
                folder.mkdir(parents=True, exist_ok=True, mode=0o700)
                _build(built)
            _link(folder / NAME, built.name)
        except FileNotFoundError:
            raise ConfigError("cannot build dirtyring-client: gcc not found (install gcc)") \
                from None
        except OSError as e:
            why = f"{folder}: {e.strerror}"
            continue
        return folder / NAME
    raise ConfigError(f"cannot build dirtyring-client: {why}")


def _build(out: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".build-")
    os.close(fd)
    try:
        p = subprocess.run(["gcc", "-O2", "-Wall", "-Werror", "-o", tmp, str(SOURCE)],
                           capture_output=True, text=True, check=False)
        if p.returncode != 0:
            raise ConfigError(f"cannot build dirtyring-client:\n{p.stderr}")
        os.replace(tmp, out)  # atomic: concurrent first uses each build, one wins
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _link(link: Path, target: str) -> None:
    """Point ``link`` at ``target`` (a name in the same folder), atomically."""
    try:
        if os.readlink(link) == target:
            return
    except OSError:
        pass
    tmp = link.with_name(f".{link.name}-{os.getpid()}")
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    os.symlink(target, tmp)
    os.replace(tmp, link)
