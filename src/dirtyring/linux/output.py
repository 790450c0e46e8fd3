"""Where a protected program's stdout and stderr are written once released, and how a standby
that takes over carries on the same streams.

Output commit (``replication/output_commit.py``) decides *when* a chunk may leave; this decides
*where* it lands. Each chunk has a byte offset in its stream (the stdio device counts them, and
keeps every chunk until it is delivered: ``machine/devices/stdio.py``).

- A stream written to a **file** (``--stdout PATH``) is written with ``pwrite`` at the chunk's
  offset. A standby that resumes from a checkpoint writes the chunks the primary may not have
  written again, at the same offsets: a repeat rewrites the same bytes, so the file ends up
  with each byte exactly once, with no gap, whenever the primary died (exactly-once output,
  as TCP's sequence numbers give Remus for network output).
- A stream that is a **pipe or terminal** cannot be rewritten: the standby writes what the
  primary may not have written, so output is *at least once* across a failover. What the
  primary wrote after the standby's last checkpoint (at most the output of the last few
  epochs) can then appear twice; nothing is ever lost.
"""
from __future__ import annotations

import os
import stat
from typing import BinaryIO

from ..errors import ConfigError
from ..machine.devices.stdio import StdioDevice

STREAMS = ("stdout", "stderr")


class ProgramOutput:
    """The program's two output streams: a file path each (exactly once) or our own stdout and
    stderr (at least once across a failover).

    Example::

        out = ProgramOutput({"stdout": "/shared/out.log"}, fallback={"stdout": sys.stdout.buffer,
                            "stderr": sys.stderr.buffer}, truncate=True)
        out.bind(machine.stdio)           # each stream's next offset
        out.write("stdout", b"hello\\n")  # (the gate's release callback)
    """

    def __init__(self, paths: dict[str, str | None], *, fallback: dict[str, BinaryIO],
                 truncate: bool) -> None:
        """``paths``: stream -> file (None: ``fallback``'s stream). ``truncate``: a fresh
        program starts its files empty; a standby taking over must not (it continues them)."""
        self._fd: dict[str, int] = {}
        self._fallback = fallback
        self.next: dict[str, int] = {s: 0 for s in STREAMS}
        for stream in STREAMS:
            path = paths.get(stream)
            if path is None:
                continue
            flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_TRUNC if truncate else 0)
            try:
                fd = os.open(path, flags, 0o644)
            except OSError as e:
                raise ConfigError(f"--{stream} {path}: {e.strerror}") from None
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise ConfigError(f"--{stream} {path}: not a regular file (chunks are written "
                                  f"at their offsets; use no --{stream} for a pipe)")
            self._fd[stream] = fd

    def exactly_once(self, stream: str) -> bool:
        """Is ``stream`` a file (rewritten at its offsets after a failover)?"""
        return stream in self._fd

    def bind(self, device: StdioDevice | None) -> None:
        """Take each stream's next offset from the stdio device: a standby that took over
        starts where the oldest chunk its checkpoint holds goes."""
        if device is not None:
            self.next.update(device.stream_offsets())

    def write(self, stream: str, data: bytes) -> None:
        """Write a released chunk: at its offset in a file, else after what came before."""
        fd = self._fd.get(stream)
        if fd is not None:
            done = 0
            while done < len(data):
                done += os.pwrite(fd, data[done:], self.next[stream] + done)
        else:
            f = self._fallback[stream]
            f.write(data)
            f.flush()
        self.next[stream] += len(data)

    def close(self) -> None:
        for fd in self._fd.values():
            os.close(fd)
        self._fd.clear()
