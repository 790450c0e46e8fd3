"""Check ``dirtyring._bindings._uapi`` against the C header it transcribes.

Against ``/usr/include/linux/kvm.h`` (Linux 6.1 on our machines), a C program generated here
prints ``sizeof``/``_Alignof`` of every struct, ``offsetof`` and member size of every field
(nested anonymous structs and unions included), and the value of every ``KVM_*``/``MSR_*``
constant the module defines. Constants the header lacks are printed as absent and must be
listed, with their documented values, in :data:`NOT_IN_HEADER`.

The README promises this check, so it always runs: a host without the header or a C compiler
fails these tests (never skips them) with a message naming what to install. On Debian that is
``gcc``, ``libc6-dev`` (stdio.h; gcc only recommends it) and ``linux-libc-dev`` (linux/kvm.h,
linux/kvm_para.h, asm/kvm.h): ``apt-get install gcc libc6-dev linux-libc-dev``. The
documented-value tests at the bottom need none of them.
"""
from __future__ import annotations

import ctypes as C
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dirtyring._bindings import _uapi as U

HEADER = Path("/usr/include/linux/kvm.h")

#: What the check needs, and the Debian packages that provide it.
INSTALL = ("install them (Debian: apt-get install gcc libc6-dev linux-libc-dev): the check of "
           "_uapi against linux/kvm.h that the README promises cannot run without them")


# --- what to compare ---------------------------------------------------------------------------
@dataclass(frozen=True)
class StructSpec:
    """One ``struct <name>`` of the header and how its C member paths differ from ours."""

    name: str
    #: exact Python path -> C member designator (for fields we name differently)
    renames: dict[str, str] = field(default_factory=dict)
    #: Python path prefix -> C prefix (anonymous unions have no name in C)
    prefixes: dict[str, str] = field(default_factory=dict)
    #: C members past our declared fields (flexible arrays, or the tail we do not declare),
    #: each of which must start exactly at ``ctypes.sizeof`` of our struct
    tail_member: str | None = None
    #: our struct is a prefix of the C one (compare offsets, not the total size)
    prefix_only: bool = False
    #: C's alignment is raised by a flexible array we do not declare (harmless: the bindings
    #: only use such a header at the start of a fresh ctypes buffer, never embedded)
    c_align_from_tail: bool = False


STRUCTS: tuple[StructSpec, ...] = (
    StructSpec("kvm_userspace_memory_region"),
    StructSpec("kvm_regs"),
    StructSpec("kvm_segment"),
    StructSpec("kvm_dtable"),
    StructSpec("kvm_sregs"),
    StructSpec("kvm_fpu"),
    StructSpec("kvm_xsave", tail_member="extra"),
    StructSpec("kvm_xcr"),
    StructSpec("kvm_xcrs"),
    StructSpec("kvm_device_attr"),
    StructSpec("kvm_msr_entry"),
    StructSpec("kvm_msrs", tail_member="entries", c_align_from_tail=True),
    StructSpec("kvm_msr_list", tail_member="indices"),
    StructSpec("kvm_lapic_state"),
    # 6.1: `struct { __u8 pending; } triple_fault;` where we declare `triple_fault_pending`.
    StructSpec("kvm_vcpu_events", renames={"triple_fault_pending": "triple_fault.pending"}),
    StructSpec("kvm_mp_state"),
    StructSpec("kvm_signal_mask", tail_member="sigset"),
    StructSpec("kvm_enable_cap"),
    # dirty_bitmap sits in an anonymous union { void *dirty_bitmap; __u64 padding2; }.
    StructSpec("kvm_dirty_log"),
    StructSpec("kvm_clear_dirty_log"),
    StructSpec("kvm_dirty_gfn"),
    StructSpec("kvm_cpuid_entry2"),
    StructSpec("kvm_cpuid2", tail_member="entries"),
    # The exit union is anonymous in C: our `u` is its `char padding[256]` member.
    StructSpec("kvm_run", renames={"u": "padding",
                                   "s.regs.events.triple_fault_pending":
                                   "s.regs.events.triple_fault.pending"},
               prefixes={"u.": ""}),
    StructSpec("kvm_sync_regs",
               renames={"events.triple_fault_pending": "events.triple_fault.pending"}),
    StructSpec("kvm_stats_header"),
)

