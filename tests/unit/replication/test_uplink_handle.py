"""The epoch loop's handle on the uplink (``uplink.Uplink``), without KVM and without the
uplink process: a fake ``Popen`` keeps the process's end of the control socket, so this test
plays the uplink process. The staging area is real (a memfd).

- the handshake's answer is the uplink's; an uplink that ends or stays silent is a refusal
  with the reason;
- checkpoints ended without ``flush`` go to the uplink together, in order, in one message,
  urgent if any of them was;
- every other message reaches the primary in order; the end of the uplink is reported once as
  lost, unless the primary is closing it; a message to a dead uplink is dropped, not raised;
- the acknowledged epoch is read from the staging header, and kept once it is unmapped;
- a planned close flushes, says why, and waits for the process.
"""
from __future__ import annotations

import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from dirtyring.replication import uplink_handle as up
from dirtyring.replication.uplink_messages import (ACKED, CheckpointEnd, Checkpoints, Close,
                                                   Handshake, HandshakeDone, Lost, Message,
                                                   ResyncRequested, Start, WireStats, recv_msg,
                                                   send_msg)
from dirtyring.wire import Hello

SID = b"s" * 16


class FakeProcess:
    """Stands in for the uplink process: it keeps the control socket's far end (``ctrl``)."""

    def __init__(self, argv: list[str], pass_fds: tuple[int, ...], **kw: Any) -> None:
        child_fd = int(argv[3])  # python -m dirtyring.replication.uplink_process CTRL SOCK MEMFD SIZE
        assert argv[1:3] == ["-m", "dirtyring.replication.uplink_process"] and child_fd in pass_fds
        self.ctrl = socket.socket(fileno=os.dup(child_fd))
        self.returncode: int | None = None
        self.killed = False
        self.exited = threading.Event()
        FakeProcess.last = self

    last: FakeProcess

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self.exited.wait(timeout if timeout is not None else 60):
            raise subprocess.TimeoutExpired("uplink", timeout or 60)
        assert self.returncode is not None
        return self.returncode

    def kill(self) -> None:
        self.killed = True
        self.exit(-9)

    def exit(self, code: int = 0) -> None:
        """The process ends: its end of the control socket closes."""
        if self.returncode is None:
            self.returncode = code
            self.ctrl.close()
            self.exited.set()

    def recv(self) -> Any:
        self.ctrl.settimeout(30)
        msg = recv_msg(self.ctrl)
        assert msg is not None
        return msg

    def send(self, msg: Message) -> None:
        send_msg(self.ctrl, msg)


class Messages:
    def __init__(self) -> None:
        self.got: list[Message] = []
        self.cv = threading.Condition()

    def __call__(self, msg: Message) -> None:
        with self.cv:
            self.got.append(msg)
            self.cv.notify_all()

    def wait(self, n: int) -> list[Message]:
        with self.cv:
            assert self.cv.wait_for(lambda: len(self.got) >= n, 30), self.got
            return list(self.got)


