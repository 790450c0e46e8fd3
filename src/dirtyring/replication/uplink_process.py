"""The uplink process: takes checkpoints from the staging area and sends them to the standby.

See ``uplink_handle.py`` for why it is a process. It owns the TCP connection and its
``wire.Connection``; a receiver thread turns the standby's acknowledgements into the staging
header's acked counter and forwards rare events (Resync, Failover, loss) to the epoch loop.
The control messages (``uplink_messages.py``) are handled by type (``_Control``). Finished
epochs are sent in one write per burst of control messages, so when this process or the
standby falls behind, epochs go out together by themselves.

Run as ``python -m dirtyring.replication.uplink_process FD FD FD SIZE`` by
``uplink_handle.Uplink``.
"""
from __future__ import annotations

import ctypes
import os
import select
import signal
import socket
import sys
import threading
import time
from collections import deque
from typing import Any, NoReturn

import numpy as np

from .._bindings.mapping import keep_freed_memory
from ..errors import ProtocolError, RemoteProtocolError
from ..machine.native import sparse_delta, take_words
from ..machine.stats import WindowHistogram
from ..wire import (PRIMARY, Ack, Checkpoint, Connection, EpochBegin, EpochEnd, Failover,
                    Goodbye, Heartbeat, Hello, MachineBlob, Pages)
from ..wire import Resync as ResyncEvent
from .arbiter import Revoker
from .staging_area import PAGE, Staging
from .transport import HandshakeRefused, Link, LinkClosed, handshake
from .uplink_messages import (ACKED, ALIVE, CONSUMED, Acked, CheckpointEnd, Checkpoints, Close,
                              FromUplink, Handshake, HandshakeDone, Lost, Part, ResyncRequested,
                              RevokerArmed, Skipped, StagedParts, StandbyTookOver, Start,
                              SteadyCheckpoints, WireStats, recv_msg, send_msg)

MAX_UNACKED_BYTES = 2 << 20  # kept below the socket buffers: a Goodbye always fits
#: Bounds the ack (and output) delay when the standby is slow. At ~3,500 checkpoints/s an ack
#: round trip of ~5 ms (p99 here) spans ~18 epochs: 16 shut the window in every such burst.
MAX_UNACKED_EPOCHS = 64
STATS_EVERY = 0.25
#: Histogram bounds (Prometheus ``le``) of the ack round trip, seconds: sent in the statistics
#: as cumulative counts, for the primary's metrics.
ACK_BUCKETS_S = (50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3,
                 100e-3, 250e-3, 1.0)
NICE = 5  # the uplink's priority below the epoch loop's (see main)
#: After this long without a control message the uplink checks the primary is not dying (see
#: ``_exiting``): a kill -9 is seen within about this, not when the primary's files close.
WATCH_S = 0.002
#: Finished epochs sent in one write at most (more wait for the next).
MAX_OUTGOING = 16
#: Memory slots up to this size keep a shadow of what the standby holds, for XOR deltas.
SHADOW_MAX_BYTES = 4 << 30


