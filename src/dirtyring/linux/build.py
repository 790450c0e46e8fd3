"""Build the library OS (``guest/*.c``, ``guest/*.S``) into ``guest/bin/libos.bin`` with the
flags every guest program gets (``dirtyring.guests.build``).

``python -m dirtyring.linux.build`` rebuilds it in place; a test rebuilds into a temporary
directory and checks the committed binary matches byte for byte.
"""
from __future__ import annotations

import subprocess
import sys
from importlib import resources
from pathlib import Path

from ..errors import GuestError
from ..guests.build import build_flat

SRC = Path(__file__).resolve().parent / "guest"
SOURCES = ("entry.S", "libos.c", "fs.c", "proc.c")
#: The library OS's own memset/memcpy loops must not be turned back into calls to memset.
EXTRA_CFLAGS = ("-fno-tree-loop-distribute-patterns", "-fno-builtin")


#: The vDSO: a small shared object glibc finds through AT_SYSINFO_EHDR, so clock_gettime,
#: gettimeofday, time and getcpu run without a `syscall` (~22 us each on this host's kvm_pvm).
#: Linked as one read-only PT_LOAD from address 0 (vdso-layout.lds): the file is copied as is.
VDSO_FLAGS = ["-O2", "-std=gnu11", "-fPIC", "-shared", "-nostdlib", "-ffreestanding",
              "-fno-stack-protector", "-fno-asynchronous-unwind-tables", "-fcf-protection=none",
              "-mgeneral-regs-only", "-Wall", "-Werror", "-fno-ident",
              "-Wl,-soname=linux-vdso.so.1", "-Wl,--hash-style=both",
              "-Wl,-z,max-page-size=4096", "-Wl,--build-id=none", "-Wl,-z,noexecstack"]


def build(outdir: Path) -> Path:
    outdir.mkdir(parents=True, exist_ok=True)
    build_vdso(outdir)
    return build_flat("libos", [SRC / s for s in SOURCES], outdir, EXTRA_CFLAGS)


def build_vdso(outdir: Path) -> Path:
    out = outdir / "vdso.so"
    try:
        p = subprocess.run(["gcc", *VDSO_FLAGS, f"-I{SRC}",
                            f"-Wl,--version-script={SRC / 'vdso.lds'}",
                            f"-Wl,-T,{SRC / 'vdso-layout.lds'}", "-o", str(out),
                            str(SRC / "vdso.c")], capture_output=True, text=True)
    except FileNotFoundError:
        raise GuestError("cannot build the vDSO: gcc not found") from None
    if p.returncode != 0:
        raise GuestError(f"vDSO build failed:\n{p.stderr}")
    return out


def load_vdso() -> bytes:
    """The vDSO's ELF image (copied as is to layout's VDSO address)."""
    try:
        return (resources.files("dirtyring.linux") / "guest" / "bin" / "vdso.so").read_bytes()
    except FileNotFoundError:
        raise GuestError("the vDSO is missing; build it with `python -m dirtyring.linux.build`") \
            from None


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