@pytest.fixture
def uplink(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    # Only the uplink module's view of subprocess: nothing else in this process is affected.
    monkeypatch.setattr(up, "subprocess", SimpleNamespace(
        Popen=FakeProcess, TimeoutExpired=subprocess.TimeoutExpired, DEVNULL=subprocess.DEVNULL))
    made: list[up.Uplink] = []

    def make() -> tuple[up.Uplink, FakeProcess, Messages]:
        a, b = socket.socketpair()
        b.close()
        msgs = Messages()
        u = up.Uplink(a, b"k" * 32, insecure=False, compress_level=1, heartbeat_interval=0.1,
                      heartbeat_timeout=1.0, slot_sizes=[1 << 20], on_message=msgs, cells=4,
                      cell_pages=16)
        made.append(u)
        proc = FakeProcess.last
        start = proc.recv()
        assert type(start) is Start and start.cells == 4 and start.key == b"k" * 32
        return u, proc, msgs

    yield make
    for u in made:
        u.kill()


def hello() -> Hello:
    return Hello(role="primary", version=2, session_id=SID, config=b"{}")


def test_the_handshake_answer_is_the_uplinks(uplink: Any) -> None:
    u, proc, msgs = uplink()
    proc.send(HandshakeDone(True, ""))
    assert u.hello(hello()) == (True, "")
    assert proc.recv() == Handshake(hello())  # (token: no arbiter)
    u2, proc2, _ = uplink()
    proc2.send(HandshakeDone(False, "this standby already follows a primary"))
    assert u2.hello(hello()) == (False, "this standby already follows a primary")


def test_an_uplink_that_ends_or_stays_silent_refuses_the_handshake(uplink: Any) -> None:
    u, proc, msgs = uplink()
    proc.exit(1)
    ok, reason = u.hello(hello())
    assert not ok and "ended during the handshake" in reason
    assert msgs.wait(1) == [Lost(up.UPLINK_DIED)]
    u2, _, msgs2 = uplink()
    ok, reason = u2.hello(hello(), timeout=0.2)  # the fake never answers
    assert not ok and "did not answer the handshake in time" in reason
    assert not msgs2.got


def test_checkpoints_ended_together_go_in_one_message_in_order(uplink: Any) -> None:
    u, proc, _ = uplink()
    assert u.queued_for == 0.0
    u.end(5, "delta", b"s5", b"", 1, flush=False)
    u.end(6, "delta", b"s6", b"", 1, flush=False, urgent=True)
    u.end(7, "delta", b"s7", b"", 2, flush=False)
    assert u.queued_for > 0.0
    u.flush()
    msg = proc.recv()
    assert type(msg) is Checkpoints and msg.urgent is True
    assert [(e.epoch, e.state, e.outputs) for e in msg.ended] == [(5, b"s5", 1), (6, b"s6", 1),
                                                                   (7, b"s7", 2)]
    assert all(type(e) is CheckpointEnd for e in msg.ended)
    assert u.queued_for == 0.0
    u.flush()  # nothing queued: nothing told
    u.end(8, "delta", b"s8", b"", 2)  # flush=True: at once, and no longer urgent
    msg = proc.recv()
    assert type(msg) is Checkpoints and [e.epoch for e in msg.ended] == [8]
    assert msg.urgent is False


def test_messages_reach_the_primary_in_order_and_the_end_is_one_loss(uplink: Any) -> None:
    u, proc, msgs = uplink()
    proc.send(ResyncRequested(4, "memory digest mismatch"))
    proc.send(WireStats({"ack_ms_p50": 0.1}))
    proc.exit(1)
    got = msgs.wait(3)
    assert got == [ResyncRequested(4, "memory digest mismatch"), WireStats({"ack_ms_p50": 0.1}),
                   Lost(up.UPLINK_DIED)]
    assert u.dead.wait(30)
    # Telling a dead uplink about a checkpoint does not raise: it is dropped (its output stays
    # held, since no standby will ever acknowledge it).
    u.end(9, "delta", b"", b"", 3)
    assert msgs.wait(3) == got


def test_a_closing_primary_is_not_told_of_a_loss(uplink: Any) -> None:
    u, proc, msgs = uplink()
    u.end(3, "delta", b"s3", b"", 1, flush=False)

    def uplink_side() -> None:
        msg = proc.recv()  # close flushes what was queued first
        assert type(msg) is Checkpoints and msg.ended[0].epoch == 3
        assert proc.recv() == Close("primary shutting down")
        proc.exit(0)
    t = threading.Thread(target=uplink_side)
    t.start()
    u.close("primary shutting down", timeout=30)
    t.join(30)
    assert not t.is_alive() and proc.returncode == 0 and not proc.killed
    assert not msgs.got


def test_acked_is_read_from_staging_and_kept_once_it_is_unmapped(uplink: Any) -> None:
    u, proc, _ = uplink()
    assert u.acked == 0
    u.staging.header[ACKED] = 41  # as the uplink process writes it
    assert u.acked == 41
    u.kill()
    assert proc.killed and u.acked == 41 and u.staging_bytes == 0


def test_a_malformed_message_from_the_uplink_stops_it_and_is_one_loss(uplink: Any) -> None:
    """Bytes that are no message (a bug of ours) end the uplink, as if it had died: the standby
    sees the connection drop, and the primary is told once."""
    u, proc, msgs = uplink()
    proc.ctrl.sendall(b"\x80\x05garbage")
    assert msgs.wait(1) == [Lost(up.UPLINK_DIED)]
    assert u.dead.wait(30) and proc.killed


def test_uplink_pid_finds_the_one_uplink_child() -> None:
    """``uplink_pid``: the child running uplink_process, among others; an error otherwise."""
    import os
    import signal
    import subprocess
    import sys

    import pytest

    from dirtyring.errors import DirtyringError
    from dirtyring.replication.uplink_handle import uplink_pid

    code = ("import subprocess, sys, time\n"
            "kids = [subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', a])"
            " for a in ('other', 'uplink_process')]\n"
            "print(kids[1].pid, flush=True)\n"
            "time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        want = int(parent.stdout.readline())
        assert uplink_pid(parent.pid) == want
        with pytest.raises(DirtyringError, match="expected one uplink process"):
            uplink_pid(want)  # (the sleeper has no child at all)
    finally:
        for line in open(f"/proc/{parent.pid}/task/{parent.pid}/children").read().split():
            os.kill(int(line), signal.SIGKILL)
        parent.kill()
        parent.wait()