#: Constants the 6.1 header does not define, with the value documented elsewhere.
NOT_IN_HEADER: dict[str, int] = {
    # Documentation/virt/kvm/api.rst, Linux >= 6.4 (docs/kvm-dirty-ring.md).
    "KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP": 225,
    # MSR numbers from arch/x86/include/asm/msr-index.h (kernel-internal, not UAPI) and the SDM.
    "MSR_IA32_TSC": 0x10,
    "MSR_EFER": 0xC0000080,
    "MSR_STAR": 0xC0000081,
    "MSR_LSTAR": 0xC0000082,
    "MSR_CSTAR": 0xC0000083,
    "MSR_SYSCALL_MASK": 0xC0000084,
    "MSR_FS_BASE": 0xC0000100,
    "MSR_GS_BASE": 0xC0000101,
    "MSR_KERNEL_GS_BASE": 0xC0000102,
    "MSR_TSC_AUX": 0xC0000103,
    "MSR_IA32_SYSENTER_CS": 0x174,
    "MSR_IA32_SYSENTER_ESP": 0x175,
    "MSR_IA32_SYSENTER_EIP": 0x176,
    "MSR_IA32_CR_PAT": 0x277,
    "MSR_IA32_MISC_ENABLE": 0x1A0,
}

#: Every ioctl the bindings issue (spelled as in linux/kvm.h).
IOCTLS: tuple[str, ...] = (
    "KVM_GET_API_VERSION", "KVM_CREATE_VM", "KVM_GET_MSR_INDEX_LIST", "KVM_CHECK_EXTENSION",
    "KVM_GET_VCPU_MMAP_SIZE", "KVM_GET_SUPPORTED_CPUID",
    "KVM_CREATE_VCPU", "KVM_GET_DIRTY_LOG", "KVM_SET_USER_MEMORY_REGION", "KVM_SET_TSS_ADDR",
    "KVM_SET_IDENTITY_MAP_ADDR", "KVM_CREATE_IRQCHIP", "KVM_ENABLE_CAP", "KVM_CLEAR_DIRTY_LOG",
    "KVM_RESET_DIRTY_RINGS", "KVM_GET_STATS_FD",
    "KVM_RUN", "KVM_GET_REGS", "KVM_SET_REGS", "KVM_GET_SREGS", "KVM_SET_SREGS", "KVM_GET_MSRS",
    "KVM_SET_MSRS", "KVM_SET_CPUID2", "KVM_GET_FPU", "KVM_SET_FPU", "KVM_GET_LAPIC",
    "KVM_SET_LAPIC", "KVM_GET_MP_STATE", "KVM_SET_MP_STATE", "KVM_GET_VCPU_EVENTS",
    "KVM_SET_VCPU_EVENTS", "KVM_GET_TSC_KHZ", "KVM_GET_XSAVE", "KVM_SET_XSAVE", "KVM_GET_XCRS",
    "KVM_SET_XCRS", "KVM_SET_SIGNAL_MASK", "KVM_GET_DEVICE_ATTR",
)

#: The ioctls encoded with _IO (no size, no direction): numbers 0xAE00..0xAEFF.
IO_IOCTLS = frozenset({
    "KVM_GET_API_VERSION", "KVM_CREATE_VM", "KVM_CHECK_EXTENSION", "KVM_GET_VCPU_MMAP_SIZE",
    "KVM_CREATE_VCPU", "KVM_SET_TSS_ADDR", "KVM_CREATE_IRQCHIP", "KVM_RESET_DIRTY_RINGS",
    "KVM_GET_STATS_FD", "KVM_RUN", "KVM_GET_TSC_KHZ",
})

