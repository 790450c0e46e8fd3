"""``run``'s guest-dependent defaults: a program (--exec) runs untracked, like itself, unless a
tracker or the shadow check is asked for; a built-in guest shows its tracker at work."""
from __future__ import annotations

import argparse

import pytest

from dirtyring.cli.run import EXEC_INTERVAL, resolve_defaults
from dirtyring.errors import ConfigError


def _args(**kw: object) -> argparse.Namespace:
    base: dict[str, object] = {"tracker": None, "verify_every": None, "interval": None}
    base.update(kw)
    return argparse.Namespace(**base)


@pytest.mark.parametrize("given, exec_mode, want", [
    ({}, True, ("none", 0, EXEC_INTERVAL)),
    ({"tracker": "ring"}, True, ("ring", 100, EXEC_INTERVAL)),
    ({"verify_every": 5}, True, ("ring", 5, EXEC_INTERVAL)),
    ({"verify_every": 0}, True, ("none", 0, EXEC_INTERVAL)),
    ({"tracker": "hotset", "interval": 0.05}, True, ("hotset", 100, 0.05)),
    ({}, False, ("ring", 100, 1e-3)),
    ({"tracker": "bitmap", "verify_every": 0}, False, ("bitmap", 0, 1e-3)),
])
def test_defaults(given: dict[str, object], exec_mode: bool,
                  want: tuple[str, int, float]) -> None:
    a = _args(**given)
    resolve_defaults(a, exec_mode)
    assert (a.tracker, a.verify_every, a.interval) == want


@pytest.mark.parametrize("given, exec_mode, msg", [
    ({"tracker": "none"}, False, "--tracker none runs only a program"),
    ({"tracker": "none", "verify_every": 3}, True, "--verify-every needs a tracker"),
    ({"verify_every": -1}, True, "give 0 \\(off\\) or a positive"),
])
def test_contradictions_are_clear_errors(given: dict[str, object], exec_mode: bool,
                                         msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        resolve_defaults(_args(**given), exec_mode)
