"""``dirtyring serve`` and ``dirtyring-client``: a command run through the warm server behaves
as ``dirtyring`` itself would (output, stdin, status, usage errors), several run at once, the
signals a shell sends reach the program, a client that goes away hangs its program up, a worker
killed by a signal is reported as a shell would, and a malformed request gets a clear error
and leaves the server serving. Every process is ended by its PID."""
from __future__ import annotations

import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dirtyring.cli.child import stop_process
from dirtyring.cli.client import client_path
from dirtyring.cli.server import KIND_ERROR, KIND_PID, SPARES, encode_request
from dirtyring.linux.signals import killed_line

HERE = Path(__file__).resolve().parent / "programs"
PATIENCE = 60.0  # generous: a loaded host cannot fail a test by being slow


class Served:
    """A running ``dirtyring serve`` (its log lines collected) and how to reach it."""

    def __init__(self, sock: Path) -> None:
        self.sock = sock
        self.log: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dirtyring.cli.main", "serve", "--socket", str(sock)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.ready = self.proc.stdout.readline()
        threading.Thread(target=self._collect, daemon=True).start()

    def _collect(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line.rstrip("\n"))

    def env(self) -> dict[str, str]:
        return dict(os.environ, DIRTYRING_SOCKET=str(self.sock))

    def wait_log(self, pattern: str, after: int = 0) -> re.Match[str]:
        """The first log line from index ``after`` on matching ``pattern`` (waiting for it)."""
        deadline = time.monotonic() + PATIENCE
        while time.monotonic() < deadline:
            for line in self.log[after:]:
                m = re.search(pattern, line)
                if m:
                    return m
            time.sleep(0.01)
        raise AssertionError(f"no log line matching {pattern!r} in {self.log[after:]!r}")

    def stop(self) -> int:
        return stop_process(self.proc, grace=PATIENCE)


