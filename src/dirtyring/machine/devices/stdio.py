"""The library OS's standard output and error: a ring of records in guest memory that the
guest fills without exiting, drained by the VMM when the guest finds it full (``out
PORT_STDIO_FLUSH``), when the program ends, and whenever the controller asks (``drain``: at each
checkpoint, so output leaves tagged with the epoch that produced it).

Nothing in the ring is trusted: the producer index and every record header come from memory the
program can scribble over. The VMM keeps its own consumer index, accepts a producer index only
within one ring of it, and checks every record's fd and length; anything else stops the guest
with "the guest broke its contract: ..." and a clear report, never a VMM crash or a read outside
the ring. Output goes to the sink as ("stdout" | "stderr", bytes).

Output taken from the ring is the device's until it is *delivered* (``keep_undelivered``,
which a replicating primary turns on): then each chunk stays in the device's saved state, with
its byte offset in its stream, until the output gate has released it (``delivered``). A
standby resumed from a checkpoint therefore holds everything the primary may not have written
yet, and where each piece goes (``replay_undelivered``, ``stream_offsets``): written again at
the same offsets of a file, a repeat is harmless, and nothing the checkpoint's program printed
is ever lost.

Also here, because they are the same contract: PORT_UNSUPPORTED (the library OS met a syscall
it does not serve: ("unsupported_syscall", number) to the sink, once per number, so the caller
can name it), PORT_FAULT (the library OS stopped the program: ``FAULTS`` says why) and
PORT_EXPORT (the program's files are packed at (address, length): ("files_export", (va,
length)) to the sink; the layer that knows the address space reads and checks them).
"""
from __future__ import annotations

import os
import select
import struct
import threading
import time
from collections import deque
from typing import TYPE_CHECKING

from ...errors import SnapshotFormatError
from ...guests.protocol import (ENTROPY_OFFSET, ENTROPY_POOL, STDIO_HEADER_OFFSETS,
                                STDIO_MAX_RECORD, STDIO_RECORD, STDIO_RING, STDIO_RING_OFFSET,
                                STDIN_OFFSET, STDIN_RING, TRACE_OFFSET, TRACE_RECORD,
                                TRACE_RECORDS)
from ...guests.protocol import LibosPort as Port
from .. import layout
from .base import OutputSink

if TYPE_CHECKING:
    from ..memory import GuestMemory
    from ..vcpu import VcpuRunner

STREAMS = {1: "stdout", 2: "stderr"}
#: PORT_FAULT's values (libos.h FAULT_*): why the library OS stopped the program. Each is the
#: program's own doing, reported as such: it would leave a lone program stuck for ever under
#: Linux. (1 was "entered at CPL0": entry.S now serves that path; any other value is a broken
#: contract.)
FAULTS = {2: "the program waits on a futex no other thread can wake (with no timeout, it would "
             "hang for ever)",
          3: "the program waits for a signal (pause, sigsuspend or sigtimedwait with no "
             "timeout), and the library OS does not wait for one from outside: it would hang "
             "for ever",
          4: "the program was stopped by a stop signal (SIGSTOP, SIGTSTP, SIGTTIN or SIGTTOU) "
             "and nothing can continue it",
          5: "the program waits in poll or select with no timeout for what cannot become "
             "ready (no other thread or process could change it), and the library OS does not "
             "wait for a signal from outside: it would hang for ever"}


class ContractBroken(Exception):
    """What the guest left in the ring cannot be right (the message says what)."""