_CONST_RE = re.compile(r"^(KVMIO|KVM_[A-Z0-9_]+|MSR_[A-Z0-9_]+)$")


def module_constants() -> dict[str, int]:
    """Every ``KVMIO``/``KVM_*``/``MSR_*`` integer constant of ``_uapi``."""
    return {k: v for k, v in vars(U).items()
            if _CONST_RE.match(k) and isinstance(v, int) and not isinstance(v, bool)}


def py_fields(cls: type, prefix: str = "", base: int = 0) -> list[tuple[str, int, int]]:
    """(dotted path, offset, size) of every field of a ctypes struct, nested structs included."""
    out: list[tuple[str, int, int]] = []
    for name, ftype, *_ in cls._fields_:  # type: ignore[attr-defined]
        desc = getattr(cls, name)
        path, off = prefix + name, base + desc.offset
        out.append((path, off, desc.size))
        if isinstance(ftype, type) and issubclass(ftype, (C.Structure, C.Union)):
            out.extend(py_fields(ftype, path + ".", off))
    return out


def c_path(spec: StructSpec, path: str) -> str:
    if path in spec.renames:
        return spec.renames[path]
    for old, new in spec.prefixes.items():
        if path.startswith(old):
            return new + path[len(old):]
    return path


# --- the C side ---------------------------------------------------------------------------------
def generate_c() -> str:
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        "#include <linux/kvm.h>",
        "#include <linux/kvm_para.h>",
        "#define MEMBER_SIZE(T, m) sizeof(((T *)0)->m)",
        "int main(void) {",
    ]
    for spec in STRUCTS:
        t = f"struct {spec.name}"
        lines.append(f'  printf("size {spec.name} %zu %zu\\n", sizeof({t}), _Alignof({t}));')
        for path, _, _ in py_fields(getattr(U, spec.name)):
            cp = c_path(spec, path)
            lines.append(f'  printf("field {spec.name} {path} %zu %zu\\n", '
                         f"offsetof({t}, {cp}), MEMBER_SIZE({t}, {cp}));")
        if spec.tail_member:
            lines.append(f'  printf("tail {spec.name} %zu\\n", offsetof({t}, {spec.tail_member}));')
    for name in sorted(module_constants()):
        lines += [f"#ifdef {name}",
                  f'  printf("const {name} %llu\\n", (unsigned long long)({name}));',
                  "#else",
                  f'  printf("absent {name}\\n");',
                  "#endif"]
    lines += ["  return 0;", "}"]
    return "\n".join(lines) + "\n"


@dataclass
class HeaderFacts:
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)
    fields: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)
    tails: dict[str, int] = field(default_factory=dict)
    consts: dict[str, int] = field(default_factory=dict)
    absent: set[str] = field(default_factory=set)


@pytest.fixture(scope="module")
def header(tmp_path_factory: pytest.TempPathFactory) -> HeaderFacts:
    """What the header says, compiled and printed by a generated C program.

    A missing header or compiler is a failure of this check, not a reason to skip it."""
    missing = []
    if not HEADER.exists():
        missing.append(f"{HEADER} (Debian package linux-libc-dev)")
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        missing.append("a C compiler, gcc or cc (Debian package gcc)")
    if missing:
        pytest.fail(f"this host lacks {' and '.join(missing)}; {INSTALL}", pytrace=False)
    assert gcc is not None
    d = tmp_path_factory.mktemp("uapi")
    src, exe = d / "uapi_check.c", d / "uapi_check"
    src.write_text(generate_c())
    cc = subprocess.run([gcc, "-std=gnu11", "-O0", "-o", str(exe), str(src)],
                        capture_output=True, text=True)
    if cc.returncode != 0:
        hint = ""
        if re.search(r"fatal error: [\w/.]+\.h: No such file", cc.stderr):
            hint = f"\nA header is missing: {INSTALL}."
        pytest.fail(f"compiling {src} with {gcc} failed:\n{cc.stderr}{hint}", pytrace=False)
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    facts = HeaderFacts()
    for line in out.splitlines():
        kind, *rest = line.split()
        if kind == "size":
            facts.sizes[rest[0]] = (int(rest[1]), int(rest[2]))
        elif kind == "field":
            facts.fields[(rest[0], rest[1])] = (int(rest[2]), int(rest[3]))
        elif kind == "tail":
            facts.tails[rest[0]] = int(rest[1])
        elif kind == "const":
            facts.consts[rest[0]] = int(rest[1])
        elif kind == "absent":
            facts.absent.add(rest[0])
    return facts


