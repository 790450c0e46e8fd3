"""libos.h (the library OS's side) and the VMM's side agree: the Linux control block, the stdio
queue, the ports, the addresses; and the committed libos.bin is what the sources build into."""
from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np
import pytest

from dirtyring.guests import build as guest_build
from dirtyring.guests import protocol
from dirtyring.linux import build, program
from dirtyring.machine import layout

LIBOS_H = build.SRC / "libos.h"


def _defines() -> dict[str, int]:
    out = {}
    text = LIBOS_H.read_text()
    for k, v in re.findall(r"^#define[ \t]+(\w+)[ \t]+(.+?)[ \t]*(?:/\*.*)?$", text, re.M):
        v = v.strip()
        m = re.fullmatch(r"\((\w+)\s*\+\s*(\w+)\)", v)
        out[k] = (out[m[1]] + int(m[2].rstrip("UL"), 0)) if m else int(v.rstrip("UL"), 0)
    return out


def test_control_block_fields_and_offsets() -> None:
    body = re.search(r"struct linux_ctl\s*\{(.*?)\};", LIBOS_H.read_text(), re.S)[1]
    fields = []
    for name, count, off in re.findall(r"u64\s+(\w+)(?:\[(\d+)\])?;\s*/\*\s*(\d+)", body):
        n = int(count or 1)
        fields += [(f"{name}{i}" if count else name, int(off) + 8 * i) for i in range(n)]
    assert tuple(f for f, _ in fields) == program.LINUX_CTL_FIELDS
    assert [o for _, o in fields] == [8 * i for i in range(len(fields))]
    assert '"DRLINUX1"' in body
    assert program.LINUX_CTL_MAGIC.to_bytes(8, "little") == b"DRLINUX1"
    # The block sits in the control page, after the built-in guests' fields.
    assert layout.CONTROL_GPA + 8 * len(protocol.CONTROL_FIELDS) <= program.LINUX_CTL_GPA
    assert program.LINUX_CTL_GPA + 8 * len(fields) <= layout.CONTROL_GPA + layout.PAGE


