"""Argument parsing helpers shared by subcommands: sizes, durations, choices with clear errors."""
from __future__ import annotations

import argparse
import re
from typing import Any

from ..guests.protocol import Pattern
from ..tracking import KINDS

_UNITS = {"": 1 << 20, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20,
          "g": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tib": 1 << 40}


def size(text: str) -> int:
    """'64M', '4GiB', '512k' or a bare number of MiB -> bytes (a multiple of 4 KiB)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (try 64M, 4G, 512k)")
    n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0 or n % 4096:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive multiple of 4 KiB")
    return n


def duration(text: str) -> float:
    """'250us', '2ms', '1.5s' or a bare number of milliseconds -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(us|µs|ms|s|)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (try 500us, 2ms, 1s)")
    scale = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "": 1e-3}[m.group(2)]
    return float(m.group(1)) * scale


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return v


#: A built-in guest's data memory when --memory is not given.
BUILTIN_MEMORY = 64 << 20


def resolve_memory(args: argparse.Namespace) -> None:
    """--memory's default, which depends on the guest: a built-in guest's data memory, or a
    program's address space (``LinuxProgram``'s default: sparse, so generous)."""
    if getattr(args, "memory", "absent") is None:
        if getattr(args, "exec", None):
            from ..linux.program import DEFAULT_MEMORY
            args.memory = DEFAULT_MEMORY
        else:
            args.memory = BUILTIN_MEMORY


def add_guest_options(p: argparse.ArgumentParser, *, rate: bool = True,
                      tracker_help: str | None = None) -> None:
    """The options that shape a guest and its tracking, the same for run, protect and
    snapshot: --tracker, --vcpus, --memory, --pattern, --hot-pages (and --rate).

    ``tracker_help``: run's own --tracker, which may also be "none" and whose default depends
    on the guest (so it is left None here and chosen by the command)."""
    if tracker_help is None:
        p.add_argument("--tracker", choices=KINDS, default="ring",
                       help="dirty page tracker (default ring)")
    else:
        p.add_argument("--tracker", choices=(*KINDS, "none"), default=None, help=tracker_help)
    p.add_argument("--vcpus", type=positive_int, default=1, help="number of vCPUs (default 1)")
    p.add_argument("--memory", type=size, default=None, metavar="SIZE",
                   help="guest data memory (default 64M; with --exec, the program's address "
                        "space: 1G, which costs nothing until the program uses it)")
    p.add_argument("--pattern", choices=[x.name.lower() for x in Pattern], default="hot",
                   help="dirtier write pattern (default hot)")
    p.add_argument("--hot-pages", type=positive_int, default=64, metavar="PAGES",
                   help="pages the hot pattern writes to (default 64)")
    if rate:
        p.add_argument("--rate", type=int, default=0, metavar="PAGES_PER_S",
                       help="dirtier page writes per second per vCPU (default 0: unlimited)")


def add_metrics_option(p: argparse.ArgumentParser) -> None:
    """``--metrics HOST:PORT``: protect, standby, migrate and receive."""
    p.add_argument("--metrics", metavar="HOST:PORT",
                   help="serve Prometheus metrics (text format, on /metrics) on HOST:PORT, "
                        "e.g. 127.0.0.1:9464 (default: off)")


def start_metrics(spec: str | None) -> Any:
    """The ``--metrics`` endpoint, started (None without the option). A bad or busy address
    is a DirtyringError (one line). prometheus_client is imported only when asked for."""
    if not spec:
        return None
    from ..replication.metrics import MetricsServer
    from ..replication.transport import parse_addr
    return MetricsServer(parse_addr(spec))
