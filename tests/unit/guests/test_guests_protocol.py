"""guest.h (the guests' side) and protocol.py / layout.py (the VMM's side) agree, and the VMM's
reference hash chain is the compute guest's chain."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

import dirtyring.guests as guests
from dirtyring.guests import build, protocol
from dirtyring.guests.protocol import (CONTROL_FIELDS, CONTROL_OFFSET, STATUS_FIELDS,
                                       STATUS_OFFSET, GuestParams, Pattern, Port, hash_chain,
                                       splitmix64)
from dirtyring.machine import layout

GUEST_H = Path(guests.__file__).resolve().parent / "guest.h"
M64 = (1 << 64) - 1


def _header() -> str:
    return GUEST_H.read_text()


def _struct_body(name: str) -> str:
    m = re.search(r"struct\s+" + name + r"\s*\{(.*?)\};", _header(), re.S)
    assert m, f"struct {name} not found in guest.h"
    return m.group(1)


def _fields_with_offsets(name: str) -> list[tuple[str, int]]:
    """(field, offset from the comment) for a struct of u64 fields each commented `/* off ...`."""
    out = []
    for line in _struct_body(name).splitlines():
        line = line.strip()
        if not line:
            continue
        m = re.match(r"u64\s+(\w+);\s*/\*\s*(\d+)\b", line)
        assert m, f"unexpected line in struct {name}: {line!r}"
        out.append((m.group(1), int(m.group(2))))
    return out


def _defines() -> dict[str, str]:
    return dict(re.findall(r"^#define\s+(\w+)\s+(.+?)\s*(?:/\*.*)?$", _header(), re.M))


def _c_int(expr: str, defines: dict[str, str]) -> int:
    """Evaluate a guest.h constant: a literal, or (NAME + literal)."""
    expr = expr.strip()
    m = re.fullmatch(r"\((\w+)\s*\+\s*(\w+)\)", expr)
    if m:
        return _c_int(defines[m.group(1)], defines) + _c_int(m.group(2), defines)
    return int(re.sub(r"[uUlL]+$", "", expr), 0)


# --- control and status blocks --------------------------------------------------------------------
def test_control_fields_and_offsets_agree() -> None:
    parsed = _fields_with_offsets("control")
    assert tuple(n for n, _ in parsed) == CONTROL_FIELDS
    for i, (name, off) in enumerate(parsed):
        assert off == 8 * i, f"guest.h comment for control.{name} says {off}, position is {8 * i}"
        assert CONTROL_OFFSET[name] == off


def test_status_fields_and_offsets_agree() -> None:
    parsed = _fields_with_offsets("status")
    assert tuple(n for n, _ in parsed) == STATUS_FIELDS
    for i, (name, off) in enumerate(parsed):
        assert off == 8 * i, f"guest.h comment for status.{name} says {off}, position is {8 * i}"
        assert STATUS_OFFSET[name] == off
    assert 8 * len(STATUS_FIELDS) <= layout.STATUS_STRIDE


def test_control_magic_is_the_commented_string() -> None:
    assert '"DRGUEST1"' in _struct_body("control")
    assert protocol.CONTROL_MAGIC.to_bytes(8, "little") == b"DRGUEST1"


def test_guest_params_cover_the_control_fields_the_vmm_passes_through() -> None:
    params = set(GuestParams.__dataclass_fields__)
    assert params <= set(CONTROL_FIELDS)
    # Everything else in the control page is filled by the machine itself.
    assert set(CONTROL_FIELDS) - params == {"magic", "data_gpa", "data_pages", "tsc_khz",
                                            "iteration", "nr_vcpus", "stop"}


def test_pattern_values_match_guest_comment() -> None:
    m = re.search(r"u64 pattern;.*?dirtier:\s*(.*?)\*/", _header())
    assert m
    text = m.group(1)
    for p in Pattern:
        word = {"SEQUENTIAL": "sequential", "RANDOM": "random", "HOT": "hot"}[p.name]
        assert re.search(rf"\b{int(p)}\s+{word}", text), (p, text)


# --- addresses and constants ----------------------------------------------------------------------
def test_addresses_agree_with_layout() -> None:
    d = _defines()
    assert _c_int(d["CONTROL_GPA"], d) == layout.CONTROL_GPA
    assert _c_int(d["STATUS_GPA"], d) == layout.STATUS_GPA
    assert _c_int(d["STATUS_STRIDE"], d) == layout.STATUS_STRIDE
    assert _c_int(d["QUEUE_GPA"], d) == layout.QUEUE_GPA
    assert _c_int(d["KV_REQ_GPA"], d) == layout.QUEUE_GPA + protocol.KV_REQ_OFFSET
    assert _c_int(d["KV_RESP_GPA"], d) == layout.QUEUE_GPA + protocol.KV_RESP_OFFSET
    # The request and response rings fit in their pages and in the queue area.
    ring_bytes = protocol.KV_RING * protocol.KV_ENTRY.size
    assert ring_bytes <= protocol.KV_RESP_OFFSET - protocol.KV_REQ_OFFSET
    assert protocol.KV_RESP_OFFSET + ring_bytes <= layout.QUEUE_SIZE


def test_ports_agree() -> None:
    d = _defines()
    ports = {k[len("PORT_"):]: _c_int(v, d) for k, v in d.items() if k.startswith("PORT_")}
    assert ports == {p.name: int(p) for p in Port}


def test_kv_constants_agree() -> None:
    d = _defines()
    kv = {k: _c_int(v, d) for k, v in d.items()
          if k.startswith("KV_") and not k.endswith("_GPA")}
    expected = {name: getattr(protocol, name) for name in
                ("KV_RING", "KV_PUT", "KV_GET", "KV_OK", "KV_NOT_FOUND", "KV_FULL", "KV_BAD_OP")}
    assert kv == expected


def test_kv_header_and_entry_layout_by_declaration() -> None:
    body = _struct_body("kv_header")
    names = re.findall(r"volatile\s+u64\s+(\w+);\s*u64\s+\w+\[7\];", body)
    assert names == list(protocol.KV_HEADER_OFFSETS)
    assert [protocol.KV_HEADER_OFFSETS[n] for n in names] == [64 * i for i in range(len(names))]
    types = re.findall(r"\b(u32|u64)\s+\w+;", _struct_body("kv_entry"))
    fmt = {"u32": "I", "u64": "Q"}
    assert "<" + "".join(fmt[t] for t in types) == protocol.KV_ENTRY.format


@pytest.mark.skipif(not build.toolchain_present(), reason="gcc missing")
def test_struct_offsets_as_the_compiler_sees_them(tmp_path: Path) -> None:
    """Compile guest.h with the host gcc (same x86-64 ABI) and print every offset."""
    lines = []
    for f in CONTROL_FIELDS:
        lines.append(f'P("control.{f}", offsetof(struct control, {f}));')
    for f in STATUS_FIELDS:
        lines.append(f'P("status.{f}", offsetof(struct status, {f}));')
    for f in protocol.KV_HEADER_OFFSETS:
        lines.append(f'P("kv_header.{f}", offsetof(struct kv_header, {f}));')
    for f in ("op_or_status", "id", "key", "value", "pad"):
        lines.append(f'P("kv_entry.{f}", offsetof(struct kv_entry, {f}));')
    lines += ['P("sizeof.control", sizeof(struct control));',
              'P("sizeof.status", sizeof(struct status));',
              'P("sizeof.kv_entry", sizeof(struct kv_entry));']
    src = tmp_path / "probe.c"
    src.write_text(
        "#include <stdio.h>\n#include <stddef.h>\n"
        f'#include "{GUEST_H}"\n'
        '#define P(n, v) printf("%s %zu\\n", n, (size_t)(v))\n'
        "int main(void) {\n" + "\n".join(lines) + "\nreturn 0; }\n")
    exe = tmp_path / "probe"
    subprocess.run(["gcc", "-O0", "-o", str(exe), str(src)], check=True, capture_output=True)
    out = dict(ln.split() for ln in subprocess.run([str(exe)], check=True, capture_output=True,
                                                   text=True).stdout.splitlines())
    got = {k: int(v) for k, v in out.items()}
    for f in CONTROL_FIELDS:
        assert got[f"control.{f}"] == CONTROL_OFFSET[f], f
    for f in STATUS_FIELDS:
        assert got[f"status.{f}"] == STATUS_OFFSET[f], f
    for f, off in protocol.KV_HEADER_OFFSETS.items():
        assert got[f"kv_header.{f}"] == off, f
    assert [got[f"kv_entry.{f}"] for f in ("op_or_status", "id", "key", "value", "pad")] == \
        [0, 4, 8, 16, 24]
    assert got["sizeof.control"] == 8 * len(CONTROL_FIELDS)
    assert got["sizeof.status"] == 8 * len(STATUS_FIELDS) <= layout.STATUS_STRIDE
    assert got["sizeof.kv_entry"] == protocol.KV_ENTRY.size


@pytest.mark.skipif(not build.toolchain_present(), reason="gcc missing")
def test_guest_splitmix64_is_protocol_splitmix64(tmp_path: Path) -> None:
    """guest.h's splitmix64 (compiled) gives the same values as protocol.splitmix64."""
    xs = [0, 1, 2, 0xDEADBEEF, M64, 1 << 63, 0x123456789ABCDEF0]
    src = tmp_path / "mix.c"
    src.write_text(
        "#include <stdio.h>\n"
        f'#include "{GUEST_H}"\n'
        "int main(void) { u64 xs[] = {" + ", ".join(f"{x:#x}UL" for x in xs) + "};\n"
        "for (unsigned i = 0; i < sizeof xs / sizeof xs[0]; i++)"
        ' printf("%lu\\n", splitmix64(xs[i])); return 0; }\n')
    exe = tmp_path / "mix"
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(src)], check=True, capture_output=True)
    got = [int(v) for v in subprocess.run([str(exe)], check=True, capture_output=True,
                                          text=True).stdout.split()]
    assert got == [splitmix64(x) for x in xs]