def test_addresses_ports_and_queue_agree() -> None:
    d = _defines()
    assert d["LINUX_CTL_GPA"] == program.LINUX_CTL_GPA
    # A Linux guest has one vCPU: the library OS takes all the stacks' room (64 KiB).
    assert d["LIBOS_STACK_TOP"] == layout.QUEUE_GPA == layout.STACK_BASE + 4 * layout.STACK_SIZE
    assert d["STDIO_GPA"] == layout.QUEUE_GPA
    assert d["STDIO_RING_GPA"] == layout.QUEUE_GPA + protocol.STDIO_RING_OFFSET
    assert d["STDIO_RING"] == protocol.STDIO_RING
    assert d["STDIO_MAX_RECORD"] == protocol.STDIO_MAX_RECORD
    assert protocol.STDIO_RING_OFFSET + protocol.STDIO_RING <= protocol.TRACE_OFFSET
    assert d["TRACE_GPA"] == layout.QUEUE_GPA + protocol.TRACE_OFFSET
    assert d["TRACE_RECORDS"] == protocol.TRACE_RECORDS
    assert protocol.TRACE_OFFSET + protocol.TRACE_RECORDS * protocol.TRACE_RECORD.size \
        <= protocol.STDIN_OFFSET
    assert d["STDIN_GPA"] == layout.QUEUE_GPA + protocol.STDIN_OFFSET
    assert d["STDIN_RING"] == protocol.STDIN_RING
    assert protocol.STDIN_OFFSET + protocol.STDIN_RING <= layout.QUEUE_SIZE
    # getrandom's pool: in the header page, after the header, within the page.
    assert d["ENTROPY_OFFSET"] == protocol.ENTROPY_OFFSET
    assert d["ENTROPY_POOL"] == protocol.ENTROPY_POOL
    header = re.search(r"struct stdio_header\s*\{(.*?)\};", LIBOS_H.read_text(), re.S)[1]
    names = re.findall(r"u64\s+(\w+)(?:\[(\d+)\])?;", header)
    offsets, at = {}, 0
    for name, count in names:
        offsets[name] = at
        at += 8 * int(count or 1)
    assert {k: v for k, v in offsets.items() if not k.startswith("pad")} \
        == protocol.STDIO_HEADER_OFFSETS
    assert at <= protocol.ENTROPY_OFFSET
    assert protocol.ENTROPY_OFFSET + protocol.ENTROPY_POOL <= protocol.STDIO_RING_OFFSET
    # Signals from outside: after the rewrite counters, before the pool; the layout the VMM
    # writes (linux/signals.py: pending, entry, then the registers in struct sigctx's order).
    assert d["EXT_SIGNALS_GPA"] == layout.QUEUE_GPA + protocol.EXT_SIGNALS_OFFSET
    assert d["REWRITE_STATS_GPA"] + 3 * 8 <= d["EXT_SIGNALS_GPA"]
    ext = re.search(r"struct ext_signals\s*\{(.*?)\};", LIBOS_H.read_text(), re.S)[1]
    assert re.findall(r"u64\s+(\w+)(?:\[(\d+)\])?;", ext) == [
        ("pending", ""), ("entry", ""), ("forwarding", ""), ("ctx", "18")]
    assert protocol.EXT_SIGNALS_OFFSET + 8 * 21 <= protocol.ENTROPY_OFFSET
    sigctx = re.search(r"struct sigctx \{(.*?)\};", (build.SRC / "proc.c").read_text(), re.S)[1]
    assert [r.strip(" ;") for r in sigctx.replace("u64", "").replace("\n", " ").split(",")] == [
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rdi", "rsi", "rbp", "rbx",
        "rdx", "rax", "rcx", "rsp", "rip", "eflags"]
    ports = {k[len("PORT_"):]: v for k, v in d.items() if k.startswith("PORT_")}
    assert ports == {"DONE": int(protocol.Port.DONE),
                     **{p.name: int(p) for p in protocol.LibosPort}}
    # entry.S hard-codes the stack top.
    entry = (build.SRC / "entry.S").read_text()
    assert f"$0x{d['LIBOS_STACK_TOP']:X}" in entry


def _descriptor(gdt: bytes, selector: int) -> dict[str, int]:
    d = int.from_bytes(gdt[selector & ~7:(selector & ~7) + 8], "little")
    access = (d >> 40) & 0xFF
    return {"present": access >> 7, "dpl": (access >> 5) & 3, "code": (access >> 3) & 1,
            "s": (access >> 4) & 1, "rw": (access >> 1) & 1, "long": (d >> 53) & 1}


def test_star_and_the_gdt_agree_with_syscall_and_sysret() -> None:
    """On hardware KVM a program's `syscall` enters CPL0 through STAR[47:32] and the entry
    returns with `sysretq`, which loads SS = STAR[63:48] + 8 and CS = STAR[63:48] + 16 (SDM
    vol. 2, SYSRET). This host never takes that path (kvm_pvm keeps the entry at CPL3), so the
    descriptors it would load are checked here, as the CPU would read them."""
    mem = np.zeros(layout.SYSTEM_SLOT_SIZE, np.uint8)
    layout.build_system_slot(mem, 0)
    gdt = mem[layout.GDT_GPA:layout.GDT_GPA + layout.GDT_LIMIT + 1].tobytes()
    kernel_cs = (program.STAR >> 32) & 0xFFFF
    base = (program.STAR >> 48) & 0xFFFF
    assert _descriptor(gdt, kernel_cs) == {"present": 1, "dpl": 0, "code": 1, "s": 1, "rw": 1,
                                           "long": 1}
    assert _descriptor(gdt, kernel_cs + 8)["code"] == 0  # syscall's SS
    user_ss, user_cs = base + 8, base + 16
    assert user_cs + 8 <= layout.GDT_LIMIT + 1
    assert _descriptor(gdt, user_ss) == {"present": 1, "dpl": 3, "code": 0, "s": 1, "rw": 1,
                                         "long": 0}
    assert _descriptor(gdt, user_cs) == {"present": 1, "dpl": 3, "code": 1, "s": 1, "rw": 1,
                                         "long": 1}
    entry = (build.SRC / "entry.S").read_text()
    code = [ln.split("/*")[0].split() for ln in entry.splitlines()]
    assert sum(1 for w in code if "sysretq" in w) == 2  # the return and the floor's, at CPL0


