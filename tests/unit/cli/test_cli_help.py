"""Every argument of every command has a help text that states its default; --version works."""
from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys
from collections.abc import Iterator

import pytest

from dirtyring.cli.main import build_parser, version


def walk(parser: argparse.ArgumentParser, path: str) -> Iterator[tuple[str, argparse.Action]]:
    """(command path, action) for every argument of `parser` and of its subcommands, recursively."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from walk(child, f"{path} {name}")
        elif not isinstance(action, argparse._HelpAction):
            yield path, action


def name_of(action: argparse.Action) -> str:
    return "/".join(action.option_strings) or str(action.dest)


def test_every_argument_has_help() -> None:
    missing = [f"{path}: {name_of(a)}" for path, a in walk(build_parser(), "dirtyring")
               if not a.help or a.help == argparse.SUPPRESS or not a.help.strip()]
    assert not missing, "arguments without help:\n" + "\n".join(missing)


def test_every_default_is_stated() -> None:
    unstated = [f"{path}: {name_of(a)} (default {a.default!r}): {a.help!r}"
                for path, a in walk(build_parser(), "dirtyring")
                if a.option_strings and a.default is not None and a.default is not False
                and a.default != argparse.SUPPRESS and "default" not in (a.help or "")]
    assert not unstated, "options whose help does not state their default:\n" + "\n".join(unstated)


def test_the_walk_sees_the_whole_tree() -> None:
    paths = {path for path, _ in walk(build_parser(), "dirtyring")}
    assert "dirtyring run" in paths
    assert any(p.startswith("dirtyring bench ") for p in paths)


def test_every_subcommand_has_help() -> None:
    def missing(parser: argparse.ArgumentParser, path: str) -> Iterator[str]:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                helped = {c.dest for c in action._choices_actions if c.help}
                for name, child in action.choices.items():
                    if name not in helped:
                        yield f"{path} {name}"
                    yield from missing(child, f"{path} {name}")
    absent = list(missing(build_parser(), "dirtyring"))
    assert not absent, "subcommands without help:\n" + "\n".join(absent)


def test_version() -> None:
    p = subprocess.run([sys.executable, "-m", "dirtyring.cli.main", "--version"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"dirtyring {version()}"
    assert version()


def test_version_when_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_found(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(importlib.metadata, "version", not_found)
    assert version() == "unknown"


def test_the_command_table_names_every_command_with_its_help() -> None:
    """``commands.COMMANDS`` (what --help lists without importing the modules) and the real
    parsers agree: the same commands, in the same order, with the same help lines."""
    import argparse

    from dirtyring.cli.commands import COMMANDS
    from dirtyring.cli.main import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    real = {c.dest: c.help for c in sub._choices_actions}
    assert list(real) == [*COMMANDS, "bench"]
    assert all(real[name] == help_line for name, (_, help_line) in COMMANDS.items())
    for name in COMMANDS:  # a command built alone parses its own --help-free arguments
        lone = build_parser(bench_commands=False, command=name)
        lone_sub = next(a for a in lone._actions
                        if isinstance(a, argparse._SubParsersAction))
        assert list(lone_sub.choices) == list(real)
