"""``dirtyring serve``: the warm server (``server.py``) as a command.

It runs in the foreground, like ``redis-server``: one line on stdout when it listens (and the
client's path), a line on stderr per command it served, and it ends on SIGTERM or Ctrl-C
(commands still running go on to their end).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .commands import command_help


def add_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help=command_help("serve"),
                       description="Serve dirtyring commands from dirtyring-client without "
                                   "Python's start-up: `dirtyring-client run --exec PROG -- "
                                   "ARGS` does what `dirtyring run --exec PROG -- ARGS` does.")
    p.add_argument("--socket", type=Path, default=None,
                   help="listen here (default: $DIRTYRING_SOCKET, else "
                        "$XDG_RUNTIME_DIR/dirtyring/serve.sock, else "
                        "/tmp/dirtyring-UID/serve.sock; the client looks in the same place)")
    p.add_argument("--client", action="store_true",
                   help="only build dirtyring-client (if needed) and print its path")
    p.add_argument("--quiet", action="store_true", help="no line per command served")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .client import client_path
    from .server import default_socket, serve_main
    if args.client:
        print(client_path())
        return 0
    path = args.socket or default_socket()
    client = client_path()

    def ready(line: str) -> None:
        print(f"dirtyring serve: {line}; run commands with {client} ARGS...", flush=True)

    def log(line: str) -> None:
        if args.quiet:
            return
        try:
            print(f"dirtyring serve: {line}", file=sys.stderr, flush=True)
        except OSError:
            pass  # its terminal has gone: it serves on without a log
    return serve_main(path, ready, log)
