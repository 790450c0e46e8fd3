"""Encode + decode cost of the epoch loop ↔ uplink control messages (``uplink_messages.py``)
against the plain tuples they replaced, and against pickling the typed values as they are.
The numbers in ``uplink_messages``' docstring come from this. Run on an idle host:

    PYTHONPATH=src python tools/bench_uplink_messages.py
"""
from __future__ import annotations

import pickle
import sys
import timeit
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dirtyring.replication.uplink_messages import (CheckpointEnd, Checkpoints, Part,
                                                   SteadyCheckpoints, SteadyEpochs, decode,
                                                   encode)

P = pickle.HIGHEST_PROTOCOL
N, REPEAT = 20_000, 5
STATE = bytes(6000)  # a one-vCPU state record is ~6 KiB


def per_call(f: Callable[[], Any]) -> float:
    """Best of REPEAT, µs per call."""
    return min(timeit.repeat(f, number=N, repeat=REPEAT)) / N * 1e6


def row(name: str, build: Callable[[], Any], enc: Callable[[Any], bytes],
        dec: Callable[[bytes], Any]) -> None:
    m = build()
    print(f"  {name:44s} {per_call(lambda: dec(enc(m))):6.2f} µs  build "
          f"{per_call(build):5.2f} µs  {len(enc(m)):6,} B")


@dataclass(frozen=True, slots=True)
class _Reduced:
    """A CheckpointEnd that pickles as (class, fields): the usual way to speed dataclasses up."""

    epoch: int
    kind: str
    parts: list[Part]
    state: bytes
    digest: bytes
    outputs: int

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Reduced, (self.epoch, self.kind, self.parts, self.state, self.digest,
                           self.outputs))


def main() -> int:
    dumps = lambda m: pickle.dumps(m, P)  # noqa: E731
    states = [bytes([i]) * len(STATE) for i in range(4)]  # (distinct: no pickle memo)
    for k in (1, 4):
        print(f"Checkpoints of {k} CheckpointEnd (2 parts each, {len(STATE):,}-byte state)")
        row("plain tuples (before)", lambda: (
            "cps", [(5 + i, "delta", [(5 + i, 0, 0, 64, -1), (5 + i, 64, 1, 2, -1)], states[i],
                     b"", 3) for i in range(k)], False), dumps, pickle.loads)
        row("dataclasses, pickled as they are", lambda: Checkpoints(
            [CheckpointEnd(5 + i, "delta", [Part(5 + i, 0, 0, 64, -1), Part(5 + i, 64, 1, 2, -1)],
                           states[i], b"", 3) for i in range(k)], False), dumps, pickle.loads)
        row("dataclasses with __reduce__ to a tuple", lambda: [
            _Reduced(5 + i, "delta", [Part(5 + i, 0, 0, 64, -1), Part(5 + i, 64, 1, 2, -1)],
                     states[i], b"", 3) for i in range(k)], dumps, pickle.loads)
        row("these: dataclasses as tag tuples", lambda: Checkpoints(
            [CheckpointEnd(5 + i, "delta", [Part(5 + i, 0, 0, 64, -1), Part(5 + i, 64, 1, 2, -1)],
                           states[i], b"", 3) for i in range(k)], False), encode, decode)
    n = 12
    steady = SteadyEpochs(100, 40, n, [(0, 64), (1, 2)], [[300, -1]] * n, 5800, b"d" * 200,
                          None)
    fields = (steady.epoch, steady.seq, steady.count, steady.sizes, steady.words,
              steady.state_size, steady.devices, steady.digests)
    print(f"Checkpoints of 1 SteadyCheckpoints (a steady batch of {n})")
    row("plain tuples (before: SteadyEpochs.fields())",
        lambda: ("cps", [("steady", fields, 3)], False), dumps, pickle.loads)
    row("these", lambda: Checkpoints([SteadyCheckpoints(steady, 3)], False), encode, decode)
    return 0


if __name__ == "__main__":
    sys.exit(main())
