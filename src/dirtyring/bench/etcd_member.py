"""A throwaway etcd member on loopback, for benchmarks (and tests) of the etcd arbiter.

It runs Debian's ``etcd`` (package etcd-server) with a data directory of its own, on free
loopback ports, and is ended by its PID. Nothing here is for production: a user runs etcd.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from typing import IO

from ..cli.child import free_port
from ..errors import DirtyringError


class EtcdMember:
    """``with EtcdMember() as e:`` ``e.url`` is its client URL (http://127.0.0.1:PORT)."""

    def __init__(self, name: str = "m0") -> None:
        if shutil.which("etcd") is None:
            raise DirtyringError("etcd is not installed (Debian: apt-get install etcd-server; "
                                 "./tools/install-test-deps does it)")
        self.name = name
        self.dir = tempfile.mkdtemp(prefix="dirtyring-etcd-")
        self.url = f"http://127.0.0.1:{free_port()}"
        self.peer = f"http://127.0.0.1:{free_port()}"
        self._log: IO[bytes] | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> EtcdMember:
        import requests
        self._log = open(os.path.join(self.dir, "etcd.log"), "wb")
        self.proc = subprocess.Popen(
            ["etcd", "--name", self.name, "--data-dir", os.path.join(self.dir, "data"),
             "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
             "--listen-peer-urls", self.peer, "--initial-advertise-peer-urls", self.peer,
             "--initial-cluster", f"{self.name}={self.peer}"],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if requests.get(self.url + "/health", timeout=1).json().get("health") == "true":
                    return self
            except (requests.RequestException, ValueError):
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise DirtyringError(f"etcd did not start: {self.log()[-1000:]}")
            time.sleep(0.05)

    def log(self) -> str:
        try:
            with open(os.path.join(self.dir, "etcd.log"), errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # by PID: our own child
            self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> EtcdMember:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