def test_committed_libos_is_what_the_sources_build(tmp_path: Path) -> None:
    if not guest_build.toolchain_present():
        pytest.fail("gcc/objcopy/objdump missing: ./tools/install-test-deps installs them")
    fresh = build.build(tmp_path).read_bytes()
    assert fresh == build.load_libos(), "rebuild with `python -m dirtyring.linux.build`"
    vdso = (tmp_path / "vdso.so").read_bytes()
    assert vdso == build.load_vdso(), "rebuild with `python -m dirtyring.linux.build`"
    assert layout.CODE_GPA + len(fresh) <= program.VDSO_GPA
    assert program.VDSO_GPA + len(vdso) <= layout.CODE_LIMIT


def test_the_vdso_is_one_read_only_segment_from_zero() -> None:
    """What glibc's setup_vdso needs: the first PT_LOAD at address 0 (it takes it as the
    base), no second one, a read-only PT_DYNAMIC, and the four symbols at version LINUX_2.6."""
    img = build.load_vdso()
    phoff, = struct.unpack_from("<Q", img, 32)
    phentsize, phnum = struct.unpack_from("<HH", img, 54)
    loads, dyn = [], []
    for i in range(phnum):
        ptype, flags, off, vaddr = struct.unpack_from("<IIQQ", img, phoff + i * phentsize)
        if ptype == 1:
            loads.append((off, vaddr, flags))
        elif ptype == 2:
            dyn.append(flags)
    assert loads == [(0, 0, 5)] and dyn == [4]
    for sym in (b"__vdso_clock_gettime", b"__vdso_gettimeofday", b"__vdso_time",
                b"__vdso_getcpu", b"LINUX_2.6"):
        assert sym in img


def test_stdio_header_offsets_by_declaration() -> None:
    body = re.search(r"struct stdio_header\s*\{(.*?)\};", LIBOS_H.read_text(), re.S)[1]
    off, got = 0, {}
    for name, pad in re.findall(r"volatile u64 (\w+);(?:\s*u64 \w+\[(\d+)\];)?", body):
        got[name] = off
        off += 8 * (1 + int(pad or 0))
    assert got == protocol.STDIO_HEADER_OFFSETS
    record = re.search(r"struct trace_record\s*\{(.*?)\};", LIBOS_H.read_text(), re.S)[1]
    assert record.split() == ["u64", "nr;", "u64", "args[6];", "s64", "ret;"]
    assert protocol.TRACE_RECORD.size == 64


def test_rewrite_stats_agree() -> None:
    """The counts the library OS keeps for rewritten syscall sites: where the VMM reads them,
    in order, in the queue header page after stdio_header and before the stdio ring."""
    d = _defines()
    assert d["REWRITE_STATS_GPA"] == program.REWRITE_STATS_GPA
    body = re.search(r"struct rewrite_stats\s*\{(.*?)\};", LIBOS_H.read_text(), re.S)[1]
    assert tuple(re.findall(r"volatile u64 (\w+);", body)) == program.REWRITE_STATS_FIELDS
    header_end = max(protocol.STDIO_HEADER_OFFSETS.values()) + 8
    assert layout.QUEUE_GPA + header_end <= program.REWRITE_STATS_GPA
    assert program.REWRITE_STATS_GPA + 8 * len(program.REWRITE_STATS_FIELDS) \
        <= layout.QUEUE_GPA + protocol.STDIO_RING_OFFSET
