"""Benchmark records: one measured figure with its unit and dimensions, and the files they go to.

Every bench returns a flat list of :class:`Record`. A record is one number (a median, a p90, a
ratio, a rate) with a unit and the dimensions that locate it in the bench's matrix (tracker,
slot size, dirty pages, vCPUs...). The JSON file of a bench holds the records plus enough
context (host, settings, load average) to judge an A/B comparison made on the same host.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DirtyringError

#: Bumped when the layout of the JSON files changes incompatibly.
FORMAT_VERSION = 1

DimValue = str | int | float | bool


class BenchError(DirtyringError):
    """A benchmark could not measure what it promised (the guest stopped ticking, a tracker
    missed pages it must have reported). The message names the cell; rerun after fixing it."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Record:
    """One measured figure. ``dimensions`` is a tuple of (name, value) pairs, sorted by name."""

    bench: str
    metric: str
    stat: str  # "p50" | "p90" | "p99" | "mean" | "min" | "max" | "value"
    value: float
    unit: str
    dimensions: tuple[tuple[str, DimValue], ...] = ()

    def __post_init__(self) -> None:
        if not self.bench or not self.metric or not self.unit:
            raise ValueError("a record needs a bench, a metric and a unit")
        if not isinstance(self.value, (int, float)) or isinstance(self.value, bool):
            raise ValueError(f"record value must be a number, not {self.value!r}")
        names = [k for k, _ in self.dimensions]
        if names != sorted(set(names)):
            raise ValueError(f"dimension names must be unique and sorted: {names}")

    @classmethod
    def make(cls, bench: str, metric: str, value: float, unit: str, *, stat: str = "value",
             **dims: DimValue) -> Record:
        return cls(bench=bench, metric=metric, stat=stat, value=float(value), unit=unit,
                   dimensions=tuple(sorted(dims.items())))

    @property
    def dims(self) -> dict[str, DimValue]:
        return dict(self.dimensions)

    def matches(self, **want: DimValue) -> bool:
        d = self.dims
        return all(d.get(k) == v for k, v in want.items())

    def to_json(self) -> dict[str, Any]:
        return {"bench": self.bench, "metric": self.metric, "stat": self.stat,
                "value": self.value, "unit": self.unit, "dimensions": self.dims}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Record:
        return cls(bench=d["bench"], metric=d["metric"], stat=d["stat"],
                   value=float(d["value"]), unit=d["unit"],
                   dimensions=tuple(sorted(dict(d["dimensions"]).items())))


def find(records: Iterable[Record], metric: str, stat: str = "p50",
         **dims: DimValue) -> Record | None:
    """The first record with this metric, stat and (a subset of) dimensions, or None."""
    for r in records:
        if r.metric == metric and r.stat == stat and r.matches(**dims):
            return r
    return None


def summary_stats(samples: Sequence[float], stats: Sequence[str] = ("p50", "p90")
                  ) -> dict[str, float]:
    """Percentiles ("p50", "p90", "p99"), "mean", "min", "max" of ``samples``."""
    if not len(samples):
        raise ValueError("no samples")
    a = np.asarray(samples, dtype=np.float64)
    out: dict[str, float] = {}
    for s in stats:
        if s.startswith("p"):
            out[s] = float(np.percentile(a, float(s[1:])))
        elif s == "mean":
            out[s] = float(a.mean())
        elif s == "min":
            out[s] = float(a.min())
        elif s == "max":
            out[s] = float(a.max())
        else:
            raise ValueError(f"unknown statistic {s!r}")
    return out


def host_info() -> dict[str, Any]:
    """What an A/B reader needs to know about the host the numbers came from."""
    info: dict[str, Any] = {
        "kernel": platform.release(), "machine": platform.machine(),
        "python": platform.python_version(), "numpy": np.__version__,
        "cpus": os.cpu_count(), "kvm_pvm": os.path.isdir("/sys/module/kvm_pvm"),
    }
    try:
        info["loadavg"] = list(os.getloadavg())
    except OSError:
        pass
    return info


def write_json(path: Path, bench: str, records: Sequence[Record], *,
               settings: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> Path:
    """Write one bench's records (and context) to ``path``, atomically (temp file + rename)."""
    doc: dict[str, Any] = {
        "format": FORMAT_VERSION, "bench": bench,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv, "host": host_info(), "settings": dict(settings),
        "records": [r.to_json() for r in records],
    }
    if extra:
        doc.update(extra)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def read_json(path: Path) -> tuple[dict[str, Any], list[Record]]:
    """The document and its records, as written by :func:`write_json`."""
    doc = json.loads(Path(path).read_text())
    return doc, [Record.from_json(r) for r in doc["records"]]


def json_lines(records: Iterable[Record]) -> str:
    return "\n".join(json.dumps(r.to_json(), sort_keys=True) for r in records)