# --- hash chain -----------------------------------------------------------------------------------
def _mix_direct(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) % (1 << 64)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % (1 << 64)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % (1 << 64)
    return z ^ (z >> 31)


def test_splitmix64_known_values() -> None:
    # First outputs of the reference SplitMix64 generator seeded with 0 (Vigna).
    assert splitmix64(0) == 0xE220A8397B1DCDAF
    assert splitmix64(0x9E3779B97F4A7C15) == 0x6E789E6AA1B965F4
    for x in (0, 1, 12345, M64, 1 << 63):
        assert splitmix64(x) == _mix_direct(x)
        assert 0 <= splitmix64(x) <= M64


@pytest.mark.parametrize("seed", [0, 1, 42, M64])
def test_hash_chain_matches_direct_loop(seed: int) -> None:
    h = seed
    expect = [h]
    for i in range(300):
        h = splitmix64(h ^ i)
        expect.append(h)
    assert hash_chain(seed, 0) == seed
    for steps in (0, 1, 2, 7, 100, 300):
        assert hash_chain(seed, steps) == expect[steps]


def test_hash_chain_resumes_from_a_step() -> None:
    seed = 7
    full = hash_chain(seed, 5000)
    for k in (0, 1, 999, 2500, 4999, 5000):
        assert hash_chain(seed, 5000, start=(k, hash_chain(seed, k))) == full
    # Chaining segments is the same as one walk.
    i, h = 0, seed
    for nxt in (10, 11, 500, 4321, 5000):
        h = hash_chain(seed, nxt, start=(i, h))
        i = nxt
    assert h == full
    # The seed argument is ignored once a start is given.
    assert hash_chain(0, 5000, start=(2500, hash_chain(seed, 2500))) == full


def test_hash_chain_steps_are_not_commutative() -> None:
    """The step index is mixed in: h(i+1) = splitmix64(h(i) ^ i), not splitmix64(h(i))."""
    assert hash_chain(1, 2) == splitmix64(splitmix64(1 ^ 0) ^ 1)
    assert hash_chain(1, 2) != splitmix64(splitmix64(1))
