"""Reading a Linux program: an x86-64 ELF executable, static (ET_EXEC) or static-PIE (ET_DYN
without an interpreter), checked before a byte of it goes into guest memory.

Why check everything here: the file is the user's, and the loader turns its numbers into guest
addresses and copy lengths. A truncated download, a 32-bit or ARM build, a dynamic program (it
needs ld.so and shared libraries, not supported yet) or a crafted header must each end in one
clear :class:`~dirtyring.errors.ProgramError` naming the program, never in an IndexError, a
huge allocation or a copy outside the guest.

What a static program needs from its loader (the kernel's ``load_elf_binary``, minus what a
static program does not use): every PT_LOAD segment's file bytes at ``vaddr + bias`` and zeros
up to ``memsz``; the entry point; where the program headers are in memory (AT_PHDR: glibc's
static start-up walks them to find PT_TLS); and PT_GNU_STACK's flags. ``bias`` is 0 for ET_EXEC
and the chosen load address for a static-PIE.

Reading: ``ElfImage.parse(data, name)``; placing: ``image.load(data, write, bias)`` with any
``write(addr, bytes)``, so this module knows nothing of guest memory.
"""
from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import ProgramError

PAGE = 4096

ET_EXEC, ET_DYN = 2, 3
EM_X86_64 = 62
PT_LOAD, PT_DYNAMIC, PT_INTERP, PT_PHDR, PT_TLS = 1, 2, 3, 6, 7
PT_GNU_STACK = 0x6474E551
PF_X, PF_W, PF_R = 1, 2, 4

#: Highest user address of a 4-level x86-64 address space (what a program may be linked at).
USER_TOP = 1 << 47

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")  # Elf64_Ehdr: 64 bytes
_PHDR = struct.Struct("<IIQQQQQQ")  # Elf64_Phdr: 56 bytes


@dataclass(frozen=True, slots=True)
class Segment:
    """One PT_LOAD (or PT_TLS) entry, unrelocated."""

    vaddr: int
    memsz: int
    filesz: int
    offset: int
    flags: int
    align: int

    @property
    def end(self) -> int:
        return self.vaddr + self.memsz

    @property
    def writable(self) -> bool:
        return bool(self.flags & PF_W)

    @property
    def executable(self) -> bool:
        return bool(self.flags & PF_X)


