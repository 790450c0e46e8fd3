"""Guest programs built by the project (sources beside this file, binaries in ``bin/``)."""
from __future__ import annotations

from importlib import resources

from ..errors import GuestError
from .protocol import GuestParams, Pattern, Port

NAMES = ("dirtier", "compute", "kvstore")


def load_guest(name: str) -> bytes:
    """The flat binary of guest ``name`` (loaded at layout.CODE_GPA)."""
    if name not in NAMES:
        raise GuestError(f"unknown guest {name!r}; choose one of: {', '.join(NAMES)}")
    try:
        return (resources.files(__package__) / "bin" / f"{name}.bin").read_bytes()
    except FileNotFoundError:
        raise GuestError(f"guest binary {name}.bin is missing; build it with "
                         "`python -m dirtyring.guests.build`") from None


__all__ = ["NAMES", "load_guest", "GuestParams", "Pattern", "Port"]
