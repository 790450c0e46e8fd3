"""The warm server's protocol and places, without KVM: a request round-trips and every
malformed one is refused in words; the C client and the server agree on the socket's default
place; the spare's warm-up program is a valid static ELF."""
from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
from pathlib import Path

import pytest

from dirtyring.cli.client import client_path
from dirtyring.cli.server import (KIND_PID, KIND_STATUS, MAX_REQUEST, RequestError,
                                  decode_request, default_socket, encode_request, exit_program,
                                  prepare_socket)
from dirtyring.errors import ConfigError
from dirtyring.linux.elf import ElfImage


def test_a_request_round_trips() -> None:
    args = ["run", "--exec", "./prog", "--", "a b", "ü", ""]
    req = decode_request(encode_request("/some/dir", args), [5, 6, 7])
    assert (req.cwd, req.args, req.fds) == ("/some/dir", args, [5, 6, 7])


@pytest.mark.parametrize("data, fds, words", [
    (b"", [0, 1, 2], "not a dirtyring-client request"),
    (b"DRW2\x04\x00\x00\x00abc\x00", [0, 1, 2], "not a dirtyring-client request"),
    (encode_request("/", ["run"])[:-1], [0, 1, 2], "length is wrong"),
    (encode_request("/", ["run"]) + b"x", [0, 1, 2], "length is wrong"),
    (b"DRW1" + (MAX_REQUEST + 1).to_bytes(4, "little"), [0, 1, 2], "length is wrong"),
    (b"DRW1\x03\x00\x00\x00abc", [0, 1, 2], "does not end"),
    (encode_request("/", ["run"]), [0, 1], "carried 2 descriptors, not 3"),
])
def test_malformed_requests_are_refused_in_words(data: bytes, fds: list[int],
                                                 words: str) -> None:
    with pytest.raises(RequestError, match=words):
        decode_request(data, fds)


@pytest.mark.parametrize("env", [
    {"DIRTYRING_SOCKET": "/x/y.sock", "XDG_RUNTIME_DIR": "/run/user/7"},
    {"XDG_RUNTIME_DIR": "/run/user/7"},
    {},
])
def test_client_and_server_agree_where_the_socket_is(env: dict[str, str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("DIRTYRING_SOCKET", "XDG_RUNTIME_DIR"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    where = subprocess.run([str(client_path()), "--where"], capture_output=True, text=True,
                           env=dict(os.environ), timeout=60)
    assert where.returncode == 0
    assert Path(where.stdout.strip()) == default_socket()


def test_the_warm_up_program_is_a_static_elf_that_exits() -> None:
    data = exit_program()
    img = ElfImage.parse(data, "warm-up")
    assert img.entry == 0x400000 + 64 + 56
    assert data[-2:] == b"\x0f\x05"  # ends in its syscall (exit 0)


def test_the_socket_s_place_must_be_private(tmp_path: Path) -> None:
    """A directory others can write to (and that is not sticky) would let another user put a
    socket of theirs in the server's place; a sticky one (like /tmp) does not."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(ConfigError, match="can be written by others"):
        prepare_socket(shared / "s.sock")
    shared.chmod(0o1777)
    prepare_socket(shared / "s.sock")  # sticky: fine
    (shared / "file").write_text("x")
    with pytest.raises(ConfigError, match="exists and is not a socket"):
        prepare_socket(shared / "file")


def test_a_dead_server_s_socket_is_removed_and_a_live_one_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        live.bind(str(path))
        live.listen(1)
        with pytest.raises(ConfigError, match="already listens"):
            prepare_socket(path)
    finally:
        live.close()  # the file stays: nobody listens now
    assert path.exists()
    prepare_socket(path)
    assert not path.exists()


def test_a_signal_before_the_worker_is_known_still_reaches_it(tmp_path: Path) -> None:
    """Ctrl-C right after the command starts: the client keeps the signal until the worker's
    pid arrives, then sends it on. A stand-in server plays the worker's part, with a process
    of the test's as the "worker"."""
    sock = tmp_path / "s.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock))
    listener.listen(1)
    worker = subprocess.Popen(["sleep", "600"])
    client = subprocess.Popen([str(client_path()), "run", "--exec", "x"],
                              env=dict(os.environ, DIRTYRING_SOCKET=str(sock)),
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    try:
        listener.settimeout(60)
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(60)
            data, fds, _, _ = socket.recv_fds(conn, 65536, 3)
            for fd in fds:
                os.close(fd)
            assert data.startswith(b"DRW1")  # the client has its handlers by now
            client.send_signal(signal.SIGTERM)  # pending on it before it learns the pid
            conn.sendall(struct.pack("<II", KIND_PID, worker.pid))
            assert worker.wait(60) == -signal.SIGTERM  # sent on to the worker
            conn.sendall(struct.pack("<II", KIND_STATUS, 143))
            assert client.wait(60) == 143
    finally:
        for p in (worker, client):
            if p.poll() is None:
                p.kill()
                p.wait()
        listener.close()


def test_a_socket_path_too_long_is_refused_before_anything_is_made(tmp_path: Path) -> None:
    path = tmp_path / ("d" * 100) / "s.sock"
    with pytest.raises(ConfigError, match="too long for a Unix socket"):
        prepare_socket(path)
    assert not path.parent.exists()
