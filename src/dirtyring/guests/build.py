"""Build the guest programs from their C and assembly sources into flat binaries.

``python -m dirtyring.guests.build`` rebuilds ``bin/*.bin`` in place; the test suite rebuilds
into a temporary directory and checks the committed binaries match byte for byte, so the
committed outputs always come from the committed sources.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ..errors import GuestError

SRC = Path(__file__).resolve().parent
GUESTS = ("dirtier", "compute", "kvstore")
BSS_LIMIT = 0xF0000  # machine/layout.py: .bss from 0x80000, then the vCPU stacks
CFLAGS = ["-O2", "-std=gnu11", "-ffreestanding", "-fno-pic", "-fno-pie", "-nostdlib",
          "-mgeneral-regs-only", "-mno-red-zone", "-fno-stack-protector",
          "-fno-asynchronous-unwind-tables", "-fno-unwind-tables", "-fcf-protection=none",
          "-mcmodel=small", "-Wall", "-Werror", "-fno-ident"]


def _run(cmd: list[str]) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise GuestError(f"cannot build guests: {cmd[0]} not found (install gcc/binutils)") \
            from None
    if p.returncode != 0:
        raise GuestError(f"guest build step failed: {' '.join(cmd)}\n{p.stderr}")
    return p.stdout


def build_one(name: str, outdir: Path) -> Path:
    return build_flat(name, [SRC / "start.S", SRC / f"{name}.c"], outdir)


def build_flat(name: str, sources: list[Path], outdir: Path,
               extra_cflags: tuple[str, ...] = ()) -> Path:
    """Compile and link ``sources`` for the guest layout (code at 0x10000, .bss at 0x80000)
    and keep the flat image ``outdir/<name>.bin``. Also what builds the library OS
    (``dirtyring.linux.build``), so every piece of guest code gets the same flags."""
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        elf = t / f"{name}.elf"
        _run(["gcc", *CFLAGS, *extra_cflags, "-static", "-Wl,--build-id=none", "-Wl,-T",
              str(SRC / "guest.ld"), "-Wl,-z,norelro", "-Wl,-z,noexecstack", "-no-pie",
              "-o", str(elf), *map(str, sources)])
        sections = _run(["objdump", "-h", str(elf)])
        for line in sections.splitlines():
            parts = line.split()
            if len(parts) > 2 and parts[1] == ".data" and int(parts[2], 16) != 0:
                raise GuestError(f"guest {name} has initialised writable data (.data); "
                                 "use const or zero-initialised globals")
            if len(parts) > 3 and parts[1] == ".bss" and \
                    int(parts[3], 16) + int(parts[2], 16) > BSS_LIMIT:
                raise GuestError(f"guest {name}'s .bss ends past {BSS_LIMIT:#x} (the stacks)")
        out = outdir / f"{name}.bin"
        _run(["objcopy", "-O", "binary", "-j", ".text", "-j", ".rodata", str(elf), str(out)])
    return out


def build_all(outdir: Path) -> list[Path]:
    outdir.mkdir(parents=True, exist_ok=True)
    return [build_one(n, outdir) for n in GUESTS]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=SRC / "bin")
    args = ap.parse_args(argv)
    for p in build_all(args.out):
        print(f"built {p} ({os.path.getsize(p)} bytes)")
    return 0


def toolchain_present() -> bool:
    return all(shutil.which(t) for t in ("gcc", "objcopy", "objdump"))


if __name__ == "__main__":
    sys.exit(main())
