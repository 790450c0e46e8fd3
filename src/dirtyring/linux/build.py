"""Build the library OS (``guest/*.c``, ``guest/*.S``) into ``guest/bin/libos.bin`` with the
flags every guest program gets (``dirtyring.guests.build``).

``python -m dirtyring.linux.build`` rebuilds it in place; a test rebuilds into a temporary
directory and checks the committed binary matches byte for byte.
"""
from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

from ..errors import GuestError
from ..guests.build import build_flat

SRC = Path(__file__).resolve().parent / "guest"
SOURCES = ("entry.S", "libos.c", "fs.c")
#: The library OS's own memset/memcpy loops must not be turned back into calls to memset.
EXTRA_CFLAGS = ("-fno-tree-loop-distribute-patterns", "-fno-builtin")


def build(outdir: Path) -> Path:
    outdir.mkdir(parents=True, exist_ok=True)
    return build_flat("libos", [SRC / s for s in SOURCES], outdir, EXTRA_CFLAGS)


def load_libos() -> bytes:
    """The library OS's flat image (loaded at layout.CODE_GPA; its syscall entry is there)."""
    try:
        return (resources.files("dirtyring.linux") / "guest" / "bin" / "libos.bin").read_bytes()
    except FileNotFoundError:
        raise GuestError("the library OS binary is missing; build it with "
                         "`python -m dirtyring.linux.build`") from None


def main() -> int:
    out = build(SRC / "bin")
    print(f"built {out} ({out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
