"""The VMM side of the guest programs' protocol; mirrors ``guest.h`` (a test compares them).

Guests: ``dirtier`` (writes the control page's iteration into data pages by pattern),
``compute`` (a verifiable hash chain), ``kvstore`` (a key-value table served through a
shared-memory request/response device with a doorbell port). Each vCPU has a status block.
"""
from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

CONTROL_MAGIC = int.from_bytes(b"DRGUEST1", "little")

# Control page field offsets (u64 each).
CONTROL_FIELDS = ("magic", "data_gpa", "data_pages", "pattern", "hot_pages", "rate_pps",
                  "tsc_khz", "seed", "iteration", "nr_vcpus", "exit_every", "report_every",
                  "stop", "max_writes", "stride")
CONTROL_OFFSET = {name: 8 * i for i, name in enumerate(CONTROL_FIELDS)}
STATUS_FIELDS = ("progress", "passes", "report_i", "report_h", "hash", "step")
STATUS_OFFSET = {name: 8 * i for i, name in enumerate(STATUS_FIELDS)}


class Port(enum.IntEnum):
    DONE = 0x10
    CONSOLE = 0x11
    REPORT = 0x12
    TICK = 0x13
    KV_WAIT = 0x20
    KV_DONE = 0x21


class LibosPort(enum.IntEnum):
    """Ports only the library OS uses (dirtyring/linux/guest/libos.h); it also uses DONE."""

    STDIO_FLUSH = 0x30
    UNSUPPORTED = 0x31
    FAULT = 0x32
    EXPORT = 0x33
    TRACE_FLUSH = 0x34
    STDIN_WAIT = 0x35
    ENTROPY = 0x36
    SIGNAL_WAIT = 0x37


class Pattern(enum.IntEnum):
    """How the dirtier guest picks the pages it writes: in order, at random, or within a hot
    set of ``hot_pages`` pages.

    Example::

        dirtyring.GuestParams(pattern=dirtyring.Pattern.HOT, hot_pages=64)
    """

    SEQUENTIAL = 0
    RANDOM = 1
    HOT = 2


# Key-value device.
KV_RING = 128
KV_PUT, KV_GET = 1, 2
KV_OK, KV_NOT_FOUND, KV_FULL, KV_BAD_OP = 0, 1, 2, 3
KV_HEADER_OFFSETS = {"req_prod": 0, "req_cons": 64, "resp_prod": 128, "resp_cons": 192}
KV_REQ_OFFSET = 0x1000   # from QUEUE_GPA
KV_RESP_OFFSET = 0x2000
KV_ENTRY = struct.Struct("<IIQQQ")  # op_or_status, id, key, value, pad

# The library OS's stdio queue (dirtyring/linux/guest/libos.h): a header page at QUEUE_GPA
# (prod at +0, cons at +64), then a ring of records (u32 fd, u32 len, payload padded to 8).
STDIO_RING_OFFSET = 0x1000  # from QUEUE_GPA
STDIO_RING = 0x8000
STDIO_MAX_RECORD = 0x1000
STDIO_HEADER_OFFSETS = {"prod": 0, "cons": 64, "export_va": 128, "export_len": 136,
                        "trace_prod": 144, "trace_cons": 152, "stdin_prod": 160,
                        "stdin_cons": 168, "stdin_eof": 176, "entropy_used": 184}
# getrandom's pool (libos.h ENTROPY_*): the VMM fills it from the host's entropy.
ENTROPY_OFFSET = 0xC00  # from QUEUE_GPA, in the header page
ENTROPY_POOL = 0x400
# Signals sent to a Linux program from outside (libos.h struct ext_signals), in the header
# page: u64 pending (bit sig - 1), u64 entry (where the VMM sends an interrupted program), u64
# forwarding (nonzero: the VMM forwards signals), then the interrupted registers (r8 ... r15,
# rdi, rsi, rbp, rbx, rdx, rax, rcx, rsp, rip, eflags).
EXT_SIGNALS_OFFSET = 0x900  # from QUEUE_GPA
# --strace's ring: records of {u64 nr, u64 args[6], s64 ret} after the stdio ring.
TRACE_OFFSET = 0x9000  # from QUEUE_GPA
TRACE_RECORDS = 192
# stdin: a byte ring the VMM fills, after the trace ring, to the queue area's end.
STDIN_OFFSET = 0xC000  # from QUEUE_GPA
STDIN_RING = 0x4000
TRACE_RECORD = struct.Struct("<7Qq")
STDIO_RECORD = struct.Struct("<II")  # fd (0 = padding to the ring's end), len


@dataclass(frozen=True, slots=True, kw_only=True)
class GuestParams:
    """What the VMM writes into the control page before the guest starts.

    Example::

        params = dirtyring.GuestParams(pattern=dirtyring.Pattern.RANDOM, seed=7, max_writes=500)
        cfg = dirtyring.MachineConfig(guest="dirtier", params=params)
    """

    pattern: Pattern = Pattern.RANDOM
    hot_pages: int = 64
    rate_pps: int = 0
    seed: int = 1
    exit_every: int = 0
    report_every: int = 100_000
    max_writes: int = 0
    stride: int = 1


def splitmix64(x: int) -> int:
    m = (1 << 64) - 1
    x = (x + 0x9E3779B97F4A7C15) & m
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
    return x ^ (x >> 31)


def hash_chain(seed: int, steps: int, start: tuple[int, int] | None = None) -> int:
    """The compute guest's chain value after ``steps`` steps (optionally from (step, hash))."""
    i, h = start if start else (0, seed)
    for k in range(i, steps):
        h = splitmix64(h ^ k)
    return h
