"""A warm ``dirtyring``: ``dirtyring serve`` runs commands for ``dirtyring-client`` without
paying Python's start-up each time.

Why: ``dirtyring run --exec`` of an empty program takes ~200 ms here, of which the VMM's part
(build the machine, boot the library OS, run to the end) is ~9 ms; the rest is the interpreter,
its site directory and numpy (~90 ms here) and our own modules. Issue 15 asks for 20 ms from the
command to the program's ``main``. So the server imports everything once and keeps workers
forked ahead of time (as a zygote does), each warmed up by running an empty program (so the
memory a command touches is already its own, not copied on its first write); the client
(``client.c``) is a small C program that hands over the command and its standard descriptors,
forwards signals and exits with the worker's status.

The protocol (one Unix stream connection per command; ``client.c`` speaks the other side)::

    request   b"DRW1", u32 length, then ``length`` bytes: the working directory and each
              argument, each ending in NUL; descriptors 0, 1, 2 ride along (SCM_RIGHTS)
    replies   u32 kind, u32 value:  1 = the worker's pid (first),  2 = the exit status (last),
              3 = an error, its UTF-8 text (``value`` bytes) following (last)

All little-endian. The worker sends its pid, reads the request, makes the descriptors its own
0, 1 and 2, changes to the directory, runs ``main(args)`` and sends the status. A worker killed
by a signal cannot; the server then sends ``128 + signal``, as a shell reports it. When the
client goes away (killed, its terminal closed), its worker gets SIGHUP, which ``run --exec``
passes to the program as a terminal's hangup would.

What differs from ``dirtyring`` itself: the command runs with the server's environment (an
``--exec`` program's own is what ``--env`` names, either way), and a server started before an
upgrade runs the code it started with: restart it after one.
"""
from __future__ import annotations

import gc
import importlib
import os
import selectors
import signal
import socket
import stat
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from .commands import COMMANDS
from .._bindings.vm import defer_teardown
from .main import command_name, main

MAGIC = b"DRW1"
#: sockaddr_un's sun_path: a socket's path and its NUL.
SUN_PATH = 108
#: The longest request (directory and arguments) a worker reads.
MAX_REQUEST = 1 << 20
KIND_PID, KIND_STATUS, KIND_ERROR = 1, 2, 3
#: How long a worker waits for the request the client sends as soon as it connected.
REQUEST_TIMEOUT = 10.0
_HEAD = struct.Struct("<4sI")
_REPLY = struct.Struct("<II")


class RequestError(ConfigError):
    """A request a worker cannot run; its text goes back to the client."""


@dataclass(frozen=True, slots=True)
class Request:
    """One command to run: where, what (``dirtyring``'s arguments) and its 0, 1, 2."""

    cwd: str
    args: list[str]
    fds: list[int]


def default_socket() -> Path:
    """Where ``serve`` listens and ``dirtyring-client`` connects (``client.c`` says the same):
    $DIRTYRING_SOCKET, else $XDG_RUNTIME_DIR/dirtyring/serve.sock, else
    /tmp/dirtyring-UID/serve.sock."""
    if os.environ.get("DIRTYRING_SOCKET"):
        return Path(os.environ["DIRTYRING_SOCKET"])
    if os.environ.get("XDG_RUNTIME_DIR"):
        return Path(os.environ["XDG_RUNTIME_DIR"]) / "dirtyring" / "serve.sock"
    return Path(f"/tmp/dirtyring-{os.getuid()}") / "serve.sock"


def encode_request(cwd: str, args: list[str]) -> bytes:
    """The request's bytes (its descriptors go beside them)."""
    body = b"".join(os.fsencode(s) + b"\0" for s in (cwd, *args))
    return _HEAD.pack(MAGIC, len(body)) + body


def decode_request(data: bytes, fds: list[int]) -> Request:
    """The request in ``data`` (its whole bytes) with the descriptors that came with it;
    RequestError, in words, for anything else."""
    if len(data) < _HEAD.size or data[:4] != MAGIC:
        raise RequestError("this is not a dirtyring-client request (another version?)")
    (_, n) = _HEAD.unpack_from(data)
    body = data[_HEAD.size:]
    if n > MAX_REQUEST or len(body) != n:
        raise RequestError(f"the request's length is wrong ({len(body)} bytes, header says {n})")
    if not body.endswith(b"\0"):
        raise RequestError("the request's last argument does not end")
    if len(fds) != 3:
        raise RequestError(f"the request carried {len(fds)} descriptors, not 3 (0, 1, 2)")
    cwd, *args = [os.fsdecode(s) for s in body[:-1].split(b"\0")]
    return Request(cwd, args, fds)