# --- struct layout ------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", STRUCTS, ids=[s.name for s in STRUCTS])
def test_struct_layout(header: HeaderFacts, spec: StructSpec) -> None:
    cls = getattr(U, spec.name)
    c_size, c_align = header.sizes[spec.name]
    if not spec.prefix_only:
        assert C.sizeof(cls) == c_size, f"sizeof(struct {spec.name})"
    if spec.c_align_from_tail:
        assert C.alignment(cls) <= c_align
    else:
        assert C.alignment(cls) == c_align, f"_Alignof(struct {spec.name})"
    wrong = []
    for path, off, size in py_fields(cls):
        c_off, c_size_m = header.fields[(spec.name, path)]
        if (off, size) != (c_off, c_size_m):
            wrong.append(f"{path}: ours offset {off} size {size}, "
                         f"C {c_path(spec, path)} offset {c_off} size {c_size_m}")
    assert not wrong, "\n".join(wrong)
    if spec.tail_member:
        assert header.tails[spec.name] == C.sizeof(cls), (
            f"{spec.name}.{spec.tail_member} must start where our struct ends")


def test_every_kvm_struct_is_checked() -> None:
    """A struct added to _uapi must be added to STRUCTS (or this test explains why not)."""
    ours = {k for k, v in vars(U).items()
            if k.startswith("kvm_") and isinstance(v, type) and issubclass(v, C.Structure)}
    assert ours == {s.name for s in STRUCTS}


def test_kvm_run_exit_union_members(header: HeaderFacts) -> None:
    """The members we decode at run time, named explicitly (the brief's list)."""
    for path in ("exit_reason", "immediate_exit", "u", "u.io", "u.io.direction", "u.io.size",
                 "u.io.port", "u.io.count", "u.io.data_offset", "u.mmio", "u.mmio.phys_addr",
                 "u.mmio.data", "u.mmio.len", "u.mmio.is_write"):
        assert ("kvm_run", path) in header.fields
    assert header.fields[("kvm_run", "exit_reason")][0] == U.kvm_run.exit_reason.offset == 8
    assert header.fields[("kvm_run", "u.io")][0] == U.kvm_run.u.offset == 32


def test_vcpu_events_nested_fields(header: HeaderFacts) -> None:
    """Spot-check the nested anonymous structs with their absolute offsets."""
    expect = {"exception.error_code": 4, "interrupt.shadow": 11, "nmi.masked": 14,
              "sipi_vector": 16, "flags": 20, "smi.latched_init": 27,
              "triple_fault_pending": 28, "reserved": 29, "exception_has_payload": 55,
              "exception_payload": 56}
    for path, off in expect.items():
        assert header.fields[("kvm_vcpu_events", path)][0] == off
    assert header.sizes["kvm_vcpu_events"][0] == C.sizeof(U.kvm_vcpu_events) == 64


# --- constants ------------------------------------------------------------------------------------
CONSTANTS = sorted(module_constants())


@pytest.mark.parametrize("name", CONSTANTS)
def test_constant_value(header: HeaderFacts, name: str) -> None:
    ours = getattr(U, name)
    if name in header.absent:
        assert name in NOT_IN_HEADER, f"{name} is not in {HEADER}: document its value"
        assert ours == NOT_IN_HEADER[name]
    else:
        assert ours == header.consts[name], f"{name}: ours {ours:#x}, header {header.consts[name]:#x}"


