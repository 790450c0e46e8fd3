"""Benchmarks: ``dirtyring bench harvest|exits`` (JSON records + PNG plots).

``register(subparsers)`` adds the subcommands to an argparse subparsers object; each one's
handler is ``args.func(args) -> int``. The measurements are importable on their own:
``harvest.run(matrix)`` and ``exits.run(params)`` return lists of ``records.Record``.
"""
from __future__ import annotations

from .commands import exits_command, harvest_command, register
from .records import BenchError, Record

__all__ = ["register", "harvest_command", "exits_command", "Record", "BenchError"]
