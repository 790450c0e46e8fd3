"""The primary's network side, in a process of its own: the *uplink*.

Why a process: the epoch loop pauses, captures and resumes the guest thousands of times a
second, and every microsecond it waits for the GIL the guest stays paused. Turning a checkpoint
into authenticated frames (XOR against the standby's copy, sparse encoding, HMAC, send) is
~100 µs of Python per epoch. As a thread of the primary it fought the epoch loop for the GIL:
with a 64-page hot set and 250 µs epochs the loop's cycle went from ~410 µs (nothing sent) to
~700-930 µs p50 (measured on this host). Here it runs on the other core, and the two share:

- a **staging area** (a memfd both map): a ring of fixed-size slots the epoch loop gathers dirty
  pages into while the guest is paused. Its first page is a header of u64 counters: how many
  slots the uplink has released (so the loop reuses a slot without waiting for a message) and
  the last epoch the standby acknowledged (read by the loop at each epoch boundary: no wakeup
  per ack);
- a **control socket** (AF_UNIX, SOCK_SEQPACKET, pickled tuples): checkpoint descriptors one
  way; the handshake result and rare events (resync, failover, lost, statistics) the other.

The uplink owns the TCP connection to the standby and its ``wire.Connection`` (handshake,
sequence numbers, XOR shadow, heartbeats, flow control). It exits the moment the control socket
closes, so a dead primary's connection drops as soon as the kernel has closed the primary's
files. Staging is bounded (slots * slot pages), and so is what is sent but not yet acknowledged
(MAX_UNACKED_BYTES, kept below the socket buffers): when the standby stalls, the uplink stops
taking checkpoints, the epoch loop waits for a free slot, and the guest slows down instead of
data piling up — and a planned stop's Goodbye always fits in the socket buffers.

Run as ``python -m dirtyring.products.uplink FD FD FD SIZE`` by :class:`Uplink`, never by hand.
"""
from __future__ import annotations

import ctypes
import os
import pickle
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from typing import Any, Callable

import numpy as np

from .._bindings.mapping import Mapping, keep_freed_memory, memfd
from ..errors import DirtyringError, ProtocolError
from ..wire import (PRIMARY, Ack, Connection, EpochBegin, EpochEnd, Failover, Goodbye, Heartbeat,
                    Hello, HelloAck, MachineBlob, Pages)
from ..wire import Resync as ResyncEvent
from .transport import Link, LinkClosed

PAGE = 4096
HEADER = 4096
_CONSUMED, _ACKED, _ALIVE = 0, 1, 2  # header words
MAX_UNACKED_BYTES = 2 << 20
MAX_UNACKED_EPOCHS = 16  # bounds the ack (and output) delay when the standby is slow
STATS_EVERY = 0.25
MessageSink = Callable[[tuple[Any, ...]], None]


def _align(n: int) -> int:
    return (n + PAGE - 1) // PAGE * PAGE


class _Staging:
    """The shared staging area: header + ``slots`` slots of ``slot_pages`` pages (and their
    page indices). Both processes build the same views over the same memfd."""

    def __init__(self, fd: int, slots: int, slot_pages: int) -> None:
        self.slots, self.slot_pages = slots, slot_pages
        self.idx_bytes = _align(slot_pages * 8)
        self.slot_bytes = self.idx_bytes + slot_pages * PAGE
        self.size = HEADER + slots * self.slot_bytes
        self.map = Mapping(fd, self.size)
        self.header = self.map.array(np.uint64, 0, HEADER // 8)
        bases = [HEADER + i * self.slot_bytes for i in range(slots)]
        self._idx = [self.map.array(np.int64, b, slot_pages) for b in bases]
        self._data = [self.map.array(np.uint8, b + self.idx_bytes, slot_pages * PAGE)
                      .reshape(-1, PAGE) for b in bases]

    def indices(self, seq: int) -> np.ndarray:
        return self._idx[seq % self.slots]

    def data(self, seq: int) -> np.ndarray:
        return self._data[seq % self.slots]

    def close(self) -> None:
        self._idx, self._data = [], []
        self.map.close()


def _send_msg(sock: socket.socket, *msg: Any) -> None:
    sock.sendall(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))


def _recv_msg(sock: socket.socket) -> tuple[Any, ...] | None:
    data = sock.recv(1 << 20)
    return pickle.loads(data) if data else None