@pytest.fixture(scope="module")
def prog(static_build, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return static_build(HERE / "warm.c", tmp_path_factory.mktemp("warm") / "warm")


@pytest.fixture(scope="module")
def client() -> Path:
    return client_path()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    s = Served(tmp_path_factory.mktemp("serve") / "s.sock")
    try:
        assert "listening on" in s.ready, s.ready
        yield s
    finally:
        assert s.stop() == 0


def _end(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is None:
        p.kill()
        p.wait()


def _cold(prog: Path, args: list[str], stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "dirtyring.cli.main", "run", "--exec",
                           str(prog), "--", *args], input=stdin, capture_output=True,
                          timeout=PATIENCE)


def test_a_command_runs_as_dirtyring_itself_would(server: Served, client: Path,
                                                  prog: Path) -> None:
    args, stdin = ["5", "two words", "ünïcode"], b"from stdin\n" * 1000
    before = len(server.log)
    warm = subprocess.run([str(client), "run", "--exec", str(prog), "--", *args],
                          input=stdin, capture_output=True, timeout=PATIENCE, env=server.env())
    cold = _cold(prog, args, stdin)
    assert (warm.stdout, warm.stderr, warm.returncode) == \
        (cold.stdout, cold.stderr, cold.returncode)
    assert warm.returncode == 5 and warm.stdout.endswith(stdin)
    m = server.wait_log(r"worker (\d+) took a command", before)  # served, not run cold
    server.wait_log(rf"worker {m.group(1)} ended with status 5", before)


def test_usage_errors_read_as_dirtyring_s(server: Served, client: Path) -> None:
    bad = subprocess.run([str(client), "run", "--no-such-flag"], capture_output=True,
                         text=True, timeout=PATIENCE, env=server.env())
    assert bad.returncode == 2
    assert "unrecognized arguments: --no-such-flag" in bad.stderr
    missing = subprocess.run([str(client), "run", "--exec", "/no/such/program"],
                             capture_output=True, text=True, timeout=PATIENCE,
                             env=server.env())
    assert missing.returncode == 1
    assert "cannot read the program" in missing.stderr and "Traceback" not in missing.stderr
    nested = subprocess.run([str(client), "serve"], capture_output=True, text=True,
                            timeout=PATIENCE, env=server.env())
    assert nested.returncode == 2
    assert "started with `dirtyring serve` itself" in nested.stderr


def _spin(client: Path, prog: Path, server: Served) -> subprocess.Popen[bytes]:
    """A client running ``warm spin``, once the program has said it runs."""
    p = subprocess.Popen([str(client), "run", "--exec", str(prog), "--", "spin"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=server.env())
    assert p.stdout is not None and p.stderr is not None
    first = p.stdout.readline()
    if first != b"ready\n":
        _end(p)
        raise AssertionError(f"{first!r}, stderr {p.stderr.read()!r}, log {server.log!r}")
    return p


def test_commands_run_at_once_and_get_the_shell_s_signals(server: Served, client: Path,
                                                           prog: Path) -> None:
    a = b = None
    try:
        a = _spin(client, prog, server)
        b = _spin(client, prog, server)  # both are running now
        a.send_signal(signal.SIGTERM)
        b.send_signal(signal.SIGINT)
        assert a.wait(PATIENCE) == 128 + signal.SIGTERM
        assert b.wait(PATIENCE) == 128 + signal.SIGINT
        assert b.stderr is not None
        assert killed_line(signal.SIGINT) in b.stderr.read().decode()
    finally:
        for p in (a, b):
            if p is not None:
                _end(p)


def test_a_client_that_goes_away_hangs_its_program_up(server: Served, client: Path,
                                                       prog: Path) -> None:
    before = len(server.log)
    p = _spin(client, prog, server)
    try:
        pid = server.wait_log(r"worker (\d+) took a command", before).group(1)
        p.kill()
        p.wait()
        server.wait_log(rf"worker {pid} ended with status {128 + signal.SIGHUP}", before)
    finally:
        _end(p)


def test_a_worker_killed_by_a_signal_is_reported_as_a_shell_would(server: Served,
                                                                  client: Path,
                                                                  prog: Path) -> None:
    before = len(server.log)
    p = _spin(client, prog, server)
    try:
        pid = int(server.wait_log(r"worker (\d+) took a command", before).group(1))
        os.kill(pid, signal.SIGKILL)
        assert p.wait(PATIENCE) == 128 + signal.SIGKILL
        server.wait_log(rf"worker {pid} killed by signal {int(signal.SIGKILL)}", before)
    finally:
        _end(p)


def _raw(server: Served, data: bytes, fds: list[int] | None = None) -> tuple[int, bytes]:
    """Send ``data`` (with ``fds``) as a client would; the reply after the worker's pid."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(PATIENCE)
        s.connect(str(server.sock))
        if fds:
            socket.send_fds(s, [data], fds)
        elif data:
            s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    kind, pid = struct.unpack_from("<II", got)
    assert kind == KIND_PID and pid > 0
    kind, value = struct.unpack_from("<II", got, 8)
    return kind, got[16:16 + value]


def test_a_malformed_request_gets_a_clear_error_and_the_server_goes_on(
        server: Served, client: Path, prog: Path) -> None:
    kind, text = _raw(server, b"GET / HTTP/1.0\r\n\r\n")
    assert kind == KIND_ERROR and b"not a dirtyring-client request" in text
    kind, text = _raw(server, encode_request("/", ["run"]))
    assert kind == KIND_ERROR and b"carried 0 descriptors, not 3" in text
    with open(os.devnull, "rb") as null:
        kind, text = _raw(server, encode_request("/", ["run"])[:-3], [null.fileno()] * 3)
    assert kind == KIND_ERROR and b"length is wrong" in text
    with open(os.devnull, "rb") as null:
        kind, text = _raw(server, encode_request("/no/such/dir", ["run"]),
                          [null.fileno()] * 3)
    assert kind == KIND_ERROR and b"cannot change to /no/such/dir" in text
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(server.sock))  # and hang up at once
    ok = subprocess.run([str(client), "run", "--exec", str(prog), "--", "0", "still"],
                        capture_output=True, timeout=PATIENCE, env=server.env())
    assert ok.returncode == 0 and b"arg 2: still" in ok.stdout
    assert server.proc.poll() is None


def test_without_a_server_the_client_runs_dirtyring_itself(tmp_path: Path, client: Path,
                                                            prog: Path) -> None:
    env = dict(os.environ, DIRTYRING_SOCKET=str(tmp_path / "nobody.sock"),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    got = subprocess.run([str(client), "run", "--exec", str(prog), "--", "3", "x"],
                         input=b"in\n", capture_output=True, timeout=PATIENCE, env=env)
    cold = _cold(prog, ["3", "x"], b"in\n")
    assert (got.stdout, got.stderr, got.returncode) == (cold.stdout, cold.stderr, 3)


def test_commands_that_come_before_the_spares_are_warm_all_run(tmp_path: Path, client: Path,
                                                               prog: Path) -> None:
    """Right after the start the spares are still warming up, and more commands come at once
    than there are spares: each goes to a spare as it is (or to one forked for it)."""
    s = Served(tmp_path / "s.sock")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        assert "listening on" in s.ready
        for i in range(SPARES + 3):
            procs.append(subprocess.Popen(
                [str(client), "run", "--exec", str(prog), "--", str(i), "at once"],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env=s.env()))
        for i, p in enumerate(procs):
            out, err = p.communicate(timeout=PATIENCE)
            assert (p.returncode, out) == (i, f"arg 1: {i}\narg 2: at once\n".encode()), err
    finally:
        for p in procs:
            _end(p)
        assert s.stop() == 0


def test_one_server_per_socket_and_a_dead_one_s_socket_is_taken_over(tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    first = Served(sock)
    try:
        assert "listening on" in first.ready
        second = subprocess.run([sys.executable, "-m", "dirtyring.cli.main", "serve",
                                 "--socket", str(sock)], capture_output=True, text=True,
                                timeout=PATIENCE)
        assert second.returncode == 1
        assert f"a warm server already listens at {sock}" in second.stderr
    finally:
        spares = _children(first.proc.pid)
        first.proc.kill()  # dies without removing its socket
        first.proc.wait()
    assert sock.exists()
    _wait_gone(spares)  # a spare sees its server's end and exits
    third = Served(sock)
    try:
        assert "listening on" in third.ready
    finally:
        assert third.stop() == 0
    assert not sock.exists()  # a clean stop removes it


def test_stopping_ends_the_idle_spare(tmp_path: Path) -> None:
    s = Served(tmp_path / "s.sock")
    try:
        assert "listening on" in s.ready
        children = _children(s.proc.pid)
        assert len(children) == SPARES  # warming up or waiting
    finally:
        assert s.stop() == 0
    for pid in children:
        assert not _alive(pid), f"spare {pid} outlived its server"


def _wait_gone(pids: list[int]) -> None:
    deadline = time.monotonic() + PATIENCE
    while any(_alive(p) for p in pids):
        if time.monotonic() > deadline:
            for p in pids:
                if _alive(p):
                    os.kill(p, signal.SIGKILL)
            raise AssertionError(f"{pids} outlived their server")
        time.sleep(0.02)


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(c) for c in text.split()]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
