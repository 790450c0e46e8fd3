"""The committed guest binaries are exactly what the committed sources build into, and the
loader finds (or clearly refuses) them."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import dirtyring.guests as guests
from dirtyring.errors import GuestError
from dirtyring.guests import build
from dirtyring.machine import layout

SRC = Path(guests.__file__).resolve().parent
BIN = SRC / "bin"

needs_toolchain = pytest.mark.skipif(not build.toolchain_present(),
                                     reason="gcc/objcopy/objdump missing: cannot rebuild guests")


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    if not build.toolchain_present():
        pytest.skip("gcc/objcopy/objdump missing: cannot rebuild guests")
    out = tmp_path_factory.mktemp("guest-bin")
    paths = build.build_all(out)
    return {p.stem: p.read_bytes() for p in paths}


def test_guest_lists_agree() -> None:
    assert tuple(build.GUESTS) == tuple(guests.NAMES)
    committed = sorted(p.stem for p in BIN.glob("*.bin"))
    assert committed == sorted(guests.NAMES)
    for name in guests.NAMES:
        assert (SRC / f"{name}.c").is_file()


@needs_toolchain
@pytest.mark.parametrize("name", guests.NAMES)
def test_committed_binary_matches_sources(rebuilt: dict[str, bytes], name: str) -> None:
    committed = (BIN / f"{name}.bin").read_bytes()
    fresh = rebuilt[name]
    assert len(fresh) == len(committed), (
        f"{name}.bin: rebuilt {len(fresh)} bytes, committed {len(committed)}; "
        "run `python -m dirtyring.guests.build`")
    first_diff = next((i for i, (a, b) in enumerate(zip(fresh, committed)) if a != b), None)
    assert first_diff is None, (
        f"{name}.bin differs from a rebuild at byte {first_diff:#x}; "
        "run `python -m dirtyring.guests.build`")


@needs_toolchain
def test_build_outputs_are_flat_images_that_fit(rebuilt: dict[str, bytes]) -> None:
    assert set(rebuilt) == set(guests.NAMES)
    for name, code in rebuilt.items():
        assert 0 < len(code) <= layout.CODE_LIMIT - layout.CODE_GPA, name
        # _start is `call guest_main` (e8 rel32) at the load address.
        assert code[0] == 0xE8, f"{name}: image does not start with _start's call"


def test_load_guest_returns_committed_bytes() -> None:
    for name in guests.NAMES:
        assert guests.load_guest(name) == (BIN / f"{name}.bin").read_bytes()


def test_load_guest_unknown_name_is_a_clear_guest_error() -> None:
    with pytest.raises(GuestError) as ei:
        guests.load_guest("no-such-guest")
    msg = str(ei.value)
    assert "no-such-guest" in msg
    assert "unknown guest" in msg
    for name in guests.NAMES:
        assert name in msg  # tells the user what exists


@pytest.mark.parametrize("bad", ["", "../compute", "compute.bin", "Compute"])
def test_load_guest_rejects_names_that_are_not_guests(bad: str) -> None:
    with pytest.raises(GuestError, match="unknown guest"):
        guests.load_guest(bad)


def test_linker_script_matches_layout() -> None:
    ld = (SRC / "guest.ld").read_text()
    addrs = [int(x, 16) for x in re.findall(r"\.\s*=\s*(0x[0-9a-fA-F]+)\s*;", ld)]
    assert addrs == [layout.CODE_GPA, layout.BSS_GPA]
    assert re.search(r"ENTRY\(_start\)", ld)
    start = (SRC / "start.S").read_text()
    # The fallback after guest_main returns signals PORT_DONE.
    m = re.search(r"outl\s+%eax,\s*\$(0x[0-9a-fA-F]+)", start)
    assert m and int(m.group(1), 16) == int(guests.Port.DONE)


@needs_toolchain
def test_build_refuses_initialised_writable_data(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The loader copies one flat image, so a guest with .data must be refused by the build."""
    src = tmp_path / "src"
    src.mkdir()
    for f in ("guest.h", "guest.ld", "start.S"):
        (src / f).write_bytes((SRC / f).read_bytes())
    (src / "bad.c").write_text(
        '#include "guest.h"\n'
        "u64 counter = 5;\n"
        "void guest_main(u64 idx) { counter += idx; done((u32)counter); }\n")
    monkeypatch.setattr(build, "SRC", src)
    with pytest.raises(GuestError, match=r"\.data"):
        build.build_one("bad", tmp_path)