# ================================================================================ parent side


class Uplink:
    """The epoch loop's handle on the uplink process."""

    def __init__(self, sock: socket.socket, key: bytes, *, insecure: bool, compress_level: int,
                 heartbeat_interval: float, heartbeat_timeout: float, slot_sizes: list[int],
                 on_message: MessageSink, slots: int = 8, slot_pages: int = 4096) -> None:
        fd = memfd("dirtyring-staging", HEADER + slots * (_align(slot_pages * 8)
                                                          + slot_pages * PAGE))
        self.staging = _Staging(fd, slots, slot_pages)
        self.ctrl, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for s in (self.ctrl, child):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dirtyring.products.uplink", str(child.fileno()),
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
        self.seq = 0
        self._parts: list[tuple[int, int, int, int]] = []
        self._used: dict[int, int] = {}
        self.closing = False
        self.dead = threading.Event()
        self._hello: list[tuple[Any, ...]] = []
        self._hello_done = threading.Event()
        _send_msg(self.ctrl, "start", {
            "key": key, "insecure": insecure, "compress_level": compress_level,
            "heartbeat_interval": heartbeat_interval, "heartbeat_timeout": heartbeat_timeout,
            "slots": slots, "slot_pages": slot_pages, "slot_sizes": slot_sizes})
        self._reader = threading.Thread(target=self._read, name="uplink-reader", daemon=True)
        self._reader.start()

    # --- control messages from the uplink ---------------------------------------------------
    def _read(self) -> None:
        try:
            while True:
                try:
                    msg = _recv_msg(self.ctrl)
                except OSError:
                    msg = None
                if msg is None:
                    break
                if msg[0] == "hello":
                    self._hello.append(msg)
                    self._hello_done.set()
                else:
                    self.on_message(msg)
        finally:
            self.dead.set()
            self._hello_done.set()
            if not self.closing:
                self.on_message(("lost", "the uplink process ended unexpectedly"))

    def hello(self, hello: Hello, timeout: float = 15.0) -> tuple[bool, str]:
        """Handshake through the uplink; (accepted, reason)."""
        _send_msg(self.ctrl, "hello", hello.role, hello.version, hello.session_id, hello.config)
        if not self._hello_done.wait(timeout) or not self._hello:
            return False, ("the uplink process ended during the handshake" if self.dead.is_set()
                           else "the standby did not answer the handshake in time")
        _, ok, reason = self._hello[0]
        return bool(ok), str(reason)

    # --- staging ------------------------------------------------------------------------------
    _final_acked: int | None = None  # once the staging area is unmapped

    @property
    def acked(self) -> int:
        if self._final_acked is not None:
            return self._final_acked
        return int(self.staging.header[_ACKED])

    @property
    def staging_bytes(self) -> int:
        if self._final_acked is not None:
            return 0
        done = int(self.staging.header[_CONSUMED])
        return sum(b for s, b in self._used.items() if s >= done)

    def _free_slot(self, epoch: int, kind: str, stop: Callable[[], bool]) -> bool:
        """Wait until the slot for ``self.seq`` is free; False if ``stop()`` says give up."""
        hdr = self.staging.header
        if self.seq - int(hdr[_CONSUMED]) < self.staging.slots:
            return True
        if self._parts:  # the uplink can only free slots it has been told about
            _send_msg(self.ctrl, "parts", epoch, kind, self._parts)
            self._parts = []
        while self.seq - int(hdr[_CONSUMED]) >= self.staging.slots:
            if stop() or self.dead.is_set():
                return False
            hdr[_ALIVE] += 1  # waiting on the standby is not being stalled
            time.sleep(50e-6)
        return True

    def stage(self, epoch: int, kind: str, slot: int, view: np.ndarray, pages: np.ndarray,
              stop: Callable[[], bool]) -> int:
        """Copy ``pages`` of guest memory slot ``slot`` (``view``: its pages as rows) into
        staging. Returns how many were staged (fewer only if ``stop()`` gave up waiting).

        An epoch starts in a fresh staging slot and packs the pages of all its memory slots
        into it (a part is (staging seq, offset, memory slot, pages)); the uplink releases a
        staging slot only when the epoch that filled it is done with it."""
        cap = self.staging.slot_pages
        if epoch != self._epoch:
            self._epoch = epoch
            if self._fill:
                self.seq, self._fill = self.seq + 1, 0
        done, i, n = 0, 0, len(pages)
        while i < n:
            if self._fill == cap:
                self.seq, self._fill = self.seq + 1, 0
            if not self._fill and not self._free_slot(epoch, kind, stop):
                return done
            off = self._fill
            k = min(cap - off, n - i)
            chunk = pages[i:i + k]
            self.staging.indices(self.seq)[off:off + k] = chunk
            # mode="clip" skips the defensive copy numpy makes for out= with mode="raise";
            # the tracker only reports pages inside the slot.
            np.take(view, chunk, axis=0, out=self.staging.data(self.seq)[off:off + k],
                    mode="clip")
            self._parts.append((self.seq, off, slot, k))
            self._used[self.seq] = (off + k) * PAGE
            self._used.pop(self.seq - self.staging.slots, None)
            self._fill += k
            i += k
            done += k
        return done

    _epoch = 0
    _fill = 0  # pages used in staging slot ``seq``

    #: Checkpoints staged but not yet taken by the uplink beyond which the epoch loop lets
    #: the guest run on instead of checkpointing (queueing more would only add latency).
    MAX_AHEAD = 4

    def has_room(self) -> bool:
        used = self.seq + (1 if self._fill else 0) - int(self.staging.header[_CONSUMED])
        return used < self.MAX_AHEAD and not self.dead.is_set()

    def alive(self) -> None:
        """Vouch that the epoch loop is alive: the uplink only heartbeats while this moves."""
        self.staging.header[_ALIVE] += 1

    def abandon(self) -> None:
        """Forget pages staged for an epoch that will not be ended (the run is stopping)."""
        if self._parts:
            self.seq, self._fill = self._parts[0][0], self._parts[0][1]
            self._parts = []

    def end(self, epoch: int, kind: str, state: bytes, digest: bytes, outputs: int) -> None:
        """Close ``epoch``: the uplink sends it with every part staged since the last end."""
        _send_msg(self.ctrl, "cp", epoch, kind, self._parts, state, digest, outputs)
        self._parts = []

    # --- shutdown ---------------------------------------------------------------------------------
    def close(self, reason: str, timeout: float) -> None:
        """Say Goodbye after everything sent so far, wait for the uplink to finish (it waits
        for the standby to close its side), then make sure it is gone."""
        self.closing = True
        try:
            if not self.dead.is_set():
                _send_msg(self.ctrl, "close", reason)
                self.proc.wait(timeout)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.kill()

    def kill(self) -> None:
        self.closing = True
        if self.proc.poll() is None:
            self.proc.kill()  # by PID: this process's own child
            self.proc.wait()
        try:
            self.ctrl.close()
        except OSError:
            pass
        self._reader.join(1.0)
        if self._final_acked is None:
            self._final_acked = int(self.staging.header[_ACKED])
            self.staging.close()


