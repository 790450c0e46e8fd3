"""What a :class:`~dirtyring.wire.Connection` counts: frames, bytes, and page compression."""
from __future__ import annotations

from dataclasses import dataclass

from .states import Role, State

__all__ = ["WireStatistics"]


@dataclass(frozen=True, slots=True, kw_only=True)
class WireStatistics:
    """Counters of one connection; ``page_bytes_raw_*`` vs ``page_bytes_wire_*`` is the
    page data as in guest memory vs the Pages frame bodies that carried it."""

    our_role: Role
    our_state: State
    their_state: State
    frames_out: int
    bytes_out: int
    frames_in: int
    bytes_in: int
    page_bytes_raw_out: int
    page_bytes_wire_out: int
    page_bytes_raw_in: int
    page_bytes_wire_in: int
    bytes_buffered: int

    @property
    def compression_ratio_out(self) -> float:
        """Raw page bytes per encoded byte sent (> 1 means the codec saved bandwidth)."""
        wire = self.page_bytes_wire_out
        return self.page_bytes_raw_out / wire if wire else 1.0

    @property
    def compression_ratio_in(self) -> float:
        wire = self.page_bytes_wire_in
        return self.page_bytes_raw_in / wire if wire else 1.0