class _Sender:
    """The uplink's state: the link to the standby, the shadow of what it holds, flow
    control, and the acknowledgements it publishes in the staging header.

    An epoch is built into ``cur`` from its parts; finished epochs wait in ``outgoing``
    until every control message that was ready has been read, then go out in one write."""

    def __init__(self, ctrl: socket.socket, link: Link, staging: Staging, start: Start,
                 token: int) -> None:
        self.ctrl = ctrl
        self.link = link
        self.st = staging
        self.token = token  # our primary's fencing token (its Hello's): every Ack must carry it
        self.hb_interval = float(start.heartbeat_interval)
        self.hb_timeout = float(start.heartbeat_timeout)
        self.sizes = list(start.slot_sizes)
        self.shadows: dict[int, np.ndarray | None] = {}
        self.lost = False
        self.closing = False
        self.last_send = time.monotonic()
        self.hb = 0
        self._alive_seen = -1  # the epoch loop's liveness counter at the last heartbeat
        self.open: tuple[int, str, bool] | None = None  # epoch, kind, skipped
        self.cur: list[Any] = []  # the open epoch's events not yet sent
        self.cur_first = True  # nothing of the open epoch has been sent yet
        self._n_pages = 0  # in the open epoch
        self._last_seq: int | None = None  # staging cell of the open epoch's latest part
        self.outgoing: list[tuple[int, list[Any], bool]] = []  # (epoch, events, skip-if-resync)
        self.sent_epoch = 0  # the last epoch written to the standby in full
        self.unacked: dict[int, int] = {}  # epoch -> wire bytes, sent and not acknowledged
        self.sent_at: dict[int, float] = {}
        self.rtt: deque[float] = deque(maxlen=4096)
        self.rtt_n = 0  # round trips ever appended to ``rtt``
        self.rtt_hist = WindowHistogram(self.rtt, lambda: self.rtt_n, ACK_BUCKETS_S,
                                        scale=1e-3)
        self.skipped = 0
        self.acked = 0
        self.lock = threading.Lock()  # unacked, sent_at, rtt, acked: both threads
        self.receiver_done = threading.Event()
        self.ctrl_lock = threading.Lock()
        self.last_stats = 0.0
        self.report_ack = 0  # tell the primary at once when this epoch is acknowledged

    def tell(self, msg: FromUplink) -> None:
        with self.ctrl_lock:
            try:
                send_msg(self.ctrl, msg)
            except OSError:
                # The primary is gone: revoke its lease and hang up, from whichever thread
                # finds out first (exiting alone would leave the lease to run out).
                _primary_died(self.link)

    def shadow(self, slot: int) -> np.ndarray | None:
        """Guest memory slot ``slot`` as the standby holds it (None: too big to keep)."""
        if slot not in self.shadows:
            size = self.sizes[slot]
            # np.zeros is calloc: untouched parts of a big, sparse slot cost nothing.
            self.shadows[slot] = (np.zeros((size // PAGE, PAGE), np.uint8)
                                  if size <= SHADOW_MAX_BYTES else None)
        return self.shadows[slot]

    # --- receiving (thread) --------------------------------------------------------------------
    def receive(self) -> None:
        try:
            for ev in self.link.events(timeout=self.hb_timeout):
                if isinstance(ev, Ack):
                    if ev.token != self.token:
                        self.lose(f"the standby acknowledged for fencing token {ev.token}, "
                                  f"not ours ({self.token})")
                        return
                    now = time.monotonic()
                    with self.lock:
                        for e in [e for e in self.sent_at if e <= ev.epoch]:
                            t = self.sent_at.pop(e)
                            if e == ev.epoch:
                                self.rtt.append((now - t) * 1e3)
                                self.rtt_n += 1
                                if self.rtt_n >= self.rtt_hist.next:
                                    self.rtt_hist.fold()
                        for e in [e for e in self.unacked if e <= ev.epoch]:
                            del self.unacked[e]
                        self.acked = ev.epoch
                        self.st.header[ACKED] = ev.epoch
                        report = self.report_ack and ev.epoch >= self.report_ack
                        if report:
                            self.report_ack = 0
                    if report:  # output is held for it: the primary releases it now
                        self.tell(Acked(ev.epoch))
                elif isinstance(ev, ResyncEvent):
                    self.tell(ResyncRequested(ev.epoch, ev.reason))
                elif isinstance(ev, Failover):
                    self.tell(StandbyTookOver(ev.reason))
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

    def lose(self, reason: str) -> None:
        with self.lock:
            if self.lost:
                return
            self.lost = True
        self.tell(Lost(reason))

    # --- sending ---------------------------------------------------------------------------------
    def heartbeat_if_idle(self) -> None:
        """A heartbeat vouches for the *primary*, not for this process: it is sent only if the
        epoch loop moved its liveness counter since the last one. A stalled primary (SIGSTOP,
        a hung host thread) falls silent, and the standby takes over as it should."""
        if self.lost or time.monotonic() - self.last_send < self.hb_interval:
            return
        alive = int(self.st.header[ALIVE])
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
        with self.lock:
            return self.lost or (len(self.unacked) < MAX_UNACKED_EPOCHS
                                 and sum(self.unacked.values()) <= MAX_UNACKED_BYTES)

    def _begin(self, epoch: int, kind: str) -> None:
        self.open = (epoch, kind, False)
        self.cur = []
        self.cur_first = True
        self._n_pages = 0

    def _pages(self, parts: list[Part]) -> None:
        """Pages events for staged parts. The shadow (what the standby will hold) is updated
        at once, so the next epoch told with it XORs against it; if an epoch is skipped
        or the link fails, the full epoch that must follow rewrites every page anyway."""
        assert self.open is not None
        epoch, kind, skipped = self.open
        for seq, off, slot, n, words in parts:
            self._n_pages += n
            if skipped or self.lost:
                continue
            idx = self.st.indices(seq)[off:off + n].copy()
            data = self.st.data(seq)[off:off + n]
            sh = self.shadow(slot)
            if words >= 0:  # the pause staged the XOR delta itself (see ``Part``)
                base, ibase = self.st.addresses(seq)
                self.cur.append(_staged_delta(epoch, slot, idx, base + off * PAGE,
                                              ibase + off * 8, words, sh))
                continue
            if sh is not None and kind == "delta":
                self.cur.append(_delta(epoch, slot, idx, data, sh))
                continue
            self.cur.append(Pages(epoch=epoch, slot=slot, page_size=PAGE, pages=idx,
                                  data=data.tobytes()))
            if sh is not None:
                sh[idx] = data
        if parts:
            self._last_seq = parts[-1].seq
            # Staging cells before the last one are free again; the last one too once the
            # epoch is over (until then the epoch loop may still be filling it).
            self.st.header[CONSUMED] = self._last_seq

    def on_parts(self, msg: StagedParts) -> None:
        """Parts of a big epoch ahead of its end (a staging cell the epoch loop filled): they
        go out at once, so the epoch streams while the rest is still being gathered."""
        epoch, kind = msg.epoch, msg.kind
        if self.open is None:
            self._begin(epoch, kind)
        self._pages(msg.parts)
        self.flush()
        if self.cur_first:
            self.cur.insert(0, EpochBegin(epoch=epoch, kind=kind))
        if self.cur:
            sizes = self._send([(self.cur, kind == "delta" and self.cur_first)])
            if sizes[0] < 0 and self.cur_first:
                self.open = (epoch, kind, True)  # a Resync came first: skip the whole epoch
            self.cur_first = False
        self.cur = []

    def on_checkpoint(self, cp: CheckpointEnd) -> None:
        """The end of an epoch: it joins ``outgoing`` (or is skipped, after a Resync)."""
        epoch, kind, state = cp.epoch, cp.kind, cp.state
        if self.open is None:
            self._begin(epoch, kind)
        self._pages(cp.parts)
        assert self.open is not None
        if self.open[2] or self.lost:
            self._skipped(epoch)
        elif self.cur_first:  # the whole epoch is here: one event (see wire.Checkpoint)
            whole = Checkpoint.decoded(epoch=epoch, kind=kind, pages=tuple(self.cur), blob=state,
                                       digest=cp.digest, output_seq=cp.outputs)
            self.outgoing.append((epoch, [whole], kind == "delta"))
        else:
            if state:
                self.cur.append(MachineBlob(epoch=epoch, blob=state))
            self.cur.append(EpochEnd(epoch=epoch, n_pages=self._n_pages, digest=cp.digest,
                                     output_seq=cp.outputs))
            self.outgoing.append((epoch, self.cur, False))
        if self._last_seq is not None:
            self.st.header[CONSUMED] = self._last_seq + 1
        self._last_seq = None
        self.open = None
        self.cur = []

    def _skipped(self, epoch: int) -> None:
        self.skipped += 1
        if not self.lost:
            self.tell(Skipped(epoch))

    def flush(self) -> None:
        """Send every finished epoch waiting in ``outgoing`` in one write."""
        if not self.outgoing:
            return
        sent, self.outgoing = self.outgoing, []
        if self.lost:
            return
        now = time.monotonic()
        with self.lock:
            for epoch, _, _ in sent:
                self.sent_at[epoch] = now
        sizes = self._send([(evs, skip) for _, evs, skip in sent])
        with self.lock:
            for (epoch, _, _), size in zip(sent, sizes):
                if size < 0:
                    self.sent_at.pop(epoch, None)
                elif epoch > self.acked:
                    self.unacked[epoch] = size
        for (epoch, _, _), size in zip(sent, sizes):
            if size < 0:
                self._skipped(epoch)
            elif not self.lost:
                self.sent_epoch = epoch
        self.maybe_stats()

    def maybe_stats(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_stats < STATS_EVERY:
            return
        self.last_stats = now
        w = self.link.conn.statistics()
        with self.lock:
            rtt = np.asarray(self.rtt) if self.rtt else np.zeros(1)
            self.rtt_hist.fold()
            h = self.rtt_hist.value
        self.tell(WireStats({"compression_ratio": w.compression_ratio_out,
                             "bytes_out": w.bytes_out, "frames_out": w.frames_out,
                             "ack_ms_p50": float(np.percentile(rtt, 50)),
                             "ack_ms_p99": float(np.percentile(rtt, 99)),
                             "skipped_after_resync": self.skipped,
                             "sent_epoch": self.sent_epoch,
                             "ack_hist": (h.bounds, h.counts, h.total, h.n)}))

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


_WORDS = PAGE // 8


def _delta(epoch: int, slot: int, idx: np.ndarray, data: np.ndarray, shadow: np.ndarray) -> Pages:
    """Pages for staged ``data`` as an XOR delta against ``shadow`` (what the standby holds),
    which is brought up to date.

    Pages that changed a little (the common case: a few words per page) are compared, not
    XORed: the changed words' offsets and XOR values go out as a sparse body built straight
    from them, and the shadow is written only at those words. For a 64-page hot set this is
    ~4x cheaper than XORing, copying and scanning 256 KiB, then copying it all into the shadow.
    A contiguous run of pages (a hot set usually is one) is compared in place, without a
    gather. Pages that changed a lot go as full XOR data, which the codec encodes by run.

    The compare is C when it can be (``native.sparse_delta``): one pass, no temporaries. The
    staged pages come from memory (the epoch loop writes them with non-temporal stores), and
    numpy's compare, scan, gathers and scatter took ~65 µs per checkpoint of a 64-page hot set
    at 150 µs epochs here (two calls: the hot set's slot and the system slot), the one pass
    ~49 µs; with no temporaries the uplink's whole CPU per checkpoint went from ~160 to
    ~115 µs (same host, same hour)."""
    n = len(idx)
    got = sparse_delta(data, shadow, idx, n * _WORDS // 8)
    if got is not None:
        return Pages.decoded(epoch=epoch, slot=slot, page_size=PAGE, pages=idx, data=None,
                             delta=True, words=got)
    new = data.view(np.uint64)
    sh = shadow.view(np.uint64)
    first = int(idx[0])
    contiguous = int(idx[-1]) - first == n - 1
    old = sh[first:first + n] if contiguous else sh[idx]
    where = np.flatnonzero(new != old)
    if len(where) <= n * _WORDS // 8:
        vals = new.reshape(-1)[where]
        diff = vals ^ old.reshape(-1)[where]
        if contiguous:
            old.reshape(-1)[where] = vals
        else:
            sh[idx[where // _WORDS], where % _WORDS] = vals
        return Pages.decoded(epoch=epoch, slot=slot, page_size=PAGE, pages=idx, data=None,
                             delta=True, words=(where, diff))
    payload = np.bitwise_xor(new, old, out=old if not contiguous else None).tobytes()
    sh[idx] = new
    return Pages(epoch=epoch, slot=slot, page_size=PAGE, pages=idx, data=payload, delta=True)


def _staged_delta(epoch: int, slot: int, idx: np.ndarray, staged: int, pages: int,
                  words: int, shadow: np.ndarray | None) -> Pages:
    """Pages for a part the pause staged as changed words (``uplink_messages.Part``; its pages at
    address ``staged``, their indices at ``pages``); the shadow, if kept, takes the same
    words. (C: numpy's slicing, copies and scatter were ~18 µs per part here.)"""
    got = take_words(staged, len(idx), words, pages,
                     0 if shadow is None else _address(shadow))
    return Pages.decoded(epoch=epoch, slot=slot, page_size=PAGE, pages=idx, data=None,
                         delta=True, words=got)


_ADDRESSES: dict[int, int] = {}


def _address(a: np.ndarray) -> int:
    """The address of a long-lived array (a shadow), looked up once."""
    got = _ADDRESSES.get(id(a))
    if got is None:
        got = _ADDRESSES[id(a)] = int(a.ctypes.data)
    return got


def _exiting(pid: int) -> bool:
    """Is process ``pid`` (the primary) dying or gone? Its /proc state is zombie or dead, or
    its leader carries PF_EXITING (set first thing in the kernel's do_exit).

    Waiting for its end of the control socket to close is too slow: a killed VMM closes its
    files only after its address space is torn down, and KVM's part of that (flushing the
    VM's shadow pages, a synchronize_srcu) took 5-30 ms on this host."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return True
    return fields[0] in (b"Z", b"X", b"x") or bool(int(fields[6]) & _PF_EXITING)


_PF_EXITING = 0x4


#: Set at start when the primary holds an etcd lease (``arbiter.py``): revoked first thing
#: when the primary dies, so the standby, which takes over when its connection drops, finds
#: the group's key free at once instead of waiting out the lease.
_REVOKER: Revoker | None = None


def _arm_revoker(lease: dict[str, Any], s: _Sender) -> None:
    """Build the revoker, then say so: until then a crash leaves the lease to run out."""
    global _REVOKER
    _REVOKER = Revoker(lease)
    s.tell(RevokerArmed())


def _primary_died(link: Link) -> NoReturn:
    """Revoke the primary's lease, drop the standby's connection at once (it takes over), go."""
    if _REVOKER is not None and not _REVOKER.revoke():
        print("dirtyring uplink: could not revoke the dead primary's etcd lease (no member "
              "answered); the standby waits for it to run out", file=sys.stderr, flush=True)
    try:
        link.sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    os._exit(0)


def _pdeathsig() -> None:
    """Be told when the primary dies even if it never got to close the control socket.

    The signal is catchable (see ``_on_parent_death``): killed outright, this process would
    close the standby's connection only at the end of its own exit, ~10 ms later."""
    try:
        libc = ctypes.CDLL(None)
        libc.prctl(1, _DEATH_SIGNAL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


_DEATH_SIGNAL = signal.SIGUSR1


def _on_parent_death(primary: int, link: Link) -> None:
    """The parent *thread* ended: if that was the primary dying, drop the connection now."""
    def handler(signum: int, frame: Any) -> None:
        if os.getppid() != primary or _exiting(primary):
            _primary_died(link)
    signal.signal(_DEATH_SIGNAL, handler)


def _handshake(link: Link, ctrl: socket.socket, hello: Hello) -> bool:
    """Say the primary's Hello to the standby and tell the primary how it went."""
    try:
        ack = handshake(link, hello)
        send_msg(ctrl, HandshakeDone(True, ack.reason))
        return True
    except HandshakeRefused as e:
        send_msg(ctrl, HandshakeDone(False, str(e)))
    except TimeoutError:
        send_msg(ctrl, HandshakeDone(False, "the standby did not answer the handshake within 10 s"))
    except (LinkClosed, ProtocolError) as e:
        send_msg(ctrl, HandshakeDone(False, f"handshake with the standby failed: {e}"))
    return False


class _Control:
    """What the uplink does with each control message after the handshake, by type.

    Checkpoints and staged parts wait in ``pending`` (a steady batch's record expanded into
    its checkpoints) until flow control lets them go (``send_pending``)."""

    def __init__(self, sender: _Sender) -> None:
        self.s = sender
        self.pending: deque[StagedParts | CheckpointEnd] = deque()

    def take(self, msg: object) -> Close | None:
        """Handle one message from the epoch loop; a ``Close`` is returned, for the caller to
        stop. Raises RemoteProtocolError for a message the epoch loop never sends now."""
        match msg:
            case Checkpoints():
                self._checkpoints(msg)
            case StagedParts():
                self.pending.append(msg)
            case Close():
                return msg
            case _:
                raise RemoteProtocolError(f"unexpected control message from the primary after "
                                          f"the handshake: {type(msg).__name__}")
        return None

    def _checkpoints(self, msg: Checkpoints) -> None:
        for cp in msg.ended:
            if isinstance(cp, SteadyCheckpoints):
                self.pending.extend(cp.expand(self.s.st))
            else:
                self.pending.append(cp)
        if msg.urgent and msg.ended:
            with self.s.lock:
                self.s.report_ack = max(self.s.report_ack, msg.last_epoch)

    def send_pending(self) -> None:
        """Build and send what is pending, as far as the flow-control window lets epochs
        begin (an epoch already begun is always finished)."""
        s = self.s
        while self.pending:
            if s.open is None and not s.window_open():
                break
            msg = self.pending.popleft()
            if isinstance(msg, StagedParts):
                s.flush()
                s.on_parts(msg)
            else:
                s.on_checkpoint(msg)
            if len(s.outgoing) >= MAX_OUTGOING:
                s.flush()


def _lower_priority() -> None:
    """Set this process up as the epoch loop's background helper.

    Background work must not delay the epoch loop, which holds the guest paused while it
    runs: measured with a 64-page hot set at 250 us epochs, nice 5 here took the loop from
    ~1,450 to ~2,000 checkpoints/s and the guest from ~30 % to ~41 % of its speed. The
    uplink still has the other core; when it falls behind, the guest just runs longer epochs."""
    _pdeathsig()
    keep_freed_memory()
    try:
        os.nice(NICE)
    except OSError:
        pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the primary decides when we stop


def _start(ctrl: socket.socket, sock: socket.socket, mem_fd: int,
           size: int) -> _Sender | int:
    """Map staging, open the link and handshake, as ``Start`` and ``Handshake`` say: the
    sender, or the exit status if it came to nothing."""
    start = recv_msg(ctrl)
    if not isinstance(start, Start):
        return 2
    staging = Staging(mem_fd, start.cells, start.cell_pages)
    os.close(mem_fd)
    if staging.size != size:
        return 2
    link = Link(sock, Connection(PRIMARY, start.key, insecure=start.insecure,
                                 compress_level=start.compress_level))
    hello = recv_msg(ctrl)
    if not isinstance(hello, Handshake) or not _handshake(link, ctrl, hello.hello):
        link.close()
        return 1
    s = _Sender(ctrl, link, staging, start, hello.hello.token)
    if start.lease:
        # After the handshake, beside the sending: importing the etcd client (requests) and
        # connecting take ~0.3 s here and seconds on a loaded host, which before the Hello
        # could outlast the standby's patience. A primary dying before it is ready leaves
        # the lease to run out (the safe, slow path).
        threading.Thread(target=_arm_revoker, args=(start.lease, s), daemon=True).start()
    threading.Thread(target=s.receive, name="receiver", daemon=True).start()
    return s


def _read_ready(ctrl: socket.socket, control: _Control, link: Link) -> Close | None:
    """Take every control message that is ready (none may be); a ``Close`` stops there.

    Everything ready is read before anything is sent: when the standby or this process
    falls behind, the epochs go out together in one write."""
    while True:
        try:
            msg = recv_msg(ctrl, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None
        if msg is None:
            _primary_died(link)
        close = control.take(msg)
        if close is not None:
            return close


def _serve(s: _Sender, ctrl: socket.socket, primary: int) -> int:
    """Send what the epoch loop tells until it closes (0) or dies (this process ends)."""
    control = _Control(s)
    while True:
        blocked = bool(control.pending)  # the window is shut: poll for acks and a close
        ready, _, _ = select.select([ctrl], [], [],
                                    0.001 if blocked else min(s.hb_interval, WATCH_S))
        if not ready and _exiting(primary):
            _primary_died(s.link)
        close = _read_ready(ctrl, control, s.link) if ready else None
        if close is not None:
            # Epochs still held back by flow control are never sent: their output was
            # never released, and the standby keeps its last committed checkpoint.
            s.flush()
            s.maybe_stats(force=True)
            s.goodbye(close.reason)
            s.link.close()
            return 0
        control.send_pending()
        s.flush()
        s.heartbeat_if_idle()
        s.maybe_stats()


def main(argv: list[str]) -> int:
    _lower_priority()
    ctrl_fd, sock_fd, mem_fd, size = (int(a) for a in argv[:4])
    ctrl = socket.socket(fileno=ctrl_fd)
    sock = socket.socket(fileno=sock_fd)
    try:
        s = _start(ctrl, sock, mem_fd, size)
        if isinstance(s, int):
            return s
        primary = os.getppid()
        _on_parent_death(primary, s.link)
        return _serve(s, ctrl, primary)
    except RemoteProtocolError as e:
        # A bug of ours (both ends are this package): exiting drops the standby's connection,
        # and the primary sees the uplink die.
        print(f"dirtyring uplink: {e}", file=sys.stderr, flush=True)
        return 3


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
