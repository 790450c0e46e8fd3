"""The file archive the VMM hands the library OS at start (the files the user named) and gets
back at exit (every file the program's file system holds), as libos.h describes it::

    header   u64 magic "DRFSARC1", u64 count
    entry    u32 path_len, u32 mode, u64 size, absolute path, pad to 8, data, pad to 8

``pack`` builds one; ``unpack`` reads one the guest wrote, and trusts nothing in it: a count,
length or path that cannot be right ends in one ProgramError ("the guest broke its contract:
..."), never an exception from deep inside or a read past the archive.
"""
from __future__ import annotations

import posixpath
import stat
import struct
from dataclasses import dataclass

from ..errors import ProgramError

MAGIC = int.from_bytes(b"DRFSARC1", "little")
_HEADER = struct.Struct("<QQ")
_ENTRY = struct.Struct("<IIQ")
PATH_MAX = 4096


@dataclass(frozen=True, slots=True)
class Entry:
    """One file (``data``), directory (``mode`` has S_IFDIR, no data) or symbolic link
    (S_IFLNK; ``data`` is its target) at ``path``."""

    path: str
    mode: int
    data: bytes = b""


def _pad(n: int) -> int:
    return (n + 7) & ~7


def guest_path(path: str) -> str:
    """An absolute, normalised guest path; ConfigError-free: ProgramError on a bad one."""
    if not path.startswith("/"):
        path = "/" + path
    norm = posixpath.normpath(path)
    if norm.startswith("//"):
        norm = norm[1:]
    if "\0" in norm or len(norm.encode()) >= PATH_MAX or norm == "/":
        raise ProgramError(f"{path!r} cannot name a file in the guest")
    return norm


def pack(entries: list[Entry]) -> bytes:
    """The archive of ``entries`` (paths made absolute and normalised)."""
    out = [_HEADER.pack(MAGIC, len(entries))]
    for e in entries:
        p = guest_path(e.path).encode()
        out.append(_ENTRY.pack(len(p), e.mode, len(e.data)))
        out.append(p + bytes(_pad(len(p)) - len(p)))
        out.append(e.data + bytes(_pad(len(e.data)) - len(e.data)))
    return b"".join(out)


def unpack(buf: bytes) -> list[Entry]:
    """Read an archive the guest produced; ProgramError if anything in it is impossible."""

    def broken(why: str) -> ProgramError:
        return ProgramError(f"the guest broke its contract: its file archive {why}")

    if len(buf) < _HEADER.size:
        raise broken("is shorter than its header")
    magic, count = _HEADER.unpack_from(buf)
    if magic != MAGIC:
        raise broken("has a bad magic number")
    if count > len(buf) // _ENTRY.size:
        raise broken(f"claims {count} entries in {len(buf)} bytes")
    out = []
    pos = _HEADER.size
    for i in range(count):
        if pos + _ENTRY.size > len(buf):
            raise broken(f"ends inside entry {i}")
        plen, mode, size = _ENTRY.unpack_from(buf, pos)
        pos += _ENTRY.size
        if not 0 < plen < PATH_MAX or pos + _pad(plen) + _pad(size) > len(buf):
            raise broken(f"entry {i} runs past its end (path {plen} bytes, data {size})")
        try:
            path = buf[pos:pos + plen].decode()
        except UnicodeDecodeError:
            raise broken(f"entry {i} has a path that is not UTF-8") from None
        if not path.startswith("/") or "\0" in path:
            raise broken(f"entry {i} has a bad path {path[:80]!r}")
        pos += _pad(plen)
        if stat.S_ISDIR(mode) and size:
            raise broken(f"directory {path!r} has data")
        if stat.S_ISLNK(mode) and not 0 < size < PATH_MAX:
            raise broken(f"symbolic link {path!r} has a target of {size} bytes")
        if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
            raise broken(f"entry {path!r} is neither a file, a directory nor a symbolic link")
        out.append(Entry(path, mode, bytes(buf[pos:pos + size])))
        pos += _pad(size)
    return out