class StdioDevice:
    name = "stdio"
    ports = (int(Port.STDIO_FLUSH), int(Port.UNSUPPORTED), int(Port.FAULT), int(Port.EXPORT),
             int(Port.TRACE_FLUSH), int(Port.STDIN_WAIT), int(Port.ENTROPY),
             int(Port.SIGNAL_WAIT))
    #: How long one STDIN_WAIT may wait for input before the guest asks again: short, so a
    #: pause (a checkpoint) is never held up by a program waiting for its input.
    STDIN_SLICE = 0.01
    #: How long one wait for a signal from outside lasts before the guest looks again.
    SIGNAL_SLICE = 0.005

    def __init__(self, memory: GuestMemory, sink: OutputSink) -> None:
        self.memory = memory
        self.sink = sink
        self.cons = 0  # bytes ever drained: ours, never read back from the guest
        self.trace_cons = 0  # --strace records ever drained (likewise)
        #: The program's stdin: a readable descriptor, or None for an empty one.
        self.stdin_fd: int | None = None
        self.stdin_prod = 0  # stdin bytes ever put in the ring (ours)
        self.stdin_eof = False
        self._lock = threading.Lock()  # the vCPU thread (flush) and the controller (drain)
        self.unsupported: list[int] = []
        #: Bytes of each stream ever taken from the ring: the offset of the next chunk.
        self.out_off = {"stdout": 0, "stderr": 0}
        #: Keep what was taken until ``delivered`` (replication: see the module docstring).
        self.keep_undelivered = False
        #: (stream, offset, data) taken from the ring and not yet delivered, oldest first.
        self.undelivered: deque[tuple[str, int, bytes]] = deque()
        self._undelivered_lock = threading.Lock()  # (a release may run inside ``drain``)

    # --- ports (vCPU thread) -----------------------------------------------------------------
    def io_out(self, vcpu: VcpuRunner, port: int, value: int, size: int) -> None:
        if port in (Port.STDIO_FLUSH, Port.TRACE_FLUSH):
            try:
                self.drain()
            except ContractBroken as e:
                self._stop(vcpu, str(e))
        elif port == Port.STDIN_WAIT:  # the value: at most so many microseconds (0: a slice)
            try:
                self._fill_stdin(min(self.STDIN_SLICE, value / 1e6) if value else
                                 self.STDIN_SLICE)
            except ContractBroken as e:
                self._stop(vcpu, str(e))
        elif port == Port.ENTROPY:
            self.refill_entropy()
        elif port == Port.SIGNAL_WAIT:  # waiting for a signal from outside: it comes at a
            time.sleep(self.SIGNAL_SLICE)  # pause, which finds this thread back soon
        elif port == Port.UNSUPPORTED:
            self.unsupported.append(value)
            self.sink("unsupported_syscall", value)
        elif port == Port.FAULT:
            self._stop(vcpu, FAULTS.get(value, "the guest broke its contract: the library OS "
                                               f"reported fault {value}"), contract=False)
        elif port == Port.EXPORT:  # where the guest says its file archive is: the layer that
            base = layout.QUEUE_GPA  # knows the address space reads (and checks) it
            va = self.memory.read_u64(base + STDIO_HEADER_OFFSETS["export_va"])
            n = self.memory.read_u64(base + STDIO_HEADER_OFFSETS["export_len"])
            self.sink("files_export", (va, n))

    def io_in(self, vcpu: VcpuRunner, port: int, size: int) -> int:
        return 0xFFFFFFFF

    def _stop(self, vcpu: VcpuRunner, why: str, contract: bool = True) -> None:
        """Stop the guest with ``why`` (prefixed as a broken contract unless ``contract`` is
        False: then ``why`` says it all)."""
        vcpu.crash = f"the guest broke its contract: {why}" if contract else why
        vcpu.run_struct.immediate_exit = 1  # the next KVM_RUN returns at once and parks
        vcpu.machine.on_crash(vcpu)

    def refill_entropy(self) -> None:
        """Fill getrandom's pool from the host's entropy (at boot, and when the library OS has
        handed all of it out). Nothing is read from the guest: the pool is only written."""
        base = layout.QUEUE_GPA
        self.memory.write(base + ENTROPY_OFFSET, os.urandom(ENTROPY_POOL))
        self.memory.write_u64(base + STDIO_HEADER_OFFSETS["entropy_used"], 0)

    # --- the rings (any thread) --------------------------------------------------------------
    def drain(self) -> int:
        """Emit every complete record the guest has queued (the --strace records first, as
        ("strace", [(nr, args, ret), ...])); return the bytes of output. Raises ContractBroken
        if a ring's contents are impossible."""
        with self._lock:
            self._drain_trace()
            return self._drain_output()

    def _fill_stdin(self, wait: float) -> None:
        """Put what is available of the program's stdin in its ring (waiting at most ``wait``
        seconds for some: a poll with a short timeout asks for less than STDIN_SLICE), or
        mark its end."""
        base = layout.QUEUE_GPA
        cons = self.memory.read_u64(base + STDIO_HEADER_OFFSETS["stdin_cons"])
        if not self.stdin_prod - STDIN_RING <= cons <= self.stdin_prod:
            raise ContractBroken(f"stdin consumer index {cons} is outside "
                                 f"[{self.stdin_prod - STDIN_RING}, {self.stdin_prod}]")
        room = STDIN_RING - (self.stdin_prod - cons)
        if room == 0 or self.stdin_eof:
            return
        data = b""
        if self.stdin_fd is not None:
            ready, _, _ = select.select([self.stdin_fd], [], [], wait)
            if not ready:
                return  # nothing yet: the guest asks again (and can be paused meanwhile)
            try:
                data = os.read(self.stdin_fd, room)
            except OSError:
                data = b""
        if not data:
            self.stdin_eof = True
            self.memory.write_u64(base + STDIO_HEADER_OFFSETS["stdin_eof"], 1)
            return
        at = self.stdin_prod % STDIN_RING
        first = min(len(data), STDIN_RING - at)
        self.memory.write(base + STDIN_OFFSET + at, data[:first])
        if first < len(data):
            self.memory.write(base + STDIN_OFFSET, data[first:])
        self.stdin_prod += len(data)
        self.memory.write_u64(base + STDIO_HEADER_OFFSETS["stdin_prod"], self.stdin_prod)

    def _drain_trace(self) -> None:
        base = layout.QUEUE_GPA
        prod = self.memory.read_u64(base + STDIO_HEADER_OFFSETS["trace_prod"])
        if prod == self.trace_cons:
            return
        if not self.trace_cons < prod <= self.trace_cons + TRACE_RECORDS:
            raise ContractBroken(f"trace producer index {prod} is outside "
                                 f"[{self.trace_cons}, {self.trace_cons + TRACE_RECORDS}]")
        ring = self.memory.read(base + TRACE_OFFSET, TRACE_RECORDS * TRACE_RECORD.size)
        calls = []
        for i in range(self.trace_cons, prod):
            nr, *args, ret = TRACE_RECORD.unpack_from(ring, (i % TRACE_RECORDS) *
                                                      TRACE_RECORD.size)
            calls.append((nr, tuple(args), ret))
        self.trace_cons = prod
        self.memory.write_u64(base + STDIO_HEADER_OFFSETS["trace_cons"], prod)
        self.sink("strace", calls)

    def _drain_output(self) -> int:
        base = layout.QUEUE_GPA
        prod = self.memory.read_u64(base + STDIO_HEADER_OFFSETS["prod"])
        if not self.cons <= prod <= self.cons + STDIO_RING:
            raise ContractBroken(f"stdio producer index {prod} is outside "
                                 f"[{self.cons}, {self.cons + STDIO_RING}]")
        if prod == self.cons:
            return 0
        ring = self.memory.read(base + STDIO_RING_OFFSET, STDIO_RING)
        chunks: list[tuple[str, bytes]] = []
        pos = self.cons
        while pos < prod:
            off = pos % STDIO_RING
            if off % 8 or STDIO_RING - off < STDIO_RECORD.size:
                raise ContractBroken(f"stdio record at {pos} is misaligned")
            fd, n = STDIO_RECORD.unpack_from(ring, off)
            room = STDIO_RING - off - STDIO_RECORD.size
            if fd == 0:
                if n != room:
                    raise ContractBroken(f"stdio padding at {pos} does not reach the end")
                step = STDIO_RING - off
            elif fd in STREAMS and n <= min(room, STDIO_MAX_RECORD):
                step = (STDIO_RECORD.size + n + 7) & ~7
                chunks.append((STREAMS[fd], ring[off + STDIO_RECORD.size:
                                                 off + STDIO_RECORD.size + n]))
            else:
                raise ContractBroken(f"stdio record at {pos} has fd {fd}, length {n}")
            if pos + step > prod:
                raise ContractBroken(f"stdio record at {pos} runs past the producer")
            pos += step
        # All checked: only now does anything leave (a broken ring releases nothing).
        self.cons = prod
        self.memory.write_u64(base + STDIO_HEADER_OFFSETS["cons"], prod)
        for stream, data in chunks:
            data = bytes(data)
            if self.keep_undelivered:
                with self._undelivered_lock:  # before the sink: it may deliver at once
                    self.undelivered.append((stream, self.out_off[stream], data))
            self.out_off[stream] += len(data)
            self.sink(stream, data)
        return sum(len(d) for _, d in chunks)

    # --- delivery (replication) --------------------------------------------------------------
    def delivered(self, stream: str) -> None:
        """The oldest undelivered chunk of ``stream`` has been written out: forget it. (Chunks
        leave in the order they were taken, one sink call each: see ``OutputGate``.)"""
        with self._undelivered_lock:
            for i, c in enumerate(self.undelivered):
                if c[0] == stream:
                    del self.undelivered[i]
                    return

    def forget_undelivered(self) -> None:
        """Stop keeping chunks (output now goes straight out: a standby that took over)."""
        with self._undelivered_lock:
            self.keep_undelivered = False
            self.undelivered.clear()

    def stream_offsets(self) -> dict[str, int]:
        """Where each stream's next write goes: the offset of its oldest undelivered chunk, or
        the end of what was taken from the ring."""
        with self._undelivered_lock:
            out = dict(self.out_off)
            for stream, off, _ in reversed(self.undelivered):
                out[stream] = off
        return out

    def replay_undelivered(self) -> int:
        """Send every undelivered chunk to the sink again, in order (a standby resuming from a
        checkpoint: the primary may not have written them). Returns how many."""
        with self._undelivered_lock:
            chunks = list(self.undelivered)
        for stream, _, data in chunks:
            self.sink(stream, data)
        return len(chunks)

    def save(self) -> bytes:
        with self._undelivered_lock:
            chunks = list(self.undelivered)
        head = struct.pack("<QQQQQQI", self.cons, self.trace_cons, self.stdin_prod,
                           int(self.stdin_eof), self.out_off["stdout"], self.out_off["stderr"],
                           len(chunks))
        return head + b"".join(_CHUNK.pack(_FDS[s], off, len(d)) + d for s, off, d in chunks)

    def restore(self, data: bytes) -> None:
        """Load a saved state (also the 32-byte one of older snapshots). A state that cannot be
        right (it came from a file or the network) raises SnapshotFormatError, changing nothing."""
        chunks: list[tuple[str, int, bytes]] = []
        if len(data) == _OLD_STATE.size:
            cons, trace, stdin_prod, eof = _OLD_STATE.unpack(data)
            offs = {"stdout": 0, "stderr": 0}
        else:
            if len(data) < _STATE.size:
                raise SnapshotFormatError(f"stdio state of {len(data)} bytes is truncated")
            cons, trace, stdin_prod, eof, o1, o2, n = _STATE.unpack_from(data)
            offs = {"stdout": o1, "stderr": o2}
            at = _STATE.size
            for _ in range(n):
                if at + _CHUNK.size > len(data):
                    raise SnapshotFormatError("stdio state: an undelivered chunk is truncated")
                fd, off, k = _CHUNK.unpack_from(data, at)
                at += _CHUNK.size
                if fd not in STREAMS or at + k > len(data) or off + k > offs[STREAMS[fd]]:
                    raise SnapshotFormatError(f"stdio state: undelivered chunk (fd {fd}, "
                                              f"offset {off}, {k} bytes) is impossible")
                chunks.append((STREAMS[fd], off, bytes(data[at:at + k])))
                at += k
            if at != len(data):
                raise SnapshotFormatError("stdio state has bytes after its last chunk")
        self.cons, self.trace_cons, self.stdin_prod = cons, trace, stdin_prod
        self.stdin_eof = bool(eof)
        self.out_off = offs
        with self._undelivered_lock:
            self.undelivered = deque(chunks)


_OLD_STATE = struct.Struct("<QQQQ")
_STATE = struct.Struct("<QQQQQQI")
_CHUNK = struct.Struct("<IQI")  # fd, offset in its stream, length; then the bytes
_FDS = {v: k for k, v in STREAMS.items()}