def read_request(conn: socket.socket) -> Request:
    """Read one request from a fresh connection (descriptors with its first bytes)."""
    conn.settimeout(REQUEST_TIMEOUT)
    data, fds = b"", list[int]()
    try:
        data, fds, _, _ = socket.recv_fds(conn, 65536, 3)
        while data:
            need = _HEAD.size + (min(_HEAD.unpack_from(data)[1], MAX_REQUEST)
                                 if len(data) >= _HEAD.size else 0)
            if len(data) >= need:
                break
            more = conn.recv(min(need - len(data), 65536))
            if not more:
                break
            data += more
        return decode_request(data, list(fds))
    except (OSError, TimeoutError) as e:
        _close_all(fds)
        raise RequestError(f"the request did not arrive: {e}") from None
    except RequestError:
        _close_all(fds)
        raise


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def reply(conn: socket.socket, kind: int, value: int, text: bytes = b"") -> None:
    """Send one reply; a client that has gone is not an error here."""
    try:
        conn.sendall(_REPLY.pack(kind, value) + text)
    except OSError:
        pass


def peer_uid(conn: socket.socket) -> int:
    """The connecting process's user (SO_PEERCRED)."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


def prepare_socket(path: Path) -> None:
    """Make ``path``'s directory ours alone, and refuse a path a live server holds; a socket
    file left by a server that died is removed."""
    if len(os.fsencode(path)) >= SUN_PATH:
        raise ConfigError(f"{path} is too long for a Unix socket ({len(os.fsencode(path))} "
                          f"bytes; at most {SUN_PATH - 1}): name a shorter one (--socket PATH)")
    d = path.parent
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = d.stat()
    if st.st_uid != os.getuid():
        raise ConfigError(f"{d} belongs to another user; name a socket of your own "
                          "(--socket PATH)")
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        # Another user could put a socket of theirs in ours' place, and have our clients
        # hand it their descriptors (a sticky directory like /tmp lets nobody do that).
        raise ConfigError(f"{d} can be written by others; name a private socket "
                          "(--socket PATH)")
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise ConfigError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except ConnectionRefusedError:
            path.unlink()  # a server that died left it
        except OSError as e:
            raise ConfigError(f"{path}: {e.strerror}") from None
        else:
            raise ConfigError(f"a warm server already listens at {path}")
        finally:
            probe.close()


def warm_up() -> None:
    """Import what commands use, once, so no worker pays for it."""
    for module in dict.fromkeys(m for m, _ in COMMANDS.values()):
        importlib.import_module(f"{__package__}.{module}")
    from ..linux.build import load_libos, load_vdso
    load_libos()
    load_vdso()


#: Spare workers kept forked and warm. Two, so that commands run back to back each find one
#: ready: warming one up (~20-30 ms here) takes longer than a short command.
SPARES = 2


@dataclass(slots=True)
class _Spare:
    """A spare worker: its control socket (its connection goes there) and whether it has said
    it is warm."""

    ctl: socket.socket
    warm: bool = False


class Server:
    """Listen at ``path``; each connection goes to a spare worker forked (and warmed up)
    ahead of time. ``log`` gets a line per command."""

    def __init__(self, path: Path, log: Callable[[str], None] = lambda s: None) -> None:
        self.path = path
        self.log = log
        self.served = 0
        #: Running workers: pid -> (their client's connection, when they took it).
        self._workers: dict[int, tuple[socket.socket, float]] = {}
        #: Spare workers, oldest first: pid -> its control socket and readiness.
        self._spares: dict[int, _Spare] = {}
        self._stop = False
        prepare_socket(path)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        os.chmod(path, 0o600)
        self._listener.listen(64)
        self._ino = path.stat().st_ino
        # The spares' warm-up program: in memory, so no file is left even when the server is
        # killed (each spare reads it through its own /proc/self/fd).
        self._warm_fd = os.memfd_create("dirtyring-warm-up", os.MFD_CLOEXEC)
        os.write(self._warm_fd, exit_program())
        self._warm = Path(f"/proc/self/fd/{self._warm_fd}")
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def serve(self, ready: Callable[[], None] = lambda: None) -> None:
        """Serve until SIGTERM or SIGINT (then remove the socket; running workers go on).
        ``ready`` is called once the spare workers exist."""
        old_wake = signal.set_wakeup_fd(self._wake_w)
        handlers = {s: signal.signal(s, self._on_signal)
                    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)}
        self._sel.register(self._listener, selectors.EVENT_READ)
        self._sel.register(self._wake_r, selectors.EVENT_READ)
        gc.freeze()  # what is here now is never collected: forks share it untouched
        try:
            for _ in range(SPARES):
                self._fork_spare()
            ready()
            while not self._stop:
                for key, _ in self._sel.select():
                    if key.fileobj == self._wake_r:
                        try:
                            os.read(self._wake_r, 512)
                        except BlockingIOError:
                            pass
                    elif key.fileobj is self._listener:
                        if not self._stop:
                            self._accept()
                    else:
                        self._spare_says(key.data)
                self._reap()
        finally:
            signal.set_wakeup_fd(old_wake)
            for s, h in handlers.items():
                signal.signal(s, h)
            self.close()

    def close(self) -> None:
        """Stop listening, end the idle spares and remove the socket (if it is still ours)."""
        self._listener.close()
        for pid, spare in list(self._spares.items()):
            spare.ctl.close()  # it reads the end of its control socket and exits
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        self._spares.clear()
        self._sel.close()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        os.close(self._warm_fd)
        try:
            if self.path.stat().st_ino == self._ino:
                self.path.unlink()
        except OSError:
            pass

    def _on_signal(self, sig: int, frame: object) -> None:
        if sig != signal.SIGCHLD:
            self._stop = True

    def _accept(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except OSError:
            return
        if peer_uid(conn) != os.getuid():
            reply(conn, KIND_ERROR, 0)  # never another user's command
            conn.close()
            return
        # A warm spare if there is one, else the oldest (it takes the command once warm);
        # one that died in the meantime refuses the hand-over, and the next is tried.
        for _ in range(SPARES + 2):
            if not self._spares:
                self._fork_spare()
            pid = next((p for p, sp in self._spares.items() if sp.warm),
                       next(iter(self._spares)))
            spare = self._spares.pop(pid)
            self._sel.unregister(spare.ctl)
            try:
                socket.send_fds(spare.ctl, [b"c"], [conn.fileno()])
                break
            except OSError:
                continue
            finally:
                spare.ctl.close()
        else:
            text = b"the warm server could not start a worker (see its log)"
            reply(conn, KIND_ERROR, len(text), text)
            conn.close()
            return
        self.served += 1
        self._workers[pid] = (conn, time.monotonic())
        self.log(f"worker {pid} took a command")
        self._fork_spare()

    def _spare_says(self, pid: int) -> None:
        """A spare's control socket is readable: it is warm, or it has ended."""
        spare = self._spares.get(pid)
        if spare is None:
            return
        try:
            said = spare.ctl.recv(16)
        except OSError:
            said = b""
        if said:
            spare.warm = True
        else:
            self._sel.unregister(spare.ctl)  # it ended: _reap says so

    def _fork_spare(self) -> None:
        """A worker forked ahead of time: it warms itself up (an empty program run to its end,
        so the pages a command touches are its own already, not copied on their first write:
        each such fault is slow in this host's VM), says so, and waits for its connection."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                self._listener.close()
                ours.close()
                os.close(self._wake_r)
                os.close(self._wake_w)
                for conn, _ in self._workers.values():  # other commands' connections
                    conn.close()
                for sp in self._spares.values():
                    sp.ctl.close()
                status = _spare(theirs, self._warm)
            finally:
                os._exit(status)
        theirs.close()
        self._spares[pid] = _Spare(ours)
        self._sel.register(ours, selectors.EVENT_READ, pid)

    def _reap(self) -> None:
        while True:
            try:
                pid, wstatus = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            spare = self._spares.pop(pid, None)
            if spare is not None:
                try:
                    self._sel.unregister(spare.ctl)
                except (KeyError, ValueError):
                    pass
                spare.ctl.close()
                self.log(f"spare worker {pid} ended before it had a command "
                         f"(status {os.waitstatus_to_exitcode(wstatus)}); the next command "
                         "starts another")
                continue
            conn, t0 = self._workers.pop(pid, (None, 0.0))
            if os.WIFSIGNALED(wstatus):
                sig = os.WTERMSIG(wstatus)
                if conn is not None:  # the worker could not say it
                    reply(conn, KIND_STATUS, 128 + sig)
                self.log(f"worker {pid} killed by signal {sig}")
            else:
                self.log(f"worker {pid} ended with status "
                         f"{os.waitstatus_to_exitcode(wstatus)} in "
                         f"{(time.monotonic() - t0) * 1e3:.1f} ms")
            if conn is not None:
                conn.close()


def _work(conn: socket.socket) -> int:
    """In the worker: run the request's command as ``dirtyring`` would; its status."""
    signal.set_wakeup_fd(-1)
    for s in (signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(s, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    reply(conn, KIND_PID, os.getpid())
    try:
        req = read_request(conn)
        for i, fd in enumerate(req.fds):
            os.dup2(fd, i)
            os.close(fd)
        try:
            os.chdir(req.cwd)
        except OSError as e:
            raise RequestError(f"cannot change to {req.cwd}: {e.strerror}") from None
        if command_name(req.args) == "serve":
            raise RequestError("a server is started with `dirtyring serve` itself, not "
                               "through dirtyring-client")
    except Exception as e:  # noqa: BLE001 - the client hears why, whatever it was
        text = (str(e) if isinstance(e, RequestError)
                else f"the worker failed: {type(e).__name__}: {e}").encode()[:4000]
        reply(conn, KIND_ERROR, len(text), text)
        return 2
    conn.settimeout(None)
    done = threading.Event()
    threading.Thread(target=_hang_up_with, args=(conn, done), daemon=True).start()
    defer_teardown()  # the status first; this process's exit then destroys its VMs
    try:
        status = main(req.args)
    except SystemExit as e:  # argparse's errors and --help
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - a bug: what `dirtyring` itself would print
        traceback.print_exc()
        status = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:
        pass
    done.set()  # the client leaves once it has the status: that is no hangup
    reply(conn, KIND_STATUS, status & 0xFF)
    _stdio_to_null()  # a reader of our output (a pipe, $(...)) sees its end now, not at exit
    return status & 0xFF


def _stdio_to_null() -> None:
    """Descriptors 0, 1 and 2 on /dev/null (none of the client's, or the server's, held)."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def _spare(ctl: socket.socket, warm: Path) -> int:
    """A spare worker: warm up, then wait for a connection (or the server's end)."""
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
        signal.signal(s, signal.SIG_DFL)
    signal.set_wakeup_fd(-1)
    _stdio_to_null()
    try:
        main(["run", "--exec", str(warm)])
    except BaseException:  # noqa: BLE001 - warming up is only an optimisation
        pass
    try:
        ctl.sendall(b"w")  # warm
    except OSError:
        pass  # the server gave us a connection before we were warm, and closed its end
    try:
        _, fds, _, _ = socket.recv_fds(ctl, 1, 1)
    except OSError:
        fds = []
    ctl.close()
    if not fds:
        return 0  # the server ended
    return _work(socket.socket(fileno=fds[0]))


def exit_program() -> bytes:
    """A static x86-64 ELF that only exits with status 0: what a spare warms up with (no
    compiler needed). One PT_LOAD of its own 132 bytes at 0x400000."""
    code = bytes.fromhex("31ff" "b83c000000" "0f05")  # xor edi,edi; mov eax,60; syscall
    ehdr_size, phdr_size = 64, 56
    entry = 0x400000 + ehdr_size + phdr_size
    size = ehdr_size + phdr_size + len(code)
    ehdr = struct.pack("<16sHHIQQQIHHHHHH", b"\x7fELF\x02\x01\x01" + bytes(9), 2, 62, 1,
                       entry, ehdr_size, 0, 0, ehdr_size, phdr_size, 1, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 0, 0x400000, 0x400000, size, size, 0x1000)
    return ehdr + phdr + code


def _hang_up_with(conn: socket.socket, done: threading.Event) -> None:
    """The client closing its end before it has its status is our terminal's hangup: SIGHUP
    to ourselves."""
    try:
        while conn.recv(1):
            pass
    except OSError:
        pass
    if not done.is_set():
        os.kill(os.getpid(), signal.SIGHUP)


def serve_main(path: Path, ready: Callable[[str], None], log: Callable[[str], None]) -> int:
    """``dirtyring serve``: warm up, listen, say so, serve; its exit status."""
    warm_up()
    try:
        server = Server(path, log)
    except OSError as e:
        raise ConfigError(f"cannot listen at {path}: {e.strerror or e}") from None
    server.serve(lambda: ready(f"listening on {path} (pid {os.getpid()})"))
    log(f"stopped after {server.served} command(s)")
    return 0