def test_constants_absent_from_header_are_documented(header: HeaderFacts) -> None:
    """Prints which constants the header lacks; the set must be exactly NOT_IN_HEADER."""
    print("absent from", HEADER, ":", ", ".join(sorted(header.absent)))
    assert header.absent == set(NOT_IN_HEADER)


def test_every_ioctl_is_a_module_constant() -> None:
    consts = module_constants()
    missing = [n for n in IOCTLS if n not in consts]
    assert not missing


def test_ioctl_numbers_are_distinct() -> None:
    values = [getattr(U, n) for n in IOCTLS]
    assert len(set(values)) == len(values)


_NAMED = list(IOCTLS)


@pytest.mark.parametrize("name", _NAMED)
def test_ioctl_names_maps_every_ioctl(name: str) -> None:
    assert U.IOCTL_NAMES.get(getattr(U, name)) == name


def test_ioctl_names_holds_only_ioctls() -> None:
    assert set(U.IOCTL_NAMES.values()) <= set(IOCTLS)


# --- documented values, independent of any header ------------------------------------------------
#: From docs/kvm-dirty-ring.md and docs/platform.md (upstream api.rst / kvm.h of Linux 6.18).
DOCUMENTED: dict[str, int] = {
    "KVMIO": 0xAE,
    "KVM_API_VERSION": 12,
    "KVM_CAP_DIRTY_LOG_RING": 192,
    "KVM_CAP_DIRTY_LOG_RING_ACQ_REL": 223,
    "KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP": 225,
    "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2": 168,
    "KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE": 1,
    "KVM_DIRTY_LOG_INITIALLY_SET": 2,
    "KVM_EXIT_DIRTY_RING_FULL": 31,
    "KVM_EXIT_INTR": 10,
    "KVM_RESET_DIRTY_RINGS": 0xAEC7,
    "KVM_GET_DIRTY_LOG": 0x4010AE42,
    "KVM_CLEAR_DIRTY_LOG": 0xC018AEC0,
    "KVM_ENABLE_CAP": 0x4068AEA3,
    "KVM_GET_STATS_FD": 0xAECE,
    "KVM_DIRTY_LOG_PAGE_OFFSET": 64,
    "KVM_DIRTY_GFN_F_DIRTY": 0x1,
    "KVM_DIRTY_GFN_F_RESET": 0x2,
    "KVM_MEM_LOG_DIRTY_PAGES": 0x1,
    "MSR_KVM_SYSTEM_TIME_NEW": 0x4B564D01,
    "MSR_KVM_STEAL_TIME": 0x4B564D03,
}


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_documented_constant(name: str) -> None:
    assert getattr(U, name) == DOCUMENTED[name]


def test_documented_struct_sizes() -> None:
    assert C.sizeof(U.kvm_dirty_gfn) == 16
    assert C.sizeof(U.kvm_enable_cap) == 104
    assert (U.kvm_dirty_gfn.flags.offset, U.kvm_dirty_gfn.slot.offset,
            U.kvm_dirty_gfn.offset.offset) == (0, 4, 8)


def test_msrs_buffer_layout() -> None:
    buf, entries = U.msrs_buffer(3)
    assert len(buf) == 8 + 3 * 16
    assert U.kvm_msrs.from_buffer(buf).nmsrs == 3
    entries[2].index = 0x1234
    assert int.from_bytes(bytes(buf[8 + 32:8 + 36]), "little") == 0x1234


def test_cpuid_buffer_layout() -> None:
    buf, entries = U.cpuid_buffer(2)
    assert len(buf) == 8 + 2 * 40
    assert U.kvm_cpuid2.from_buffer(buf).nent == 2
    entries[1].function = 0x40000000
    assert int.from_bytes(bytes(buf[8 + 40:8 + 44]), "little") == 0x40000000


def test_generated_c_mentions_every_struct_and_constant() -> None:
    """Cheap guard that runs without the header: the generator covers what it should."""
    src = generate_c()
    for spec in STRUCTS:
        assert f"sizeof(struct {spec.name})" in src
    for name in module_constants():
        assert f"#ifdef {name}\n" in src
