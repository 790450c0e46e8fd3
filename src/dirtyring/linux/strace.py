"""``--strace``: the program's system calls, one line each, as strace prints them.

The library OS writes a record of every call (number, six arguments, result) into a trace ring
in guest memory as it returns, so tracing costs no exit per call (only one when the ring fills
between two epochs' drains). The VMM formats them here. Paths are read from guest memory when
the record is drained, through the address-space plan (a bad pointer prints as its address):
a program that rewrote the buffer in between shows the new contents.
"""
from __future__ import annotations

import errno
import os
from collections.abc import Callable

from .syscall_names import name

#: Argument kinds per syscall: d = descriptor/int, s = path string, x = hex, u = unsigned.
#: Anything not listed prints its six arguments in hex.
KINDS: dict[str, str] = {
    "read": "dxu", "write": "dxu", "open": "sxo", "close": "d", "stat": "sx", "fstat": "dx",
    "lstat": "sx", "lseek": "ddd", "mmap": "xuxxdx", "mprotect": "xux", "munmap": "xu",
    "brk": "x", "pread64": "dxud", "pwrite64": "dxud", "readv": "dxu", "writev": "dxu",
    "access": "so", "pipe": "x", "dup": "d", "dup2": "dd", "getpid": "", "exit": "d",
    "uname": "x", "fcntl": "ddx", "fsync": "d", "fdatasync": "d", "truncate": "su",
    "ftruncate": "du", "getcwd": "xu", "chdir": "s", "rename": "ss", "mkdir": "so",
    "rmdir": "s", "unlink": "s", "readlink": "sxu", "umask": "o", "arch_prctl": "xx",
    "getdents64": "dxu", "set_tid_address": "x", "clock_gettime": "dx", "exit_group": "d",
    "openat": "Dsxo", "mkdirat": "Dso", "newfstatat": "Dsxx", "unlinkat": "Dsx",
    "renameat": "DsDs", "faccessat": "Dso", "pipe2": "xx", "dup3": "ddx", "prlimit64": "ddxx",
    "getrandom": "xux", "statx": "Dsxxx", "renameat2": "DsDsx", "mremap": "xuuxx",
    "madvise": "xud", "set_robust_list": "xu", "rseq": "xuxx", "ioctl": "dxx",
    "readlinkat": "Dsxu", "prctl": "dx", "sysinfo": "x", "gettid": "", "getuid": "",
    "geteuid": "", "getgid": "", "getegid": "", "getppid": "", "time": "x",
    "gettimeofday": "xx", "symlink": "ss", "symlinkat": "sDs", "link": "ss",
    "linkat": "DsDsx", "chmod": "so", "fchmod": "do", "fchmodat": "Dso", "chown": "sdd",
    "lchown": "sdd", "fchown": "ddd", "utimensat": "Dsxx", "sync": "", "syncfs": "d",
    "poll": "xud", "ppoll": "xuxxu", "select": "dxxxx", "pselect6": "dxxxxx",
}
AT_FDCWD = -100


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _int(v: int) -> int:
    """A C int argument (descriptors, flags): the low 32 bits, signed."""
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


def format_call(nr: int, args: tuple[int, ...], ret: int,
                read_str: Callable[[int], str | None]) -> str:
    """``openat(AT_FDCWD, "/tmp/a", 0x42, 0600) = 3``; errors as ``= -1 ENOENT (...)``."""
    n = name(nr)
    kinds = KINDS.get(n)
    shown = []
    for i, kind in enumerate(kinds if kinds is not None else "xxxxxx"):
        v = args[i]
        if kind == "d":
            shown.append(str(_int(v)))
        elif kind == "D":
            shown.append("AT_FDCWD" if _int(v) == AT_FDCWD else str(_int(v)))
        elif kind == "s":
            text = read_str(v)
            shown.append(f"{v:#x}" if text is None else _quote(text))
        elif kind == "o":
            shown.append(f"0{v:o}")
        elif kind == "u":
            shown.append(str(v))
        else:
            shown.append(f"{v:#x}" if v else "0")
    r = _signed(ret)
    if -4096 < r < 0:
        code = errno.errorcode.get(-r, str(-r))
        result = f"-1 {code} ({os.strerror(-r)})"
    elif n in ("mmap", "brk", "mremap"):
        result = f"{r:#x}"
    else:
        result = str(r)
    return f"{n}({', '.join(shown)}) = {result}"


def _quote(text: str, limit: int = 64) -> str:
    body = text[:limit].encode("unicode_escape").decode().replace('"', '\\"')
    return f'"{body}"' + ("..." if len(text) > limit else "")
