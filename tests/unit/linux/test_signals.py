"""The VMM's reading of how a Linux program ended (linux/signals.py) and the library OS's
fault codes: every value comes from the guest and is checked."""
from __future__ import annotations

import re

import pytest

from dirtyring.linux import build
from dirtyring.linux.signals import end_report, killed_by, killed_line, signal_name
from dirtyring.machine.devices.stdio import FAULTS


def _done_killed(sig: int) -> int:  # libos.h DONE_KILLED
    return (sig << 8) | (128 + sig)


@pytest.mark.parametrize("status", [0, 1, 3, 127, 134, 255])
def test_an_exit_status_is_not_a_signal(status: int) -> None:
    assert killed_by(status) is None and end_report(status) is None
    assert killed_by(None) is None


@pytest.mark.parametrize("sig", [1, 6, 9, 11, 15, 31, 32, 64])
def test_done_killed_names_its_signal(sig: int) -> None:
    v = _done_killed(sig)
    assert killed_by(v) == sig and v & 0xFF == 128 + sig
    assert end_report(v) == killed_line(sig)


@pytest.mark.parametrize("value", [
    (6 << 8) | 134 + 1,           # the two halves disagree
    (6 << 8) | 6,
    (65 << 8) | (128 + 65) & 0xFF,  # no signal 65
    (0 << 8) | 0x100,
    0x1_0000 | _done_killed(6),    # bits above the signal
    -1,
])
def test_an_impossible_done_value_is_refused(value: int) -> None:
    with pytest.raises(ValueError, match="neither an exit status nor a signal"):
        killed_by(value)
    assert "neither" in (end_report(value) or "")


def test_names() -> None:
    assert signal_name(6) == "SIGABRT" and signal_name(15) == "SIGTERM"
    assert signal_name(34) == "SIGRT34"
    assert killed_line(6) == "the program was killed by signal 6 (SIGABRT)"


def test_libos_h_agrees() -> None:
    text = (build.SRC / "libos.h").read_text()
    m = re.search(r"#define DONE_KILLED\(sig\) \(\(\(u32\)\(sig\) << 8\) \| \(128U \+ \(u32\)\(sig\)\)\)",
                  text)
    assert m, "DONE_KILLED's formula changed: update linux/signals.py"
    codes = {int(v) for v in re.findall(r"^#define FAULT_\w+ (\d+)", text, re.M)}
    assert codes == set(FAULTS)
    assert "proc.c" in build.SOURCES
