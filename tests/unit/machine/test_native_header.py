"""Check ``machine/native.py`` against ``machine/native.h``, the header native.c includes.

As ``_uapi`` is checked against linux/kvm.h (tests/unit/bindings/test_bindings_uapi.py): a C
program generated here includes native.h and prints ``sizeof``/``_Alignof`` of every struct,
``offsetof`` and member size of every field, and the value of every constant; each must equal
what native.py's ctypes mirrors and constants say. Every struct and ``DR_*`` constant the header
declares must be in the tables below, so nothing added to one side goes unchecked.

Also here: the helper's cache key covers the header, the header ships with the package, and
importing the package compiles nothing.
"""
from __future__ import annotations

import ctypes as C
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dirtyring.machine import native
from dirtyring.machine.exits import BATCH_STOPS

HEADER = Path(native.__file__).with_name("native.h")
ROOT = Path(__file__).resolve().parents[3]

#: native.h struct -> native.py's ctypes mirror (same member names).
STRUCTS: dict[str, type[C.Structure]] = {
    "dr_op": native._Op,
    "dr_same": native._Same,
    "dr_gather": native._Gather,
    "dr_copy": native._Copy,
    "dr_program": native._Program,
    "dr_batch": native._Batch,
}

#: native.h constant -> native.py's value.
CONSTANTS: dict[str, int] = {
    "DR_PAGE": native.PAGE,
    "DR_DELTA_WORDS": native.DELTA_WORDS,
    "DR_OP_TSC": native._TSC_OP,
    "DR_PROGRAM_DONE": native.PROGRAM_DONE,
    "DR_PROGRAM_CHANGED": native.PROGRAM_CHANGED,
    "DR_PROGRAM_BAD_PAGE": native.PROGRAM_BAD_PAGE,
    "DR_MAX_BATCH": native.MAX_BATCH,
    "DR_VMM_WROTE": native.VMM_WROTE,
    "DR_NO_TSC_OFFSET": native.NO_TSC_OFFSET,
    **{f"DR_{w.name}": int(w) for w in native.BatchWhy},
}


def py_fields(cls: type[C.Structure]) -> list[tuple[str, int, int]]:
    """(name, offset, size) of each field (the mirrors have no nested structs)."""
    return [(name, getattr(cls, name).offset, getattr(cls, name).size)
            for name, *_ in cls._fields_]  # type: ignore[attr-defined]


def header_names() -> tuple[set[str], set[str]]:
    """The structs and DR_* constants (defines and enumerators) native.h declares."""
    text = re.sub(r"/\*.*?\*/", "", HEADER.read_text(), flags=re.S)
    structs = set(re.findall(r"\bstruct\s+(dr_\w+)\s*\{", text))
    consts = set(re.findall(r"#define\s+(DR_\w+)\s", text))
    for body in re.findall(r"\benum\s*\{(.*?)\}", text, flags=re.S):
        consts |= set(re.findall(r"\b(DR_\w+)\s*=", body))
    return structs, consts