@dataclass(frozen=True, slots=True)
class ElfImage:
    """What the loader needs from a checked static program (addresses unrelocated).

    Example::

        image = ElfImage.parse(Path("hello").read_bytes(), "hello")
        image.load(data, memory.write, bias=0)      # ET_EXEC: bias 0
        entry = image.entry + 0
    """

    name: str
    pie: bool
    entry: int
    segments: tuple[Segment, ...]
    phdr_vaddr: int
    phnum: int
    phentsize: int
    tls: Segment | None
    executable_stack: bool

    @property
    def low(self) -> int:
        """The page the lowest segment starts in."""
        return self.segments[0].vaddr & ~(PAGE - 1)

    @property
    def high(self) -> int:
        """The end of the highest segment, rounded up to a page: where brk starts."""
        return (max(s.end for s in self.segments) + PAGE - 1) & ~(PAGE - 1)

    @classmethod
    def parse(cls, data: bytes | memoryview, name: str) -> ElfImage:
        """Check ``data`` as a static x86-64 program; :class:`ProgramError` on anything else."""
        buf = memoryview(data)

        def bad(why: str) -> ProgramError:
            return ProgramError(f"{name}: {why}")

        if len(buf) < _EHDR.size or bytes(buf[:4]) != b"\x7fELF":
            raise bad("not an ELF executable (no ELF header)")
        (ident, etype, machine, version, entry, phoff, _shoff, _flags, ehsize, phentsize,
         phnum, _shentsize, _shnum, _shstrndx) = _EHDR.unpack_from(buf)
        if ident[4] != 2:
            raise bad("a 32-bit ELF file; only x86-64 (64-bit) programs run")
        if ident[5] != 1:
            raise bad("a big-endian ELF file; only x86-64 programs run")
        if machine != EM_X86_64:
            raise bad(f"built for ELF machine {machine}, not x86-64 ({EM_X86_64})")
        if version != 1 or ident[6] != 1:
            raise bad(f"unknown ELF version {version}")
        if etype not in (ET_EXEC, ET_DYN):
            kinds = {1: "a relocatable object (.o), not a program", 4: "a core dump"}
            raise bad(kinds.get(etype, f"ELF type {etype} is not an executable"))
        if ehsize < _EHDR.size or phentsize != _PHDR.size:
            raise bad(f"unexpected header sizes (ehsize {ehsize}, phentsize {phentsize})")
        if not 0 < phnum < 0xFFFF or phoff + phnum * phentsize > len(buf):
            raise bad("program headers are missing or run past the end of the file "
                      "(truncated?)")
        loads: list[Segment] = []
        tls: Segment | None = None
        phdr_vaddr: int | None = None
        interp: str | None = None
        exec_stack = False
        for i in range(phnum):
            ptype, pflags, off, vaddr, _paddr, filesz, memsz, align = _PHDR.unpack_from(
                buf, phoff + i * phentsize)
            seg = Segment(vaddr, memsz, filesz, off, pflags, align)
            if ptype == PT_LOAD:
                loads.append(_checked_load(seg, len(buf), bad))
            elif ptype == PT_INTERP:
                raw = bytes(buf[off:off + min(filesz, 4096)]) if off < len(buf) else b""
                interp = raw.split(b"\0", 1)[0].decode("utf-8", "replace") or "?"
            elif ptype == PT_PHDR:
                phdr_vaddr = vaddr
            elif ptype == PT_TLS:
                if filesz > memsz or off + filesz > len(buf):
                    raise bad("its TLS segment runs past the end of the file")
                tls = seg
            elif ptype == PT_GNU_STACK:
                exec_stack = bool(pflags & PF_X)
        if interp is not None:
            raise bad(f"a dynamically linked program (it needs {interp} and shared libraries); "
                      "only static programs run so far: link with -static or -static-pie")
        if not loads:
            raise bad("no loadable segment")
        loads.sort(key=lambda s: s.vaddr)
        for a, b in zip(loads, loads[1:]):
            if b.vaddr < a.end:
                raise bad(f"loadable segments overlap ({a.vaddr:#x}+{a.memsz:#x} and "
                          f"{b.vaddr:#x})")
        if etype == ET_EXEC and loads[0].vaddr < PAGE:
            raise bad(f"linked at {loads[0].vaddr:#x}, inside the null page")
        if not any(s.vaddr <= entry < s.end and s.executable for s in loads):
            raise bad(f"its entry point {entry:#x} is not in an executable segment")
        if phdr_vaddr is None:  # no PT_PHDR: the headers are wherever the file's bytes land
            phdr_vaddr = next((s.vaddr + phoff - s.offset for s in loads
                               if s.offset <= phoff and phoff + phnum * phentsize
                               <= s.offset + s.filesz), 0)
        return cls(name=name, pie=etype == ET_DYN, entry=entry, segments=tuple(loads),
                   phdr_vaddr=phdr_vaddr, phnum=phnum, phentsize=phentsize, tls=tls,
                   executable_stack=exec_stack)

    def load(self, data: bytes | memoryview, write: Callable[[int, memoryview], object],
             bias: int = 0) -> None:
        """Copy every segment's file bytes to ``vaddr + bias`` through ``write``. The rest of
        each segment (its .bss) must already read as zero: guest memory starts zeroed."""
        if not self.pie and bias:
            raise ProgramError(f"{self.name}: a non-PIE program loads at its own addresses")
        buf = memoryview(data)
        for s in self.segments:
            if s.filesz:
                write(s.vaddr + bias, buf[s.offset:s.offset + s.filesz])


def _checked_load(seg: Segment, size: int, bad: Callable[[str], ProgramError]) -> Segment:
    """A PT_LOAD whose numbers stay inside the file and a user address space."""
    if seg.filesz > seg.memsz:
        raise bad(f"a segment at {seg.vaddr:#x} has more file bytes than memory")
    if seg.offset + seg.filesz > size:
        raise bad(f"a segment at {seg.vaddr:#x} runs past the end of the file (truncated?)")
    if seg.vaddr + seg.memsz > USER_TOP or seg.memsz == 0 and seg.filesz:
        raise bad(f"a segment at {seg.vaddr:#x} (+{seg.memsz:#x}) is outside a user address "
                  "space")
    if seg.vaddr % PAGE != seg.offset % PAGE:
        raise bad(f"a segment at {seg.vaddr:#x} is not page-congruent with its file offset "
                  f"{seg.offset:#x}")
    return seg
