"""The address-space plan: regions that never overlap the system area or each other, a
translation that refuses anything unmapped, and page tables that a software walk of the same
tables (as the CPU would do) reads back as the plan."""
from __future__ import annotations

import numpy as np
import pytest

from dirtyring.errors import ConfigError, ProgramError
from dirtyring.linux import addrspace as A
from dirtyring.linux.elf import ElfImage, Segment
from dirtyring.machine import layout as L

GIB = 1 << 30


def _image(vaddr: int, memsz: int, pie: bool = False) -> ElfImage:
    seg = Segment(vaddr=vaddr, memsz=memsz, filesz=min(memsz, 4096), offset=0, flags=5,
                  align=4096)
    return ElfImage(name="p", pie=pie, entry=vaddr, segments=(seg,), phdr_vaddr=vaddr + 64,
                    phnum=1, phentsize=56, tls=None, executable_stack=False)


def _walk(q: np.ndarray, va: int) -> int | None:
    """The guest-physical address the tables map ``va`` to, as a 4-level walk finds it."""
    e = int(q[L.PML4_GPA // 8 + (va >> 39 & 511)])
    for shift in (30, 21):
        if not e & L.P:
            return None
        base = (e & 0x000F_FFFF_FFFF_F000) // 8
        e = int(q[base + (va >> shift & 511)])
        if shift == 21 and e & L.PS:
            return (e & 0x000F_FFFF_FFE0_0000) + (va & (A.HUGE - 1)) if e & L.P else None
    return None


@pytest.mark.parametrize("pie", [False, True])
def test_plan_install_and_walk_agree(pie: bool) -> None:
    img = _image(0 if pie else 0x400000, 3 << 20, pie=pie)
    space = A.plan(img, memory=GIB)
    assert space.data_bytes <= GIB + A.TRAMP_SIZE
    rs = sorted(space.regions, key=lambda r: r.va)
    # Only the trampoline region may sit in the system area's unmapped half, [2 MiB, 4 MiB).
    assert all(r.va >= A.SYSTEM_END for r in rs if r.name != "tramp")
    tramp, image = space.region("tramp"), space.region("image+heap")
    assert tramp.va >= A.TRAMP_LOW and tramp.end == image.va
    assert img.high + space.bias - tramp.va <= 1 << 31   # a rel32 jump reaches it from the image
    assert all(a.end <= b.va for a, b in zip(rs, rs[1:]))
    assert space.brk_start == (img.high + space.bias) and space.brk_start % L.PAGE == 0
    sysmem = np.zeros(L.SYSTEM_SLOT_SIZE, np.uint8)
    L.build_system_slot(sysmem, 0)
    q = sysmem.view(np.uint64)
    before = q.copy()
    space.install(q, L.DATA_GPA, L.DATA_PD_GPA, L.SYSTEM_SLOT_SIZE)
    # The system area's identity mapping is untouched except for new table links.
    changed = np.flatnonzero(before != q) * 8
    assert all(g >= L.DATA_PD_GPA or g // L.PAGE * L.PAGE in (L.PML4_GPA, L.PDPT_GPA, L.PD0_GPA)
               for g in changed)
    for va, off in space.leaves():
        for probe in (va, va + 12345, va + A.HUGE - 1):
            assert _walk(q, probe) == L.DATA_GPA + off + (probe - va)
    for r in space.regions:
        assert _walk(q, r.va - 1) is None or any(o.va <= r.va - 1 < o.end for o in rs)
        assert space.translate(r.va + 5, 10) == [(r.offset + 5, 10)]


def test_translate_splits_and_refuses_unmapped() -> None:
    space = A.plan(_image(0x400000, 1 << 20), memory=GIB)
    img = space.region("image+heap")
    assert space.translate(img.end - 4, 4) == [(img.offset + img.size - 4, 4)]
    with pytest.raises(ProgramError, match="not mapped"):
        space.translate(img.end - 4, 8)
    with pytest.raises(ProgramError, match="not mapped"):
        space.translate(0x1000, 1)
    with pytest.raises(ProgramError, match="outside a user address space"):
        space.translate(A.USER_TOP - 4, 8)


def test_install_never_overwrites() -> None:
    space = A.plan(_image(0x400000, 1 << 20), memory=GIB)
    sysmem = np.zeros(L.SYSTEM_SLOT_SIZE, np.uint8)
    L.build_system_slot(sysmem, 0)
    q = sysmem.view(np.uint64)
    space.install(q, L.DATA_GPA, L.DATA_PD_GPA, L.SYSTEM_SLOT_SIZE)
    with pytest.raises(ConfigError, match="already mapped"):
        space.install(q, L.DATA_GPA, L.DATA_PD_GPA + 16 * L.PAGE, L.SYSTEM_SLOT_SIZE)
    with pytest.raises(ConfigError, match="no room"):
        fresh = np.zeros(L.SYSTEM_SLOT_SIZE, np.uint8)
        L.build_system_slot(fresh, 0)
        space.install(fresh.view(np.uint64), L.DATA_GPA, L.DATA_PD_GPA, L.DATA_PD_GPA + L.PAGE)


def test_programs_that_do_not_fit_say_why() -> None:
    with pytest.raises(ProgramError, match="inside the first 4 MiB"):
        A.plan(_image(0x10000, 4096), memory=GIB)
    with pytest.raises(ConfigError, match="too small"):
        A.plan(_image(0x400000, 100 << 20), memory=64 << 20)


def test_trampolines_need_a_rel32_reach() -> None:
    """An image too big for a rel32 jump to reach from its end to the region below it gets no
    trampoline region (the library OS then rewrites nothing)."""
    assert A.plan(_image(0x400000, 1 << 20), memory=GIB).find("tramp") is not None
    huge = A.plan(_image(0x400000, (2 << 30) + (4 << 20)), memory=4 * GIB)
    assert huge.find("tramp") is None