def generate_c() -> str:
    lines = ["#include <stdio.h>", "#include <stddef.h>", '#include "native.h"',
             "#define MEMBER_SIZE(T, m) sizeof(((T *)0)->m)", "int main(void) {"]
    for name, cls in STRUCTS.items():
        t = f"struct {name}"
        lines.append(f'  printf("size {name} %zu %zu\\n", sizeof({t}), _Alignof({t}));')
        for field, _, _ in py_fields(cls):
            lines.append(f'  printf("field {name} {field} %zu %zu\\n", offsetof({t}, {field}), '
                         f"MEMBER_SIZE({t}, {field}));")
    for name in sorted(CONSTANTS):
        lines.append(f'  printf("const {name} %lld\\n", (long long)({name}));')
    lines += ["  return 0;", "}"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def facts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, ...]]:
    """What the header says, compiled and printed. No compiler is a failure, not a skip:
    gcc is part of every machine of this project (docs/platform.md)."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.fail("no C compiler (Debian: apt-get install gcc libc6-dev): the check of "
                    "native.py against native.h cannot run", pytrace=False)
    d = tmp_path_factory.mktemp("native_h")
    src, exe = d / "native_h_check.c", d / "native_h_check"
    src.write_text(generate_c())
    cc = subprocess.run([gcc, "-std=gnu11", "-O0", "-I", str(HEADER.parent), "-o", str(exe),
                         str(src)], capture_output=True, text=True)
    if cc.returncode != 0:
        pytest.fail(f"compiling {src} failed:\n{cc.stderr}", pytrace=False)
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    got: dict[str, tuple[int, ...]] = {}
    for line in out.splitlines():
        kind, *rest = line.split()
        if kind == "field":
            got[f"{rest[0]}.{rest[1]}"] = (int(rest[2]), int(rest[3]))
        else:
            got[rest[0]] = tuple(int(x) for x in rest[1:])
    return got


@pytest.mark.parametrize("name", sorted(STRUCTS))
def test_struct_layout(facts: dict[str, tuple[int, ...]], name: str) -> None:
    cls = STRUCTS[name]
    assert (C.sizeof(cls), C.alignment(cls)) == facts[name], f"sizeof/_Alignof(struct {name})"
    wrong = [f"{field}: ours offset {off} size {size}, C {facts[f'{name}.{field}']}"
             for field, off, size in py_fields(cls) if (off, size) != facts[f"{name}.{field}"]]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("name", sorted(CONSTANTS))
def test_constant_value(facts: dict[str, tuple[int, ...]], name: str) -> None:
    assert facts[name] == (CONSTANTS[name],), f"{name}: ours {CONSTANTS[name]}, C {facts[name]}"


def test_everything_the_header_declares_is_checked() -> None:
    structs, consts = header_names()
    assert structs == set(STRUCTS), "a struct of native.h without its check here (or gone)"
    assert consts == set(CONSTANTS), "a DR_* constant of native.h without its check here"


def test_every_ctypes_mirror_is_checked() -> None:
    ours = {v for v in vars(native).values()
            if isinstance(v, type) and issubclass(v, C.Structure)}
    assert ours == set(STRUCTS.values())


def test_every_batch_result_reads_as_a_stop_reason() -> None:
    """The C path's results map onto StopReason in one table (exits.BATCH_STOPS)."""
    assert set(BATCH_STOPS) == set(native.BatchWhy)
    assert [w for w, stop in BATCH_STOPS.items() if stop is None] == \
        [native.PROGRAM_FAILED, native.RUN_FAILED]  # the errors: raised, never returned


# --- building ----------------------------------------------------------------------------------

def test_the_cache_key_covers_the_header(monkeypatch: pytest.MonkeyPatch,
                                         tmp_path: Path) -> None:
    key = native._source_key()
    changed = tmp_path / "native.h"
    changed.write_bytes(HEADER.read_bytes() + b"/* changed */\n")
    monkeypatch.setattr(native, "_HEADER", changed)
    assert native._source_key() != key


def test_the_header_ships_with_the_package() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    data = re.search(r"\[tool\.setuptools\.package-data\]\s*dirtyring\s*=\s*\[(.*?)\]", text,
                     flags=re.S)
    assert data is not None
    patterns = re.findall(r'"([^"]+)"', data.group(1))
    assert "machine/*.c" in patterns and "machine/*.h" in patterns


_IMPORT_ALL = """
import importlib, os, pkgutil, sys
from dirtyring.machine import native
# This tree's package only (an installed copy elsewhere may add modules to the namespace).
here = os.path.dirname(os.path.dirname(native.__file__))
for m in pkgutil.walk_packages([here], "dirtyring."):
    try:
        importlib.import_module(m.name)
    except ModuleNotFoundError as e:  # an optional third-party package
        if (e.name or "").startswith("dirtyring"):
            raise
assert "dirtyring.machine.vm" in sys.modules and "dirtyring.cli.main" in sys.modules
print("gcc-ran" if os.path.exists(os.environ["GCC_LOG"]) else "no-gcc",
      "loaded" if native._LOADED else "not-loaded")
print(native.backend())  # the first use: now it builds (with our stand-in gcc, fails)
"""


def test_importing_compiles_nothing(tmp_path: Path) -> None:
    """Importing every module runs no compiler and leaves no helper in any cache; the first
    use of a native path does build it (here with a stand-in gcc that records its calls and
    fails, so the fallback is taken)."""
    bin_dir, cache, tmp = tmp_path / "bin", tmp_path / "cache", tmp_path / "tmp"
    for d in (bin_dir, cache, tmp):
        d.mkdir()
    log = tmp_path / "gcc.log"
    gcc = bin_dir / "gcc"
    gcc.write_text(f'#!/bin/sh\necho "$@" >> {log}\nexit 1\n')
    gcc.chmod(0o755)
    env = {**os.environ, "PATH": str(bin_dir), "XDG_CACHE_HOME": str(cache),
           "TMPDIR": str(tmp), "GCC_LOG": str(log),
           "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    p = subprocess.run([sys.executable, "-c", _IMPORT_ALL], env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    after_import, backend = p.stdout.split()[:2], p.stdout.split()[-1]
    assert after_import == ["no-gcc", "not-loaded"], p.stdout
    assert backend == "numpy"
    assert log.exists() and "native.c" in log.read_text(), "the first use ran no gcc"
    assert not list(cache.rglob("*.so")) and not list(tmp.rglob("*.so"))
