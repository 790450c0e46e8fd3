"""--strace's formatting: names, decoded arguments, errors as strace prints them."""
from __future__ import annotations

from dirtyring.linux.strace import format_call

M64 = (1 << 64) - 1


def _read(va: int) -> str | None:
    return {0x1000: "/tmp/a", 0x2000: 'a "quoted"\nname'}.get(va)


def test_paths_descriptors_modes_and_results() -> None:
    assert format_call(257, ((-100) & M64, 0x1000, 0x42, 0o600, 0, 0), 3, _read) == \
        'openat(AT_FDCWD, "/tmp/a", 0x42, 0600) = 3'
    assert format_call(1, (1, 0x7FFE0000, 64, 0, 0, 0), 64, _read) == \
        "write(1, 0x7ffe0000, 64) = 64"
    assert format_call(83, (0x2000, 0o755, 0, 0, 0, 0), -17 & M64, _read) == \
        'mkdir("a \\"quoted\\"\\nname", 0755) = -1 EEXIST (File exists)'
    assert format_call(12, (0, 0, 0, 0, 0, 0), 0x4AD000, _read) == "brk(0) = 0x4ad000"


def test_unknown_pointers_and_syscalls() -> None:
    assert format_call(2, (0xDEAD, 0, 0, 0, 0, 0), -14 & M64, _read).startswith(
        "open(0xdead, 0, 00) = -1 EFAULT")
    assert format_call(999, (1, 2, 3, 4, 5, 6), -38 & M64, _read) == \
        "syscall 999(0x1, 0x2, 0x3, 0x4, 0x5, 0x6) = -1 ENOSYS (Function not implemented)"


def test_links_modes_and_waits() -> None:
    assert format_call(266, (0x1000, (-100) & M64, 0x2000, 0, 0, 0), 0, _read) == \
        'symlinkat("/tmp/a", AT_FDCWD, "a \\"quoted\\"\\nname") = 0'
    assert format_call(90, (0x1000, 0o600, 0, 0, 0, 0), 0, _read) == 'chmod("/tmp/a", 0600) = 0'
    assert format_call(7, (0x7FFE0000, 2, -1 & M64, 0, 0, 0), 1, _read) == \
        "poll(0x7ffe0000, 2, -1) = 1"
