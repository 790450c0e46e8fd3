"""The uplink notices its primary's death itself (uplink_process._exiting, _on_parent_death):
a killed VMM closes its files only after a slow teardown, so waiting for the control socket to
close made failover wait 10-30 ms. These check the behaviour, not the speed (the failover
benchmark measures that)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

from dirtyring.replication.uplink_process import _exiting

# P starts C from a thread that then ends (a parent-*thread* death: P lives on), and waits.
# C arms the parent-death signal and its handler over a Link-like object holding the socket.
_PARENT = textwrap.dedent("""
    import os, subprocess, sys, threading, time
    fd = int(sys.argv[1])
    child = {}
    def spawn():  # ends once the child has armed its parent-death signal
        child["p"] = subprocess.Popen([sys.executable, "-c", sys.argv[2], str(fd)],
                                      pass_fds=(fd,), stdout=subprocess.PIPE)
        child["p"].stdout.readline()
    t = threading.Thread(target=spawn); t.start(); t.join()
    os.close(fd)
    print(child["p"].pid, flush=True)
    time.sleep(60)
""")
_CHILD = textwrap.dedent("""
    import os, socket, sys, time
    from types import SimpleNamespace
    from dirtyring.replication import uplink_process as U
    U._pdeathsig()
    sock = socket.socket(fileno=int(sys.argv[1]))
    U._on_parent_death(os.getppid(), SimpleNamespace(sock=sock))
    print("armed", flush=True)
    sock.sendall(b"ready")
    while True:
        time.sleep(1)
""")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def test_exiting_tells_dying_and_gone_processes_from_live_and_stopped_ones() -> None:
    assert not _exiting(os.getpid())
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert not _exiting(p.pid)
        os.kill(p.pid, signal.SIGSTOP)  # a stalled primary is not a dead one
        assert not _exiting(p.pid)
        os.kill(p.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not _exiting(p.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _exiting(p.pid)  # zombie until reaped
    finally:
        p.kill()
        p.wait()
    assert _exiting(p.pid)  # reaped: gone


def test_uplink_drops_its_connection_when_the_primary_dies_not_when_a_thread_ends() -> None:
    a, b = socket.socketpair()
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, str(b.fileno()), _CHILD],
                              pass_fds=(b.fileno(),), stdout=subprocess.PIPE, text=True)
    b.close()
    child = 0
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        a.settimeout(30)
        assert a.recv(5) == b"ready"
        # The thread that started the child has ended: the child got its parent-death signal
        # and must have ignored it, since the primary itself lives on.
        a.settimeout(0.5)
        try:
            assert a.recv(1) != b"", "the child dropped the connection while its parent lived"
        except socket.timeout:
            pass
        assert _alive(child)
        parent.kill()  # kill -9 the "primary"
        a.settimeout(30)
        assert a.recv(1) == b""  # the child shut the connection down
        deadline = time.monotonic() + 30
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not _alive(child)
    finally:
        a.close()
        parent.kill()
        parent.wait()
        if child and _alive(child):
            os.kill(child, signal.SIGKILL)  # by PID: our own grandchild
