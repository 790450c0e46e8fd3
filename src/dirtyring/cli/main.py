"""``dirtyring``: entry point. Every user mistake ends as one clear line, never a traceback."""
from __future__ import annotations

import faulthandler
import signal

import argparse
import importlib
import sys

from ..errors import DirtyringError
from .commands import COMMANDS
from .options import resolve_memory


BENCH_HELP = "benchmarks (JSON + PNG out)"


def command_name(argv: list[str]) -> str | None:
    """The subcommand ``argv`` names (its first word that is not an option), if any: the
    top-level parser has only flags (--help, --version), so that word is the command."""
    return next((a for a in argv if not a.startswith("-")), None)


def version() -> str:
    """The installed package's version (its metadata), or "unknown" when it is not installed."""
    import importlib.metadata  # ~12 ms: only when --version is asked for
    try:
        return importlib.metadata.version("dirtyring")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class _VersionAction(argparse.Action):
    """``--version``, reading the package metadata only when asked (argparse's own "version"
    action needs the string when the parser is built, i.e. on every command)."""

    def __init__(self, option_strings: list[str], dest: str, **kw: object) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         **kw)  # type: ignore[arg-type]

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        print(f"dirtyring {version()}")
        parser.exit()


def build_parser(*, bench_commands: bool = True,
                 command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line. ``bench_commands=False`` leaves ``bench``'s subcommands out
    (``bench`` itself stays, with its help line): ``main`` does that for every other command,
    because importing the benchmarks cost ~32 ms of a ~40 ms start-up here. Likewise
    ``command`` (one of ``commands.COMMANDS``) imports only the module that defines it; the
    other commands are listed by name and help line alone (they cannot be parsed then)."""
    p = argparse.ArgumentParser(
        prog="dirtyring",
        description="Checkpoint KVM guests thousands of times a second with KVM's dirty ring.")
    p.add_argument("--version", action=_VersionAction, help="print the version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    wanted = COMMANDS[command][0] if command in COMMANDS else None
    for module in dict.fromkeys(m for m, _ in COMMANDS.values()):
        if wanted is None or module == wanted:
            mod = importlib.import_module(f"{__package__}.{module}")
            (getattr(mod, "add_parsers", None) or mod.add_parser)(sub)
        else:
            for name, (m, help_line) in COMMANDS.items():
                if m == module:
                    sub.add_parser(name, help=help_line)
    if not bench_commands:
        sub.add_parser("bench", help=BENCH_HELP)
        return p
    try:
        from .. import bench
    except ImportError:
        bench = None  # type: ignore[assignment]
    if bench is not None:
        bp = sub.add_parser("bench", help=BENCH_HELP)
        bsub = bp.add_subparsers(dest="bench", metavar="BENCH", required=True)
        bench.register(bsub)
        from ..bench import replicate as bench_replicate
        from ..bench import failover as bench_failover
        from ..bench import migrate as bench_migrate
        from ..bench import rollback as bench_rollback
        from ..bench import exec as bench_exec
        bench_replicate.add_parser(bsub)
        bench_failover.add_parser(bsub)
        bench_migrate.add_parser(bsub)
        bench_rollback.add_parser(bsub)
        bench_exec.add_parser(bsub)
    return p


_PARSERS: dict[str | None, argparse.ArgumentParser] = {}


def _parser(command: str | None) -> argparse.ArgumentParser:
    """``build_parser`` for ``command``, built once per process: a warm server's workers
    (``server.py``) then find it built (it costs ~1-3 ms, mostly argparse's gettext lookups),
    and parsing never changes a parser."""
    if command not in _PARSERS:
        _PARSERS[command] = build_parser(bench_commands=command in (None, "bench"),
                                         command=command)
    return _PARSERS[command]


def main(argv: list[str] | None = None) -> int:
    # `kill -USR2 PID` prints every thread's Python stack to stderr: how a stuck process is
    # diagnosed in the field (SIGUSR1 kicks vCPUs, SIGALRM ends inline epochs).
    faulthandler.register(signal.SIGUSR2, all_threads=True)
    argv = list(sys.argv[1:] if argv is None else argv)
    command = command_name(argv)
    parser = _parser(command)
    # Everything after the first "--" is the --exec program's own arguments. Split here, not
    # by argparse: a command with a positional of its own (snapshot DIR, protect ADDR) would
    # otherwise take them for another positional.
    program_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, program_args = argv[:i], argv[i + 1:]
    args = parser.parse_args(argv)
    resolve_memory(args)
    if program_args:
        if not hasattr(args, "args"):
            parser.error("only commands that take --exec PROGRAM accept arguments after --")
        args.args = [*args.args, *program_args]
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except DirtyringError as e:
        print(f"dirtyring: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dirtyring: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
