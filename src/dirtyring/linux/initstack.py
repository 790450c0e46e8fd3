"""The SysV x86-64 initial process stack: what a program finds at RSP when it starts.

From RSP upward (the psABI, section 3.4.1, as Linux's ``create_elf_tables`` lays it out)::

    rsp ->  argc
            argv[0] .. argv[argc-1], NULL
            envp[0] .. envp[n-1], NULL
            auxv: (type, value) pairs, ending with (AT_NULL, 0)
            padding to 16 bytes
            AT_RANDOM's 16 bytes, the platform string
            the argument and environment strings
    top ->  (end of the stack mapping)

RSP is 16-byte aligned at entry. glibc's static start-up reads argc/argv/envp, then the auxv:
AT_PHDR/AT_PHNUM (to find its TLS template), AT_RANDOM (stack protector and pointer guard
canaries), AT_PAGESZ, AT_HWCAP/AT_HWCAP2 (string function selection), AT_MINSIGSTKSZ, AT_SECURE,
AT_EXECFN, AT_SYSINFO_EHDR (the vDSO, when there is one).

Pure data: ``build`` returns the bytes and the address they start at; the caller writes them
into guest memory. Nothing of the host's own stack or environment leaks in unless passed.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from ..errors import ConfigError

AT_NULL, AT_PHDR, AT_PHENT, AT_PHNUM, AT_PAGESZ, AT_BASE, AT_FLAGS = 0, 3, 4, 5, 6, 7, 8
AT_ENTRY = 9
AT_UID, AT_EUID, AT_GID, AT_EGID, AT_PLATFORM, AT_HWCAP, AT_CLKTCK = 11, 12, 13, 14, 15, 16, 17
AT_SECURE, AT_RANDOM, AT_HWCAP2, AT_EXECFN, AT_SYSINFO_EHDR, AT_MINSIGSTKSZ = 23, 25, 26, 31, 33, 51

#: Linux's limit on argv + envp strings together (MAX_ARG_STRLEN is per string).
MAX_ARG_BYTES = 2 << 20
PLATFORM = b"x86_64"


@dataclass(frozen=True, slots=True)
class InitialStack:
    """The bytes to place at ``rsp`` (they end exactly at the stack's top) and where each
    pointer the program will read points."""

    rsp: int
    data: bytes
    argv: tuple[int, ...]
    envp: tuple[int, ...]
    random: int


def build(top: int, argv: list[bytes], envp: list[bytes], auxv: list[tuple[int, int]],
          random16: bytes, execfn: bytes | None = None) -> InitialStack:
    """Lay out the initial stack ending at ``top`` (exclusive). ``auxv`` holds every entry
    but AT_RANDOM, AT_PLATFORM, AT_EXECFN and AT_NULL, which this adds (their values point
    into the stack)."""
    if len(random16) != 16:
        raise ConfigError("AT_RANDOM needs exactly 16 bytes")
    if top % 16:
        raise ConfigError(f"the stack top {top:#x} is not 16-byte aligned")
    if not argv:
        raise ConfigError("a program needs at least argv[0]")
    for s in (*argv, *envp):
        if b"\0" in s:
            raise ConfigError(f"an argument or environment string contains a NUL byte: {s!r}")
    strings = [*argv, *envp]
    if sum(len(s) + 1 for s in strings) > MAX_ARG_BYTES:
        raise ConfigError(f"arguments and environment exceed {MAX_ARG_BYTES} bytes "
                          "(Linux's limit)")
    # The string area, built downward from the top: an 8-byte zero end marker, then the
    # strings (execfn first, as Linux puts the file name highest), platform, random bytes.
    area = bytearray()
    addr = top - 8

    def put(b: bytes) -> int:
        nonlocal addr
        addr -= len(b)
        area[0:0] = b
        return addr

    exec_at = put((execfn if execfn is not None else argv[0]) + b"\0")
    env_at = [put(s + b"\0") for s in reversed(envp)][::-1]
    arg_at = [put(s + b"\0") for s in reversed(argv)][::-1]
    plat_at = put(PLATFORM + b"\0")
    rand_at = put(random16)
    strings_start = addr
    aux = [*auxv, (AT_RANDOM, rand_at), (AT_PLATFORM, plat_at), (AT_EXECFN, exec_at),
           (AT_NULL, 0)]
    words = [len(argv), *arg_at, 0, *env_at, 0]
    for k, v in aux:
        words += [k, v]
    table = struct.pack(f"<{len(words)}Q", *words)
    rsp = (strings_start - len(table)) & ~15  # 16-byte aligned; the gap is zero padding
    gap = strings_start - rsp - len(table)
    data = table + bytes(gap) + bytes(area) + bytes(8)
    assert rsp + len(data) == top
    return InitialStack(rsp=rsp, data=data, argv=tuple(arg_at), envp=tuple(env_at),
                        random=rand_at)


def parse(data: bytes, rsp: int) -> tuple[list[bytes], list[bytes], dict[int, int]]:
    """Read back argc/argv/envp/auxv from stack bytes starting at ``rsp`` (as the program
    would): for tests and the ``--strace`` start line."""

    def word(addr: int) -> int:
        return struct.unpack_from("<Q", data, addr - rsp)[0]

    def cstr(addr: int) -> bytes:
        off = addr - rsp
        return data[off:data.index(b"\0", off)]

    argc = word(rsp)
    p = rsp + 8
    argv = [cstr(word(p + 8 * i)) for i in range(argc)]
    p += 8 * (argc + 1)
    envp = []
    while word(p):
        envp.append(cstr(word(p)))
        p += 8
    p += 8
    aux: dict[int, int] = {}
    while True:
        k, v = word(p), word(p + 8)
        p += 16
        if k == AT_NULL:
            return argv, envp, aux
        aux[k] = v
