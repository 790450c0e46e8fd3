"""``python -m dirtyring.bench harvest|exits`` (the same as ``dirtyring bench …``)."""
from __future__ import annotations

import argparse
import sys

from . import register


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dirtyring.bench")
    register(p.add_subparsers(dest="bench", metavar="BENCH", required=True))
    args = p.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