# ================================================================================ uplink process


class _Sender:
    """The uplink's state: the link to the standby, the shadow of what it holds, flow
    control, and the acknowledgements it publishes in the staging header."""

    def __init__(self, ctrl: socket.socket, link: Link, staging: _Staging,
                 opts: dict[str, Any]) -> None:
        self.ctrl = ctrl
        self.link = link
        self.st = staging
        self.hb_interval = float(opts["heartbeat_interval"])
        self.hb_timeout = float(opts["heartbeat_timeout"])
        self.sizes = list(opts["slot_sizes"])
        self.shadows: dict[int, np.ndarray | None] = {}
        self.lost = False
        self.closing = False
        self.last_send = time.monotonic()
        self.hb = 0
        self.open: tuple[int, str, bool] | None = None  # epoch, kind, skipped
        self.unacked: dict[int, int] = {}  # epoch -> wire bytes, sent and not acknowledged
        self.sent_at: dict[int, float] = {}
        self.rtt: deque[float] = deque(maxlen=4096)
        self.skipped = 0
        self.acked = 0
        self.cond = threading.Condition()
        self.receiver_done = threading.Event()
        self.ctrl_lock = threading.Lock()
        self.last_stats = 0.0

    def tell(self, *msg: Any) -> None:
        with self.ctrl_lock:
            try:
                _send_msg(self.ctrl, *msg)
            except OSError:
                os._exit(0)  # the primary is gone

    #: Slots up to this size keep a shadow of what the standby holds, for XOR deltas.
    SHADOW_MAX_BYTES = 4 << 30

    def shadow(self, slot: int) -> np.ndarray | None:
        if slot not in self.shadows:
            size = self.sizes[slot]
            # np.zeros is calloc: untouched parts of a big, sparse slot cost nothing.
            self.shadows[slot] = (np.zeros((size // PAGE, PAGE), np.uint8)
                                  if size <= self.SHADOW_MAX_BYTES else None)
        return self.shadows[slot]

    # --- receiving (thread) --------------------------------------------------------------------
    def receive(self) -> None:
        try:
            for ev in self.link.events(timeout=self.hb_timeout):
                if isinstance(ev, Ack):
                    now = time.monotonic()
                    with self.cond:
                        for e in [e for e in self.sent_at if e <= ev.epoch]:
                            t = self.sent_at.pop(e)
                            if e == ev.epoch:
                                self.rtt.append((now - t) * 1e3)
                        for e in [e for e in self.unacked if e <= ev.epoch]:
                            del self.unacked[e]
                        self.acked = ev.epoch
                        self.st.header[_ACKED] = ev.epoch
                        self.cond.notify_all()
                elif isinstance(ev, ResyncEvent):
                    self.tell("resync", ev.epoch, ev.reason)
                elif isinstance(ev, Failover):
                    self.tell("failover", ev.reason)
                    return
                elif isinstance(ev, Goodbye):
                    self.lose(f"standby said goodbye: {ev.reason}")
                    return
        except TimeoutError:
            if not self.closing:
                self.lose(f"no frame from the standby for {self.hb_timeout:g} s")
        except (LinkClosed, ProtocolError) as e:
            if not self.closing:
                self.lose(str(e))
        finally:
            self.receiver_done.set()
            with self.cond:
                self.cond.notify_all()

    def lose(self, reason: str) -> None:
        with self.cond:
            if self.lost:
                return
            self.lost = True
            self.cond.notify_all()
        self.tell("lost", reason)

    # --- sending ---------------------------------------------------------------------------------
    _alive_seen = -1

    def heartbeat_if_idle(self) -> None:
        """A heartbeat vouches for the *primary*, not for this process: it is sent only if the
        epoch loop moved its liveness counter since the last one. A stalled primary (SIGSTOP,
        a hung host thread) falls silent, and the standby takes over as it should."""
        if self.lost or time.monotonic() - self.last_send < self.hb_interval:
            return
        alive = int(self.st.header[_ALIVE])
        if alive == self._alive_seen:
            return
        self._alive_seen = alive
        self.hb += 1
        self._send([([Heartbeat(seq=self.hb, sent_ns=time.monotonic_ns())], False)])

    def _send(self, entries: list[tuple[list[Any], bool]]) -> list[int]:
        """Send entries (events, skip-if-resync) in one write; bytes per entry, -1 if skipped."""
        try:
            sizes = self.link.send_epochs(entries)
        except (LinkClosed, ProtocolError) as e:
            # The standby may have taken over and closed: its Failover may still be unread.
            self.receiver_done.wait(0.5)
            self.lose(f"sending to the standby failed: {e}")
            return [-1] * len(entries)
        self.last_send = time.monotonic()
        return sizes

    def window_open(self) -> bool:
        """Flow control: begin no epoch while too much is unacknowledged."""
        with self.cond:
            return self.lost or (len(self.unacked) < MAX_UNACKED_EPOCHS
                                 and sum(self.unacked.values()) <= MAX_UNACKED_BYTES)

    # An epoch is built into ``self.cur`` from its parts; finished epochs wait in ``self.batch``
    # until every control message that was ready has been read, then go out in one write.
    def _begin(self, epoch: int, kind: str) -> None:
        self.open = (epoch, kind, False)
        self.cur = [EpochBegin(epoch=epoch, kind=kind)]
        self.cur_first = True
        self._n_pages = 0

    def _pages(self, parts: list[tuple[int, int, int, int]]) -> None:
        """Pages events for staged parts. The shadow (what the standby will hold) is updated
        at once, so the next epoch of the same batch XORs against it; if an epoch is skipped
        or the link fails, the full epoch that must follow rewrites every page anyway."""
        assert self.open is not None
        epoch, kind, skipped = self.open
        for seq, off, slot, n in parts:
            self._n_pages += n
            if skipped or self.lost:
                continue
            idx = self.st.indices(seq)[off:off + n].copy()
            data = self.st.data(seq)[off:off + n]
            sh = self.shadow(slot)
            if sh is not None and kind == "delta":
                # XOR against what the standby holds: a page that changed a little becomes
                # mostly zero words, which the codec sends as a sparse body.
                old = sh[idx]
                payload = np.bitwise_xor(data, old, out=old).tobytes()
                self.cur.append(Pages(epoch=epoch, slot=slot, page_size=PAGE, pages=idx,
                                      data=payload, delta=True))
            else:
                self.cur.append(Pages(epoch=epoch, slot=slot, page_size=PAGE, pages=idx,
                                      data=data.tobytes()))
            if sh is not None:
                sh[idx] = data
        if parts:
            self._last_seq = parts[-1][0]
            # Staging slots before the last one are free again; the last one too once the
            # epoch is over (until then the epoch loop may still be filling it).
            self.st.header[_CONSUMED] = self._last_seq

    def on_parts(self, epoch: int, kind: str, parts: list[tuple[int, int, int, int]]) -> None:
        """The first parts of an epoch too big for the free slots, ahead of its end: they go
        out at once (the epoch loop is waiting for their slots)."""
        if self.open is None:
            self._begin(epoch, kind)
        self._pages(parts)
        self.flush()
        if self.cur:
            sizes = self._send([(self.cur, kind == "delta" and self.cur_first)])
            if sizes[0] < 0 and self.cur_first:
                self.open = (epoch, kind, True)  # a Resync came first: skip the whole epoch
            self.cur_first = False
        self.cur = []

    def on_checkpoint(self, epoch: int, kind: str, parts: list[tuple[int, int, int, int]],
                      state: bytes, digest: bytes, outputs: int) -> None:
        if self.open is None:
            self._begin(epoch, kind)
        self._pages(parts)
        assert self.open is not None
        if self.open[2] or self.lost:
            self._skipped(epoch)
        else:
            if state:
                self.cur.append(MachineBlob(epoch=epoch, blob=state))
            self.cur.append(EpochEnd(epoch=epoch, n_pages=self._n_pages, digest=digest,
                                     output_seq=outputs))
            self.batch.append((epoch, self.cur, kind == "delta" and self.cur_first))
        if self._last_seq is not None:
            self.st.header[_CONSUMED] = self._last_seq + 1
        self._last_seq = None
        self.open = None
        self.cur = []

    def _skipped(self, epoch: int) -> None:
        self.skipped += 1
        if not self.lost:
            self.tell("skipped", epoch)

    def flush(self) -> None:
        """Send every finished epoch of the batch in one write."""
        if not self.batch:
            return
        batch, self.batch = self.batch, []
        if self.lost:
            return
        now = time.monotonic()
        with self.cond:
            for epoch, _, _ in batch:
                self.sent_at[epoch] = now
        sizes = self._send([(evs, skip) for _, evs, skip in batch])
        with self.cond:
            for (epoch, _, _), size in zip(batch, sizes):
                if size < 0:
                    self.sent_at.pop(epoch, None)
                elif epoch > self.acked:
                    self.unacked[epoch] = size
        for (epoch, _, _), size in zip(batch, sizes):
            if size < 0:
                self._skipped(epoch)
            elif not self.lost:
                self.sent_epoch = epoch
        self.maybe_stats()

    cur: list[Any] = []
    cur_first = True
    batch: list[tuple[int, list[Any], bool]] = []
    _n_pages = 0
    _last_seq: int | None = None  # staging slot of the open epoch's latest part
    sent_epoch = 0  # the last epoch written to the standby in full

    def maybe_stats(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_stats < STATS_EVERY:
            return
        self.last_stats = now
        w = self.link.conn.statistics()
        with self.cond:
            rtt = np.asarray(self.rtt) if self.rtt else np.zeros(1)
        self.tell("stats", {"compression_ratio": w.compression_ratio_out,
                            "bytes_out": w.bytes_out, "frames_out": w.frames_out,
                            "ack_ms_p50": float(np.percentile(rtt, 50)),
                            "ack_ms_p99": float(np.percentile(rtt, 99)),
                            "skipped_after_resync": self.skipped,
                            "sent_epoch": self.sent_epoch})

    def goodbye(self, reason: str) -> None:
        """A planned stop: no frame after the Goodbye; half-close, then read until the standby
        closes too (closing with its acks unread would reset the connection, which can throw
        away our Goodbye before it is read)."""
        self.closing = True
        if self.lost:
            return
        try:
            self.link.send(Goodbye(reason=reason))
            self.link.sock.shutdown(socket.SHUT_WR)
        except (LinkClosed, ProtocolError, OSError):
            return
        self.receiver_done.wait(max(5.0, 2 * self.hb_timeout))


def _pdeathsig() -> None:
    """Die with the primary even if it never got to close the control socket."""
    try:
        libc = ctypes.CDLL(None)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _handshake(link: Link, ctrl: socket.socket, msg: tuple[Any, ...]) -> bool:
    _, role, version, sid, config = msg
    try:
        link.send(Hello(role=role, version=version, session_id=sid, config=config))
        for ev in link.events(timeout=10.0):
            if isinstance(ev, HelloAck):
                if ev.accepted and not ev.nonce:
                    _send_msg(ctrl, "hello", False, "the standby did not bind the session to a "
                              "nonce (its frames could be replayed); refusing it")
                    return False
                _send_msg(ctrl, "hello", ev.accepted, ev.reason)
                return ev.accepted
            if isinstance(ev, Goodbye):
                _send_msg(ctrl, "hello", False, ev.reason)
                return False
    except TimeoutError:
        _send_msg(ctrl, "hello", False, "the standby did not answer the handshake within 10 s")
    except (LinkClosed, ProtocolError) as e:
        _send_msg(ctrl, "hello", False, f"handshake with the standby failed: {e}")
    return False


def main(argv: list[str]) -> int:
    _pdeathsig()
    keep_freed_memory()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the primary decides when we stop
    ctrl_fd, sock_fd, mem_fd, size = (int(a) for a in argv[:4])
    ctrl = socket.socket(fileno=ctrl_fd)
    sock = socket.socket(fileno=sock_fd)
    start = _recv_msg(ctrl)
    if start is None or start[0] != "start":
        return 2
    opts = start[1]
    staging = _Staging(mem_fd, int(opts["slots"]), int(opts["slot_pages"]))
    os.close(mem_fd)
    if staging.size != size:
        return 2
    link = Link(sock, Connection(PRIMARY, opts["key"], insecure=bool(opts["insecure"]),
                                 compress_level=int(opts["compress_level"])))
    hello = _recv_msg(ctrl)
    if hello is None or hello[0] != "hello" or not _handshake(link, ctrl, hello):
        link.close()
        return 1
    s = _Sender(ctrl, link, staging, opts)
    threading.Thread(target=s.receive, name="receiver", daemon=True).start()
    pending: deque[tuple[Any, ...]] = deque()
    while True:
        blocked = bool(pending)  # the window is shut: poll for acks and a close
        ready, _, _ = select.select([ctrl], [], [], 0.001 if blocked else s.hb_interval)
        # Read every message that is ready, then send what they carried in one write: when
        # the standby or this process falls behind, epochs batch up by themselves.
        while ready:
            try:
                data = ctrl.recv(1 << 20, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            if not data:
                os._exit(0)  # the primary died: drop the connection now, the standby takes over
            msg = pickle.loads(data)
            if msg[0] == "close":
                # Epochs still held back by flow control are never sent: their output was
                # never released, and the standby keeps its last committed checkpoint.
                s.flush()
                s.maybe_stats(force=True)
                s.goodbye(msg[1])
                link.close()
                return 0
            pending.append(msg)
        while pending:
            if s.open is None and not s.window_open():
                break
            msg = pending.popleft()
            if msg[0] == "parts":
                s.flush()
                s.on_parts(*msg[1:])
            elif msg[0] == "cp":
                s.on_checkpoint(*msg[1:])
            if len(s.batch) >= 16:
                s.flush()
        s.flush()
        s.heartbeat_if_idle()
        s.maybe_stats()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
