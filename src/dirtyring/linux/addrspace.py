"""A Linux program's address space: where its image, heap, mmap area and stack live, in guest
virtual memory and in the guest-physical pages behind them.

Why pre-mapped, and with 2 MiB pages: the library OS serves brk and mmap inside the guest at
CPL3, where it cannot load CR3 or flush the TLB, and on our hosts (kvm_pvm, shadow paging) every
page-table write the guest makes costs an exit. So the VMM maps, once, before the program starts,
a few large regions backed by one sparse data slot: pages no one touched are holes of the memfd
and cost nothing, and brk/mmap/munmap become bookkeeping in guest memory that every checkpoint
captures with the pages themselves. mprotect is recorded, not enforced (one address space, as
in any unikernel).

Virtual layout (``plan``)::

    [0, 4 MiB)                 the system area (identity mapped: GDT, TSS, page tables, the
                               library OS, queues); programs must not be linked here. Only its
                               first 2 MiB are mapped, so [2 MiB, 4 MiB) can take a trampoline
                               region.
    trampolines                2 MiB just below the image: the library OS writes a trampoline
                               there for each ``syscall`` site it rewrites (libos.c), so a
                               rel32 jump from anywhere in the image reaches it
    image + heap               the program's segments at their link addresses (ET_EXEC) or at
                               PIE_BASE (static-PIE), then brk's heap, in one region
    [FS_BASE, FS_BASE + fs)              the library OS's file system (blocks, the archives)
    [MMAP_TOP - mmap, MMAP_TOP)          anonymous mmap, handed out top-down
    [STACK_TOP - stack, STACK_TOP)       the main thread's stack

The VMM keeps this plan itself and translates through it (``translate``): it never walks page
tables the guest could have scribbled on.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, ProgramError
from ..machine import layout as L
from .elf import ElfImage

HUGE = 2 << 20
SYSTEM_END = 4 << 20
TRAMP_SIZE = HUGE
#: The lowest address a trampoline region may take: the system area maps only its first 2 MiB.
TRAMP_LOW = 2 << 20
PIE_BASE = 0x5555_5540_0000  # 2 MiB-aligned, where Linux puts a PIE without randomisation
FS_BASE = 0x6000_0000_0000
MMAP_TOP = 0x7F00_0000_0000
STACK_TOP = 0x7FFE_0000_0000
DEFAULT_STACK = 8 << 20  # RLIMIT_STACK's usual soft limit
USER_TOP = 1 << 47


def _up(n: int, a: int = HUGE) -> int:
    return (n + a - 1) & ~(a - 1)


def _down(n: int, a: int = HUGE) -> int:
    return n & ~(a - 1)


@dataclass(frozen=True, slots=True)
class Region:
    """``size`` bytes of virtual memory from ``va`` backed by the data slot from ``offset``
    (both 2 MiB-aligned)."""

    name: str
    va: int
    size: int
    offset: int

    @property
    def end(self) -> int:
        return self.va + self.size


@dataclass(frozen=True, slots=True)
class AddressSpace:
    """The plan of one program's memory. ``data_bytes`` is the data slot it needs."""

    regions: tuple[Region, ...]
    bias: int
    brk_start: int
    stack_top: int

    @property
    def data_bytes(self) -> int:
        return sum(r.size for r in self.regions)

    def region(self, name: str) -> Region:
        return next(r for r in self.regions if r.name == name)

    def find(self, name: str) -> Region | None:
        """The region called ``name``, or None if this plan has none (``tramp`` for an image
        too big for a rel32 jump to reach from its start to its end)."""
        return next((r for r in self.regions if r.name == name), None)

    def translate(self, va: int, n: int) -> list[tuple[int, int]]:
        """The data-slot (offset, length) pieces behind ``[va, va + n)``. A range outside
        every region raises ProgramError: the caller (a loader, or a VMM check of a pointer
        the guest gave) must never touch memory the plan does not map."""
        out: list[tuple[int, int]] = []
        end = va + n
        if n < 0 or va < 0 or end > USER_TOP:
            raise ProgramError(f"address range {va:#x}+{n:#x} is outside a user address space")
        while va < end:
            r = next((r for r in self.regions if r.va <= va < r.end), None)
            if r is None:
                raise ProgramError(f"address {va:#x} is not mapped")
            take = min(end, r.end) - va
            out.append((r.offset + va - r.va, take))
            va += take
        return out

    def leaves(self) -> list[tuple[int, int]]:
        """Every 2 MiB mapping, (virtual address, data-slot offset), in address order."""
        return [(r.va + i, r.offset + i) for r in self.regions for i in range(0, r.size, HUGE)]

    def install(self, q: np.ndarray, data_gpa: int, tables_gpa: int, tables_end: int) -> None:
        """Write this plan's mappings into the page tables rooted at ``layout.PML4_GPA`` of
        the system slot ``q`` (its uint64 view), taking new PDPT/PD pages from
        ``[tables_gpa, tables_end)``. Entries already present (the system area's) are never
        overwritten: a clash is a bug in the plan and raises."""
        free = tables_gpa
        flags = L.P | L.RW | L.US | L.A

        def table(entry_index: int) -> int:
            nonlocal free
            e = int(q[entry_index])
            if e & L.P:
                if e & L.PS:
                    raise ConfigError(f"page-table entry {entry_index * 8:#x} is a leaf")
                return (e & 0x000F_FFFF_FFFF_F000) // 8
            if free + L.PAGE > tables_end:
                raise ConfigError("no room left for the program's page tables")
            q[free // 8:(free + L.PAGE) // 8] = 0
            q[entry_index] = free | flags
            free += L.PAGE
            return (free - L.PAGE) // 8

        # Vectorised over the leaves (257 for a 512 MiB program: a Python loop over them took
        # ~320 us of a ~1.3 ms boot here, ~40 us this way). Tables are still found or made one
        # by one, for each distinct (PML4, PDPT) index pair in the order the leaves first need
        # it, so new table pages are taken in the same order as leaf by leaf; leaves only go
        # into PD pages, which no table lookup reads, so writing them all afterwards is the same.
        leaves = self.leaves()
        if not leaves:
            return
        va = np.fromiter((v for v, _ in leaves), np.int64, len(leaves))
        off = np.fromiter((o for _, o in leaves), np.int64, len(leaves))
        i4, i3, i2 = va >> 39 & 511, va >> 30 & 511, va >> 21 & 511
        pair = i4 * 512 + i3
        pds: dict[int, int] = {}
        for key in dict.fromkeys(pair.tolist()):
            pdpt = table(L.PML4_GPA // 8 + (key >> 9))
            pds[key] = table(pdpt + (key & 511))
        slots = np.fromiter((pds[k] for k in pair.tolist()), np.int64, len(leaves)) + i2
        taken = (q[slots] & np.uint64(L.P)) != 0
        order = np.argsort(slots, kind="stable")  # a slot twice: the later leaf clashes
        again = np.zeros(len(slots), bool)
        again[order[1:]] = slots[order[1:]] == slots[order[:-1]]
        clash = np.flatnonzero(taken | again)
        if len(clash):
            raise ConfigError(f"{int(va[clash[0]]):#x} is already mapped")
        q[slots] = (np.uint64(data_gpa) + off.astype(np.uint64)) | np.uint64(flags | L.D | L.PS)


def plan(image: ElfImage, *, memory: int, stack: int = DEFAULT_STACK,
         fs: int = 0) -> AddressSpace:
    """Lay out ``image`` with ``memory`` bytes for image + heap + mmap + stack (rounded to
    2 MiB pieces; unused memory costs nothing until touched), plus ``fs`` bytes for the file
    system. The heap and the mmap area share what the image and the stack leave, half each:
    glibc's malloc takes small blocks from brk and big ones (128 KiB and up) from mmap."""
    bias = PIE_BASE if image.pie else 0
    lo, hi = _down(image.low + bias), _up(image.high + bias)
    if lo < SYSTEM_END:
        raise ProgramError(f"{image.name}: linked at {image.low + bias:#x}, inside the first "
                           f"{SYSTEM_END >> 20} MiB that the library OS uses; link it at "
                           "0x400000 or above (gcc's default) or as static-PIE")
    stack = _up(max(stack, HUGE))
    rest = _down(memory - (hi - lo) - stack)
    if rest < 2 * HUGE:
        raise ConfigError(f"--memory {memory >> 20} MiB is too small for {image.name}: its "
                          f"image takes {(hi - lo) >> 20} MiB and its stack {stack >> 20} MiB; "
                          f"give it at least {(hi - lo + stack + 2 * HUGE) >> 20} MiB")
    heap = _down(rest // 2)
    mmap = rest - heap
    if hi + heap > MMAP_TOP - mmap:
        raise ProgramError(f"{image.name}: linked too high ({image.high + bias:#x}) to leave "
                           "room for its heap and mmap area")
    regions = []
    off = 0
    fs = _up(fs)
    if hi + heap > FS_BASE or FS_BASE + fs > MMAP_TOP - mmap:
        raise ConfigError(f"{image.name}: the file system ({fs >> 20} MiB) does not fit "
                          "between the heap and the mmap area")
    layout_ = [("image+heap", lo, hi - lo + heap), ("mmap", MMAP_TOP - mmap, mmap),
               ("stack", STACK_TOP - stack, stack)]
    if lo - TRAMP_SIZE >= TRAMP_LOW and hi - (lo - TRAMP_SIZE) <= 1 << 31:
        # Trampolines for rewritten syscall sites, within a rel32 jump of every byte of the
        # image (it costs nothing until the library OS writes one).
        layout_.append(("tramp", lo - TRAMP_SIZE, TRAMP_SIZE))
    if fs:
        layout_.append(("fs", FS_BASE, fs))
    for name, va, size in layout_:
        regions.append(Region(name, va, size, off))
        off += size
    return AddressSpace(regions=tuple(regions), bias=bias, brk_start=_up(image.high + bias, L.PAGE),
                        stack_top=STACK_TOP)
