"""The primary's network side, in a process of its own: the *uplink*.

Why a process: the epoch loop pauses, captures and resumes the guest thousands of times a
second, and every microsecond it waits for the GIL the guest stays paused. Turning a checkpoint
into authenticated frames (XOR against the standby's copy, sparse encoding, HMAC, send) is
~100 µs of Python per epoch. As a thread of the primary it fought the epoch loop for the GIL:
with a 64-page hot set and 250 µs epochs the loop's cycle went from ~410 µs (nothing sent) to
~700-930 µs p50 (measured on this host). Here it runs on the other core, and the two share:

- a **staging area** (a memfd both map): a ring of fixed-size cells the epoch loop gathers dirty
  pages into while the guest is paused. Its first page is a header of u64 counters: how many
  cells the uplink has released (so the loop reuses a cell without waiting for a message) and
  the last epoch the standby acknowledged (read by the loop at each epoch boundary: no wakeup
  per ack);
- a **control socket** (AF_UNIX, SOCK_SEQPACKET): the typed messages of ``uplink_messages.py``,
  checkpoint descriptors one way; the handshake result and rare events (resync, failover,
  lost, statistics) the other.

The uplink owns the TCP connection to the standby and its ``wire.Connection`` (handshake,
sequence numbers, XOR shadow, heartbeats, flow control). It exits the moment the control socket
closes, so a dead primary's connection drops as soon as the kernel has closed the primary's
files. Staging is bounded (cells * cell pages), and so is what is sent but not yet acknowledged
(MAX_UNACKED_BYTES, kept below the socket buffers): when the standby stalls, the uplink stops
taking checkpoints, the epoch loop waits for a free cell, and the guest slows down instead of
data piling up — and a planned stop's Goodbye always fits in the socket buffers.

The process itself is ``uplink_process.py`` (run by :class:`Uplink`, never by hand); what the two
share is in ``staging_area.py`` (the memory) and ``uplink_messages.py`` (the control messages);
the epoch loop's copying side of the staging area is ``staging_writer.py``.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Callable

from .._bindings.mapping import memfd
from ..errors import DirtyringError, ProtocolError
from ..wire import Hello
from .staging_area import CELL_PAGES, CELLS, Staging
from .staging_writer import Stager
from .uplink_messages import (ACKED, ALIVE, Acked, CheckpointEnd, Checkpoints, Close,
                              FromUplink, Handshake, HandshakeDone, Lost, Part,
                              ResyncRequested, RevokerArmed, Skipped, StagedParts,
                              StandbyTookOver, Start, SteadyCheckpoints, SteadyEpochs, ToUplink,
                              WireStats, recv_msg, send_msg)

MessageSink = Callable[[FromUplink], None]

#: The "lost" reason when the uplink process itself died: the standby then sees its
#: connection drop and takes over, so the primary must not go on alone without an arbiter.
UPLINK_DIED = "the uplink process ended unexpectedly"


def uplink_pid(primary_pid: int) -> int:
    """The PID of the uplink process of the primary process ``primary_pid``: its child that
    runs ``dirtyring.replication.uplink_process``. For tests and benchmarks that kill it (the
    primary's host losing it alone). DirtyringError unless there is exactly one.

    A child caught inside its execve shows an empty command line for a moment (the parent of
    a vfork-ed child resumes before the new image's arguments are in place): such a child is
    looked at again, for up to a second."""
    deadline = time.monotonic() + 1.0
    while True:
        found, starting = [], False
        for kid in _children(primary_pid):
            try:
                with open(f"/proc/{kid}/cmdline", "rb") as f:
                    cmdline = f.read()
            except OSError:
                continue
            starting |= not cmdline
            if b"uplink_process" in cmdline:
                found.append(kid)
        if found or not starting or time.monotonic() >= deadline:
            break
        time.sleep(0.01)
    if len(found) != 1:
        raise DirtyringError(f"expected one uplink process under the primary {primary_pid}, "
                             f"found {found}")
    return found[0]


def _children(pid: int) -> list[int]:
    """The children of every thread of process ``pid`` (none if it is gone)."""
    kids: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids += [int(k) for k in f.read().split()]
        except OSError:
            continue
    return kids


class Uplink:
    """The epoch loop's handle on the uplink process."""

    def __init__(self, sock: socket.socket, key: bytes, *, insecure: bool, compress_level: int,
                 heartbeat_interval: float, heartbeat_timeout: float, slot_sizes: list[int],
                 on_message: MessageSink, cells: int = CELLS, cell_pages: int = CELL_PAGES,
                 lease: dict[str, Any] | None = None) -> None:
        """``lease``: the primary's etcd lease (``Arbiter.handoff()``), which the uplink revokes
        the moment the primary dies, before it drops the standby's connection."""
        fd = memfd("dirtyring-staging", Staging.size_for(cells, cell_pages))
        self.staging = Staging(fd, cells, cell_pages)
        self.ctrl, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for s in (self.ctrl, child):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dirtyring.replication.uplink_process", str(child.fileno()),
                 str(sock.fileno()), str(fd), str(self.staging.size)],
                pass_fds=(child.fileno(), sock.fileno(), fd), stdin=subprocess.DEVNULL)
        except OSError as e:
            self.staging.close()
            os.close(fd)
            raise DirtyringError(f"cannot start the uplink process: {e.strerror or e}") from None
        finally:
            child.close()
        # The uplink owns the connection now: our copy must not keep it open after it exits.
        sock.close()
        os.close(fd)
        self.on_message = on_message
        self._ended: list[CheckpointEnd | SteadyCheckpoints] = []  # ended, not yet told
        self._ended_at = 0.0
        self._urgent = False  # a checkpoint queued since the last flush has output waiting
        self.dead = threading.Event()
        # A batch window's worth of epochs must fit (the uplink frees cells when told).
        self.stager = Stager(self.staging, max_ahead=max(1, cells - 4), tell=self.flush,
                             send_parts=self._send_parts, gone=self.dead.is_set)
        self.closing = False
        self._final_acked: int | None = None  # once the staging area is unmapped
        self._hello: list[HandshakeDone] = []
        self._hello_done = threading.Event()
        send_msg(self.ctrl, Start(key, insecure, compress_level, heartbeat_interval,
                                  heartbeat_timeout, cells, cell_pages, list(slot_sizes), lease))
        self._reader = threading.Thread(target=self._read, name="uplink-reader", daemon=True)
        self._reader.start()

    # --- control messages from the uplink ---------------------------------------------------
    def _read(self) -> None:
        try:
            while True:
                try:
                    msg = recv_msg(self.ctrl)
                except OSError:
                    msg = None
                except ProtocolError as e:
                    self._broken(str(e))
                    msg = None
                match msg:
                    case None:
                        break
                    case HandshakeDone():
                        self._hello.append(msg)
                        self._hello_done.set()
                    case (Acked() | ResyncRequested() | StandbyTookOver() | Lost() | Skipped()
                          | WireStats() | RevokerArmed()):
                        self.on_message(msg)
                    case _:
                        self._broken(f"the uplink sent a {type(msg).__name__}")
                        break
        finally:
            self.dead.set()
            self._hello_done.set()
            if not self.closing:
                self.on_message(Lost(UPLINK_DIED))

    def _broken(self, why: str) -> None:
        """Not a message the uplink sends (a bug, ours): it cannot be trusted any more. It is
        killed, so the standby sees the connection drop, as when it dies."""
        print(f"dirtyring: {why}; stopping the uplink", file=sys.stderr, flush=True)
        self._kill_process()

    def hello(self, hello: Hello, timeout: float = 15.0) -> tuple[bool, str]:
        """Handshake through the uplink; (accepted, reason)."""
        self._tell(Handshake(hello))
        if not self._hello_done.wait(timeout) or not self._hello:
            return False, ("the uplink process ended during the handshake" if self.dead.is_set()
                           else "the standby did not answer the handshake in time")
        done = self._hello[0]
        return done.accepted, done.reason

    # --- staging ------------------------------------------------------------------------------
    @property
    def acked(self) -> int:
        if self._final_acked is not None:
            return self._final_acked
        return int(self.staging.header[ACKED])

    @property
    def staging_bytes(self) -> int:
        return 0 if self._final_acked is not None else self.stager.staging_bytes

    def _send_parts(self, epoch: int, kind: str, parts: list[Part]) -> None:
        """A full staging cell of a big epoch, told ahead of the epoch's end."""
        self.flush()
        self._tell(StagedParts(epoch, kind, parts))

    def _tell(self, msg: ToUplink) -> None:
        """A control message to the uplink. If it died, the message is dropped (what it
        carried never reaches the standby, so its output stays held): the reader thread sees
        the end of the control socket and reports the loss (``UPLINK_DIED``)."""
        try:
            send_msg(self.ctrl, msg)
        except OSError:
            self.dead.set()

    def alive(self) -> None:
        """Vouch that the epoch loop is alive: the uplink only heartbeats while this moves."""
        self.staging.header[ALIVE] += 1

    def end(self, epoch: int, kind: str, state: bytes, digest: bytes, outputs: int, *,
            flush: bool = True, urgent: bool = False) -> None:
        """Close ``epoch``: the uplink sends it with every part staged since the last end.

        With ``flush=False`` the checkpoint is only queued, to be told together with the
        next ones (``flush``): one wakeup of the uplink, one write to the standby and one ack
        then cover several epochs. Each one is still committed on its own. ``urgent`` (output
        is held for it) asks the uplink to report the ack the moment it arrives, rather than
        leave it for the epoch loop to read at its next epoch boundary."""
        self._queued(CheckpointEnd(epoch, kind, self.stager.take_parts(), state, digest,
                                   outputs), urgent)
        if flush:
            self.flush()

    def end_steady(self, epochs: SteadyEpochs, outputs: int, *, flush: bool = True,
                   urgent: bool = False) -> None:
        """``end`` for all the checkpoints of a steady batch: one record, which the uplink
        turns into the checkpoints (their parts and states are in staging already)."""
        self._queued(SteadyCheckpoints(epochs, outputs), urgent)
        if flush:
            self.flush()

    def _queued(self, entry: CheckpointEnd | SteadyCheckpoints, urgent: bool) -> None:
        self._urgent = self._urgent or urgent
        if not self._ended:
            self._ended_at = time.monotonic()
        self._ended.append(entry)

    def flush(self) -> None:
        """Tell the uplink about every checkpoint ended so far (one control message)."""
        if self._ended:
            self._tell(Checkpoints(self._ended, self._urgent))
            self._ended, self._urgent = [], False

    @property
    def queued_for(self) -> float:
        """Seconds since the oldest checkpoint not yet told to the uplink was ended (0: none)."""
        return time.monotonic() - self._ended_at if self._ended else 0.0

    # --- shutdown ---------------------------------------------------------------------------------
    def close(self, reason: str, timeout: float) -> None:
        """Say Goodbye after everything sent so far, wait for the uplink to finish (it waits
        for the standby to close its side), then make sure it is gone."""
        self.closing = True
        try:
            if not self.dead.is_set():
                self.flush()
                send_msg(self.ctrl, Close(reason))
                self.proc.wait(timeout)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.kill()

    def kill(self) -> None:
        self.closing = True
        self._kill_process()
        try:
            self.ctrl.close()
        except OSError:
            pass
        self._reader.join(1.0)
        if self._final_acked is None:
            self._final_acked = int(self.staging.header[ACKED])
            self.staging.close()

    def _kill_process(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # by PID: this process's own child
            self.proc.wait()

